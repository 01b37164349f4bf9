#!/usr/bin/env python
"""Part-whole segmentation of CAST's hierarchy (levels 1..4) against ground-truth masks, beside the paper's ViT
baseline (patch tokens upsampled, spherical k-means into as many clusters as CAST keeps, then hierarchical k-means):
per level, mIoU after majority-label assignment, best-overlap IoU, covering and boundary F-score.

    python scripts/evaluate_segmentation.py --model_name_or_path outputs/reproduce_small/cast \
        --dataset_name outputs/reproduce_small/data --mask_column object_mask \
        --vit_model outputs/reproduce_small/vit --real_photos voc --output_json outputs/segmentation.json

The dataset is a folder written by `scripts/make_synthetic_dataset.py`, any imagefolder / parquet folder with an
image column and a mask column (class ids as palette indices or grayscale values), or a Hub id. Without
`--vit_model` the baseline ViT has random weights (a warning says so).
"""

import argparse
import logging

from hf_hierseg.evaluation.segmentation_eval import (
    VIT_BASELINE_PATCH_SIZE,
    format_segmentation_report,
    run_segmentation_evaluation,
    write_json,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="CAST model folder or Hub id")
    parser.add_argument("--dataset_name", default=None, help="image + mask dataset (folder or Hub id)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--mask_column", default="object_mask")
    parser.add_argument("--image_column", default=None, help="default: the first Image column")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--num_labels", type=int, default=None, help="classes in the masks (default: inferred)")
    parser.add_argument("--ignore_index", type=int, default=None, help="mask value left out of every score")
    parser.add_argument(
        "--exclude_labels",
        type=int,
        nargs="*",
        default=(),
        help="mask labels not scored as regions by best overlap / covering (e.g. 0 = background)",
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", default=(1, 2, 3, 4), help="CAST levels (0 = superpixels, 1..4 = hierarchy)"
    )
    parser.add_argument("--tolerance", type=float, default=1, help="boundary matching distance in pixels")
    parser.add_argument(
        "--real_photos",
        nargs="*",
        default=(),
        choices=("voc", "arc2017"),
        help="also evaluate real photos shipped by PyPI packages (class and instance masks)",
    )
    parser.add_argument("--vit_model", default=None, help="ViT folder for the baseline (default: random weights)")
    parser.add_argument(
        "--vit_patch_size",
        type=int,
        default=VIT_BASELINE_PATCH_SIZE,
        help="patch size of the random ViT (ignored with --vit_model)",
    )
    parser.add_argument("--no_vit", action="store_true", help="skip the ViT + k-means baseline")
    parser.add_argument(
        "--vit_max_fit_pixels",
        type=int,
        default=4096,
        help="k-means is fitted on the ViT features upsampled to at most this many pixels",
    )
    parser.add_argument(
        "--superpixel_method",
        choices=("seeds", "slic", "grid"),
        default=None,
        help="default: the model's image processor's, else seeds",
    )
    parser.add_argument(
        "--num_superpixels",
        type=int,
        default=None,
        help="superpixels per 224x224 px (default: the image processor's, else 196)",
    )
    parser.add_argument(
        "--seeds_recipe",
        choices=("self_supervised", "supervised"),
        default=None,
        help="SEEDS settings (default: the image processor's, else self_supervised)",
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (and random ViT initialisation)")
    parser.add_argument("--output_json", default=None, help="write the settings and every score here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    run = run_segmentation_evaluation(
        args.model_name_or_path,
        args.dataset_name,
        split=args.split,
        mask_column=args.mask_column,
        image_column=args.image_column,
        max_samples=args.max_samples,
        num_labels=args.num_labels,
        levels=tuple(args.levels),
        vit_model=args.vit_model,
        vit_patch_size=args.vit_patch_size,
        skip_vit=args.no_vit,
        vit_max_fit_pixels=args.vit_max_fit_pixels,
        real_photos=tuple(args.real_photos),
        superpixel_method=args.superpixel_method,
        num_superpixels=args.num_superpixels,
        seeds_recipe=args.seeds_recipe,
        batch_size=args.batch_size,
        ignore_index=args.ignore_index,
        tolerance=args.tolerance,
        exclude_labels=tuple(args.exclude_labels),
        seed=args.seed,
    )
    print(format_segmentation_report(run))
    if args.output_json:
        print(f"\nScores written to {write_json(run, args.output_json)}")


if __name__ == "__main__":
    main()
