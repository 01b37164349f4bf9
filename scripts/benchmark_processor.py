#!/usr/bin/env python
"""Throughput of `CastImageProcessor` (images/s with 1 worker and with all cores, the share of SEEDS):
`hf_hierseg.apps.benchmark_processor`; see `--help`."""

import sys

from hf_hierseg.apps.benchmark_processor import processor_benchmark_parser, run_processor_benchmark


if __name__ == "__main__":
    sys.exit(run_processor_benchmark(processor_benchmark_parser().parse_args()))
