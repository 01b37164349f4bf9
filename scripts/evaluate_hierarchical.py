#!/usr/bin/env python
"""Per-level top-1, full-path accuracy and tree consistency (TICE) of an H-CAST model on a labelled dataset: the
same as `hf-hierseg evaluate hierarchical` (`hf_hierseg.apps.evaluate_hierarchical`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["evaluate", "hierarchical", *sys.argv[1:]]))
