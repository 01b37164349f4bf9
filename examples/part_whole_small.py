#!/usr/bin/env python
"""The decisive CPU-scale part-whole run (`hf_hierseg.apps.part_whole`): a small CAST and a ViT of the same width,
depth and heads, each trained with MoCo v3 and with image labels for every seed, on the `camouflage_large` synthetic
set (object and background painted from one texture palette, one large object per image), scored per level with the
authors' VOC protocol (nearest-neighbour retrieval of labelled training segments), majority-label mIoU and boundary
F against the object masks, beside the classifiers' top-1, the untrained models and the floors of each score.

    python examples/part_whole_small.py --output_dir outputs/part_whole_small

About 20 CPU-minutes with the defaults (2 seeds x 2 objectives x 2 models; wall time is longer on a shared machine).
Writes the data, every trained model (`cast_moco_seed0/`, `vit_supervised_seed1/`, ...), `results.json` and
`results.md` (the tables printed at the end) under --output_dir.
"""

import argparse
import dataclasses

from hf_hierseg.apps.part_whole import PartWholeSettings, format_part_whole_report, part_whole_run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/part_whole_small")
    defaults = PartWholeSettings()
    for field in dataclasses.fields(PartWholeSettings):
        value = getattr(defaults, field.name)
        if isinstance(value, bool):
            parser.add_argument(
                f"--{field.name}",
                type=lambda text: text.lower() in ("1", "true", "yes"),
                default=value,
                help=f"default: {value}",
            )
        elif isinstance(value, tuple):
            kind = type(value[0]) if value else str
            parser.add_argument(f"--{field.name}", type=kind, nargs="+", default=value, help=f"default: {value}")
        else:
            parser.add_argument(f"--{field.name}", type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    settings = PartWholeSettings(
        **{
            field.name: tuple(value) if isinstance(value := getattr(args, field.name), list) else value
            for field in dataclasses.fields(PartWholeSettings)
        }
    )
    results = part_whole_run(args.output_dir, settings)
    print("\n" + format_part_whole_report(results))
    print(f"\nResults in {args.output_dir}/results.md|json")


if __name__ == "__main__":
    main()
