"""Command-line arguments of `scripts/train_moco.py` and `scripts/train_supervised.py`, named as in transformers'
`run_image_classification_no_trainer.py` example where they overlap."""

import argparse


def positive_int(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def common_parser(description):
    parser = argparse.ArgumentParser(description=description)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A Hub dataset id or a local folder of images (class sub-folders), parquet files with an "
        "Image column or webdataset .tar shards (anything `datasets.load_dataset` reads).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of the dataset.")
    data.add_argument("--train_dir", type=str, default=None, help="A folder containing the training images.")
    data.add_argument("--validation_dir", type=str, default=None, help="A folder containing the validation images.")
    data.add_argument("--train_split_name", type=str, default="train")
    data.add_argument(
        "--image_column_name",
        type=str,
        default=None,
        help="Column with the images (default: the first `datasets.Image` column).",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Stream the dataset (`load_dataset(..., streaming=True)`); needs --max_train_steps.",
    )
    data.add_argument(
        "--shuffle_buffer_size", type=positive_int, default=10_000, help="Shuffle buffer of a streamed dataset."
    )
    data.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="Use only the first N training examples (debugging, quick runs).",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes per process (they decode, augment and compute superpixels).",
    )
    data.add_argument(
        "--dataloader_timeout",
        type=float,
        default=600.0,
        help="Seconds to wait for a worker's batch before failing (instead of hanging).",
    )
    data.add_argument("--cache_dir", type=str, default=None, help="`datasets` cache folder.")
    data.add_argument(
        "--log_sample_keys",
        action="store_true",
        help="Write step, epoch and id of every training record to OUTPUT/sample_keys_rank{r}.txt.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        type=str,
        default=None,
        help="A model folder or Hub id: its config, weights and image processor are used.",
    )
    model.add_argument(
        "--config_name",
        type=str,
        default=None,
        help="Train from scratch: a preset (cast-small, cast-base, ...) or a config folder / Hub id.",
    )
    model.add_argument(
        "--config_overrides",
        type=str,
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="Config fields to change, e.g. hidden_size=192 num_clusters=32,16,8,4 image_size=112.",
    )
    model.add_argument(
        "--image_size", type=positive_int, default=None, help="Training crop size (default: the config's image_size)."
    )
    model.add_argument(
        "--superpixel_method",
        type=str,
        default=None,
        choices=("seeds", "slic", "grid"),
        help="Superpixels of the training views (default: the image processor's, else seeds).",
    )
    model.add_argument(
        "--num_superpixels",
        type=positive_int,
        default=None,
        help="Superpixels per 224x224 pixels (default: the image processor's, else 196).",
    )
    model.add_argument("--hub_revision", type=str, default=None, help="Revision of --model_name_or_path on the Hub.")

    optimization = parser.add_argument_group("optimisation")
    optimization.add_argument("--per_device_train_batch_size", type=positive_int, default=64)
    optimization.add_argument("--per_device_eval_batch_size", type=positive_int, default=64)
    optimization.add_argument(
        "--learning_rate",
        type=float,
        default=1.5e-4,
        help="Peak learning rate (after warm-up); not rescaled with the batch size.",
    )
    optimization.add_argument("--weight_decay", type=float, default=0.1)
    optimization.add_argument("--optimizer", type=str, default="adamw", choices=("adamw", "lars"))
    optimization.add_argument(
        "--num_train_epochs",
        type=positive_int,
        default=3,
        help="Epochs to train (map-style data) unless --max_train_steps is given.",
    )
    optimization.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help="Optimiser steps to train; overrides --num_train_epochs.",
    )
    optimization.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    optimization.add_argument("--max_grad_norm", type=float, default=None, help="Clip gradients to this norm.")
    optimization.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="cosine",
        choices=("cosine", "linear", "constant_with_warmup", "constant", "polynomial"),
        help="Learning-rate schedule after the linear warm-up.",
    )
    optimization.add_argument("--num_warmup_steps", type=int, default=0, help="Linear warm-up steps.")
    optimization.add_argument(
        "--seed", type=int, default=0, help="Seeds the initialisation, the data order and the augmentations."
    )

    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--output_dir", type=str, required=True, help="Where checkpoints and the model are written.")
    outputs.add_argument("--checkpointing_steps", type=int, default=None, help="Save a checkpoint every N steps.")
    outputs.add_argument("--checkpoints_total_limit", type=int, default=3, help="Keep the newest N checkpoints.")
    outputs.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint folder, or `latest` for the newest one in --output_dir.",
    )
    outputs.add_argument(
        "--logging_steps",
        type=positive_int,
        default=10,
        help="Log the mean loss of the last N steps (and other metrics) every N steps.",
    )
    outputs.add_argument(
        "--report_to",
        type=str,
        default="all",
        choices=("all", "jsonl", "tensorboard", "none"),
        help="Metrics to OUTPUT/metrics.jsonl and/or TensorBoard (OUTPUT/runs, when installed), always to stdout.",
    )
    outputs.add_argument("--push_to_hub", action="store_true", help="Push the final model to the Hub.")
    outputs.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id (default: output folder name).")
    outputs.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    outputs.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return parser


def moco_parser():
    parser = common_parser("Self-supervised pre-training of CAST with MoCo v3 (Accelerate).")
    moco = parser.add_argument_group("MoCo v3")
    moco.add_argument("--moco_temperature", type=float, default=0.2, help="Softmax temperature T of InfoNCE.")
    moco.add_argument(
        "--moco_momentum",
        type=float,
        default=0.99,
        help="Momentum of the momentum encoder at step 0 (cosine schedule to 1).",
    )
    moco.add_argument("--crop_min_scale", type=float, default=0.08, help="Smallest crop area of the views.")
    moco.add_argument(
        "--momentum_encoder_checkpoint",
        type=str,
        default=None,
        help="An original MoCo-v3 CAST checkpoint (.pth.tar) whose momentum encoder to resume from "
        "(the converter keeps only the base encoder).",
    )
    parser.set_defaults(learning_rate=1.5e-4, weight_decay=0.1)
    return parser


def supervised_parser():
    parser = common_parser("Supervised training of CAST for image classification, DeiT recipe (Accelerate).")
    parser.add_argument(
        "--validation_split_name",
        type=str,
        default=None,
        help="Evaluation split (default: `validation`, else `test`, else --train_val_split of train).",
    )
    parser.add_argument(
        "--train_val_split",
        type=float,
        default=0.15,
        help="Fraction of train held out for evaluation when there is no evaluation split.",
    )
    parser.add_argument(
        "--label_column_name",
        type=str,
        default=None,
        help="Column with the labels (default: the first ClassLabel column).",
    )
    parser.add_argument("--max_eval_samples", type=positive_int, default=None)
    parser.add_argument("--eval_steps", type=int, default=None, help="Evaluate every N steps (always at the end).")
    parser.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="Load a checkpoint whose classifier has another number of classes.",
    )
    deit = parser.add_argument_group("DeiT recipe")
    deit.add_argument("--label_smoothing", type=float, default=0.1)
    deit.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0 disables).")
    deit.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 disables).")
    deit.add_argument("--mixup_prob", type=float, default=1.0, help="Probability of mixing a batch.")
    deit.add_argument("--mixup_switch_prob", type=float, default=0.5, help="Probability of CutMix when both are on.")
    deit.add_argument("--rand_augment_num_ops", type=int, default=2, help="RandAugment operations (0 disables).")
    deit.add_argument("--rand_augment_magnitude", type=float, default=9.0)
    deit.add_argument("--reprob", type=float, default=0.25, help="Random erasing probability.")
    deit.add_argument("--crop_min_scale", type=float, default=0.08, help="Smallest crop area of the views.")
    deit.add_argument("--model_ema", action="store_true", help="Keep an EMA of the weights (saved under OUTPUT/ema).")
    deit.add_argument("--model_ema_decay", type=float, default=0.99996)
    parser.set_defaults(learning_rate=5e-4, weight_decay=0.05)
    return parser


__all__ = ["common_parser", "moco_parser", "supervised_parser"]
