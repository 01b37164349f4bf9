#!/usr/bin/env python
"""Classification accuracy of a CAST model on a labelled dataset: top-1 / top-5 of a classifier's logits, and the
weighted kNN accuracy (k = 20, temperature 0.07, as DINO / MoCo v3) of the pooled embedding of any CAST model, with
the training split as neighbours.

    python scripts/evaluate_classification.py --model_name_or_path outputs/reproduce_small/cast \
        --dataset_name outputs/reproduce_small/data --eval_split test --output_json outputs/classification.json

The dataset is a folder written by `scripts/make_synthetic_dataset.py`, any imagefolder / parquet folder with an
image column and a label column, or a Hub id.
"""

import argparse

from hf_hierseg.evaluation.classification_eval import format_classification_table, run_classification_evaluation
from hf_hierseg.evaluation.segmentation_eval import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="CAST model folder or Hub id")
    parser.add_argument("--dataset_name", required=True, help="labelled image dataset (folder or Hub id)")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--train_split", default="train", help="neighbours of the kNN classifier")
    parser.add_argument("--no_knn", action="store_true", help="skip the kNN accuracy")
    parser.add_argument("--image_column", default=None, help="default: the first Image column")
    parser.add_argument("--label_column", default=None, help="default: the first ClassLabel column")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None, help="default: the model's")
    parser.add_argument("--crop_fraction", type=float, default=0.875, help="central crop of the evaluation view")
    parser.add_argument("--knn_k", type=int, default=20)
    parser.add_argument("--knn_temperature", type=float, default=0.07)
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
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output_json", default=None, help="write the settings and the scores here")
    args = parser.parse_args(argv)

    run = run_classification_evaluation(
        args.model_name_or_path,
        args.dataset_name,
        eval_split=args.eval_split,
        train_split=args.train_split,
        knn=not args.no_knn,
        image_column=args.image_column,
        label_column=args.label_column,
        superpixel_method=args.superpixel_method,
        num_superpixels=args.num_superpixels,
        seeds_recipe=args.seeds_recipe,
        image_size=args.image_size,
        crop_fraction=args.crop_fraction,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
        batch_size=args.batch_size,
        max_eval_samples=args.max_eval_samples,
        max_train_samples=args.max_train_samples,
    )
    print(f"**{args.dataset_name} [{args.eval_split}]**\n")
    print(format_classification_table({args.model_name_or_path: run["results"]}))
    if args.output_json:
        print(f"\nScores written to {write_json(run, args.output_json)}")


if __name__ == "__main__":
    main()
