#!/usr/bin/env python
"""CAST on a CUDA device: parity with the CPU (float32 eager and compiled, bf16 / fp16 agreement), host
synchronisations and throughput against ViT-S/16; skips cleanly (exit status 0) without CUDA. The same as
`hf-hierseg check-device` (`hf_hierseg.apps.check_device`); see `--help`."""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["check-device", *sys.argv[1:]]))
