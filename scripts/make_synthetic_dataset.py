#!/usr/bin/env python
"""Write the synthetic part-whole dataset (textured shapes with object and part masks) as imagefolder or parquet.

Example:
    python scripts/make_synthetic_dataset.py --output_dir outputs/synthetic --num_images 3000 --image_size 64
"""

import argparse

from hf_hierseg.evaluation.synthetic import VARIANTS, write_synthetic_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--num_images", type=int, default=600, help="images in the train split")
    parser.add_argument(
        "--num_test_images", type=int, default=None, help="images in the test split (default: num_images // 5)"
    )
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--format", choices=("imagefolder", "parquet"), default="imagefolder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_distractors", type=int, default=1, help="at most this many clutter blobs per image")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="contrasting",
        help="contrasting: one object, colour unlike the background; camouflage: 2-3 small objects in the "
        "background's palette; camouflage_large: one large object (~26 %% of the image) in the background's palette",
    )
    args = parser.parse_args(argv)
    output = write_synthetic_dataset(
        args.output_dir,
        num_images=args.num_images,
        num_test_images=args.num_test_images,
        image_size=args.image_size,
        format=args.format,
        seed=args.seed,
        max_distractors=args.max_distractors,
        variant=args.variant,
    )
    print(f"Wrote {args.format} dataset to {output}")


if __name__ == "__main__":
    main()
