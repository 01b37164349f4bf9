#!/usr/bin/env python
"""Top-1 / top-5 and kNN accuracy of a CAST model on a labelled dataset: the same as
`hf-hierseg evaluate classification` (`hf_hierseg.apps.evaluate`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["evaluate", "classification", *sys.argv[1:]]))
