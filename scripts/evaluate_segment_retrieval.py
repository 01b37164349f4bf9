#!/usr/bin/env python
"""Unsupervised segmentation by nearest-neighbour retrieval of labelled training segments (the paper's VOC protocol),
for CAST and the ViT + k-means baseline: `hf_hierseg.apps.evaluate.segment_retrieval_parser` /
`run_segment_retrieval` (`hf_hierseg.evaluation.segment_retrieval`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["evaluate", "segment-retrieval", *sys.argv[1:]]))
