"""Convert an original CAST checkpoint (MoCo-v3, DeiT or bare state dict) to a `save_pretrained` directory."""

import argparse
import sys

from hf_hierseg.convert import convert_checkpoint, parse_overrides


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint_XXXX.pth.tar, checkpoint.pth or a state dict")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--preset", help="cast-small, cast-small-deep, cast-base or cast-base-deep")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config field, lists comma-separated (e.g. num_clusters=32,16,8,4); repeatable")
    parser.add_argument("--allow-argparse-namespace", action="store_true",
                        help="allow the argparse.Namespace that DeiT checkpoints keep under `args`")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also publish the converted model to this Hub repo")
    args = parser.parse_args(argv)
    try:
        _, report = convert_checkpoint(
            args.checkpoint, args.output, args.preset, parse_overrides(args.set), args.allow_argparse_namespace
        )
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    for line in report.lines():
        print(line)
    print(f"saved to {args.output}")
    if args.push_to_hub:
        from hf_hierseg.hub import publish_converted

        print(publish_converted(args.output, args.push_to_hub, report))


if __name__ == "__main__":
    sys.exit(main())
