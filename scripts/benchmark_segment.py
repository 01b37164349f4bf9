#!/usr/bin/env python
"""What segmenting photos costs, stage by stage (processor, forward, post-processing, writing, the pipeline and
`hf-hierseg segment`), with ratios to processor + forward: the same as `hf-hierseg benchmark segment`
(`hf_hierseg.apps.benchmark_segment`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["benchmark", "segment", *sys.argv[1:]]))
