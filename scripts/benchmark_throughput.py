"""Throughput of CAST-S against a transformers ViT-S/16 on this machine: forward and end-to-end images/s, peak
memory, the time split of CAST's forward, FLOPs and training steps. Prints a markdown report."""

import argparse
import json
import sys

from hf_hierseg.apps.benchmark_throughput import BenchmarkSettings, format_command, format_report, run_benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="inference batch sizes")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per case (scaled down, to at least 2, for batches above 8)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps after one warm-up step")
    parser.add_argument("--no-training", action="store_true", help="skip the training-step comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument(
        "--quick", action="store_true", help="batch sizes 1 and 8, 2 repeats, 1 training step, no memory processes"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    args = parser.parse_args(argv)

    settings = BenchmarkSettings(
        batch_sizes=(1, 8) if args.quick else tuple(args.batch_sizes),
        repeats=2 if args.quick else args.repeats,
        threads=args.threads,
        train_batch_size=args.train_batch_size,
        train_repeats=1 if args.quick else args.train_repeats,
        measure_memory=not (args.no_memory or args.quick),
        measure_training=not args.no_training,
    )
    report = run_benchmark(settings, log=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    print(
        format_report(report, format_command(sys.argv if argv is None else ["scripts/benchmark_throughput.py", *argv]))
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
