#!/usr/bin/env python
"""Throughput of CAST-S against a transformers ViT-S/16 on this machine: the same as `hf-hierseg benchmark`
(`hf_hierseg.apps.benchmark_throughput`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
