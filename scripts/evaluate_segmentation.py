#!/usr/bin/env python
"""Part-whole segmentation of CAST's hierarchy against ground-truth masks, beside the ViT + k-means baseline: the same
as `hf-hierseg evaluate segmentation` (`hf_hierseg.apps.evaluate`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["evaluate", "segmentation", *sys.argv[1:]]))
