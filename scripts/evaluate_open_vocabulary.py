#!/usr/bin/env python
"""Open-vocabulary object and part segmentation (the paper's PartImageNet protocol: CAST's segments labelled by CLIP),
beside the ViT + k-means and SAM baselines: `hf_hierseg.apps.evaluate.open_vocabulary_parser` / `run_open_vocabulary`
(`hf_hierseg.evaluation.open_vocabulary`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["evaluate", "open-vocabulary", *sys.argv[1:]]))
