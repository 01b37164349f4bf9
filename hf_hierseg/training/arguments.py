"""Settings of the trainers as dataclasses, parsed with transformers' `HfArgumentParser`. Argument names follow
transformers' `run_image_classification_no_trainer.py` where they overlap.

A trainer's parser reads a tuple of these dataclasses and its runner takes them in the same order:

    data_args, model_args, optimization_args, output_args, moco_args = moco_parser().parse_args_into_dataclasses()
    train_moco(data_args, model_args, optimization_args, output_args, moco_args)

A recipe with other defaults (the DeiT learning rate, LoRA's light augmentation) subclasses a dataclass and changes
the defaults only (`recipe_default`), so building the dataclasses in Python gives what the command line gives.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from ..errors import InvalidInputError
from .interruption import DEFAULT_STOP_TIMEOUT, PREEMPTED_EXIT_CODE


class PositiveInt(int):
    """An `int` >= 1. As the type of a field it is the argument's argparse type, so the parser reports other values
    as its own errors (`argument --x: expected a positive integer, got 0`, exit status 2); values given in Python
    are checked by the dataclass (`check_positive`)."""

    def __new__(cls, value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
        return super().__new__(cls, number)


def recipe_default(dataclass_type, name, default):
    """The field `name` of `dataclass_type` with another default and the same help, for a recipe's subclass."""
    original = {item.name: item for item in dataclasses.fields(dataclass_type)}[name]
    return field(default=default, metadata=original.metadata)


def check_positive(settings, *names):
    """Raise an `InvalidInputError` (a `ValueError`) naming the argument unless each of `names` is None or a
    positive integer."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"--{name} expects a positive integer, got {value!r}.")


def check_non_negative(settings, *names):
    """Raise an `InvalidInputError` (a `ValueError`) naming the argument unless each of `names` is >= 0."""
    for name in names:
        value = getattr(settings, name)
        if value < 0:
            raise InvalidInputError(f"--{name} must be >= 0, got {value!r}.")


def check_fraction(settings, *names):
    """Raise an `InvalidInputError` (a `ValueError`) naming the argument unless each of `names` lies in [0, 1]."""
    for name in names:
        value = getattr(settings, name)
        if not 0.0 <= value <= 1.0:
            raise InvalidInputError(f"--{name} expects a value in [0, 1], got {value!r}.")


@dataclass
class DataArguments:
    """Where the training images come from and how they are read."""

    _argument_group_name = "data"

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub dataset id or a local folder of images (class sub-folders), parquet files with an Image "
            "column or webdataset .tar shards (anything `datasets.load_dataset` reads)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder containing the training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder containing the validation images."})
    train_split_name: str = field(default="train", metadata={"help": "The training split."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column with the images (default: the first `datasets.Image` column)."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset (`load_dataset(..., streaming=True)`); needs --max_train_steps."},
    )
    shuffle_buffer_size: PositiveInt = field(
        default=10_000, metadata={"help": "Shuffle buffer of a streamed dataset."}
    )
    max_train_samples: PositiveInt | None = field(
        default=None, metadata={"help": "Use only the first N training examples (debugging, quick runs)."}
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={"help": "DataLoader worker processes per process (they decode, augment and compute superpixels)."},
    )
    dataloader_timeout: float = field(
        default=600.0, metadata={"help": "Seconds to wait for a worker's batch before failing (instead of hanging)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "`datasets` cache folder."})
    log_sample_keys: bool = field(
        default=False,
        metadata={"help": "Write step, epoch and id of every training record to OUTPUT/sample_keys_rank{r}.txt."},
    )

    def __post_init__(self):
        check_positive(self, "shuffle_buffer_size", "max_train_samples")
        check_non_negative(self, "dataloader_num_workers", "dataloader_timeout")


@dataclass
class ModelArguments:
    """The model to train (a checkpoint, or a config to start from scratch) and the superpixels of its views."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A model folder or Hub id: its config, weights and image processor are used."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Train from scratch: a preset (cast-small, cast-base, ...) or a config folder / Hub id."},
    )
    config_overrides: list[str] | None = field(
        default=None,
        metadata={
            "help": "Config fields to change, e.g. hidden_size=192 num_clusters=32,16,8,4 image_size=112.",
            "metavar": "KEY=VALUE",
        },
    )
    image_size: PositiveInt | None = field(
        default=None, metadata={"help": "Training crop size (default: the config's image_size)."}
    )
    superpixel_method: Literal["seeds", "slic", "grid"] | None = field(
        default=None,
        metadata={"help": "Superpixels of the training views (default: the image processor's, else seeds)."},
    )
    num_superpixels: PositiveInt | None = field(
        default=None,
        metadata={"help": "Superpixels per 224x224 pixels (default: the image processor's, else 196)."},
    )
    hub_revision: str | None = field(default=None, metadata={"help": "Revision of --model_name_or_path on the Hub."})

    def __post_init__(self):
        check_positive(self, "image_size", "num_superpixels")


@dataclass
class OptimizationArguments:
    """Batches, optimiser, schedule and seed (defaults: MoCo v3's; other recipes subclass it with theirs)."""

    _argument_group_name = "optimisation"

    per_device_train_batch_size: PositiveInt = field(
        default=64, metadata={"help": "Training images per process and step."}
    )
    per_device_eval_batch_size: PositiveInt = field(
        default=64, metadata={"help": "Evaluation images per process and batch."}
    )
    learning_rate: float = field(
        default=1.5e-4, metadata={"help": "Peak learning rate (after warm-up); not rescaled with the batch size."}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "Weight decay of the weight matrices."})
    optimizer: Literal["adamw", "lars"] = field(default="adamw", metadata={"help": "The optimiser."})
    num_train_epochs: PositiveInt = field(
        default=3, metadata={"help": "Epochs to train (map-style data) unless --max_train_steps is given."}
    )
    max_train_steps: PositiveInt | None = field(
        default=None, metadata={"help": "Optimiser steps to train; overrides --num_train_epochs."}
    )
    gradient_accumulation_steps: PositiveInt = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    lr_scheduler_type: Literal["cosine", "linear", "constant_with_warmup", "constant", "polynomial"] = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the linear warm-up."}
    )
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    seed: int = field(default=0, metadata={"help": "Seeds the initialisation, the data order and the augmentations."})
    max_nonfinite_steps: int = field(
        default=0,
        metadata={
            "help": "Skip up to N steps in a row whose loss is NaN or infinite (e.g. fp16 overflow) before stopping; "
            "a skipped step makes no update but counts towards --max_train_steps (its batches are used, the "
            "learning-rate schedule moves on). 0: the first such step stops the run."
        },
    )

    def __post_init__(self):
        check_positive(
            self,
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "num_train_epochs",
            "max_train_steps",
            "gradient_accumulation_steps",
        )
        check_non_negative(self, "max_nonfinite_steps")


@dataclass
class OutputArguments:
    """Where the run writes (checkpoints, metrics, the model) and whether it publishes the model."""

    _argument_group_name = "outputs"

    output_dir: str = field(metadata={"help": "Where checkpoints and the model are written."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save a checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or `latest` for the newest one in --output_dir."}
    )
    logging_steps: PositiveInt = field(
        default=10, metadata={"help": "Log the mean loss of the last N steps (and other metrics) every N steps."}
    )
    report_to: Literal["all", "jsonl", "tensorboard", "none"] = field(
        default="all",
        metadata={
            "help": "Metrics to OUTPUT/metrics.jsonl and/or TensorBoard (OUTPUT/runs, when installed), always to "
            "stdout."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (default: output folder name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    preemption_timeout: float = field(
        default=DEFAULT_STOP_TIMEOUT,
        metadata={
            "help": "After SIGTERM / SIGUSR1 the run finishes its step, saves a checkpoint and exits with status "
            f"{PREEMPTED_EXIT_CODE}; if that takes longer than this many seconds it exits at once (a second "
            "signal too). Resume with --resume_from_checkpoint latest."
        },
    )

    def __post_init__(self):
        check_positive(self, "logging_steps")
        if not self.preemption_timeout > 0:
            raise InvalidInputError(f"--preemption_timeout must be > 0 seconds, got {self.preemption_timeout!r}.")


@dataclass
class EvaluationArguments:
    """The evaluation split and how often it is evaluated (supervised, LoRA and segmentation runs)."""

    _argument_group_name = "evaluation"

    validation_split_name: str | None = field(
        default=None,
        metadata={"help": "Evaluation split (default: `validation`, else `test`, else --train_val_split of train)."},
    )
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of train held out for evaluation when there is no evaluation split."},
    )
    max_eval_samples: PositiveInt | None = field(
        default=None, metadata={"help": "Evaluate the first N examples only."}
    )
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (always at the end)."})

    def __post_init__(self):
        check_positive(self, "max_eval_samples")
        if not 0.0 <= self.train_val_split < 1.0:
            raise InvalidInputError(f"--train_val_split expects a fraction in [0, 1), got {self.train_val_split!r}.")


@dataclass
class MocoArguments:
    """MoCo v3 (`training.moco`)."""

    _argument_group_name = "MoCo v3"

    moco_temperature: float = field(default=0.2, metadata={"help": "Softmax temperature T of InfoNCE."})
    moco_momentum: float = field(
        default=0.99, metadata={"help": "Momentum of the momentum encoder at step 0 (cosine schedule to 1)."}
    )
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest crop area of the views."})
    momentum_encoder_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "An original MoCo-v3 CAST checkpoint (.pth.tar) whose momentum encoder to resume from (the "
            "converter keeps only the base encoder)."
        },
    )

    def __post_init__(self):
        check_fraction(self, "moco_momentum", "crop_min_scale")


@dataclass
class SupervisedArguments:
    """Image classification with DeiT's recipe (`training.supervised`)."""

    _argument_group_name = "DeiT recipe"

    label_column_name: str | None = field(
        default=None, metadata={"help": "Column with the labels (default: the first ClassLabel column)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose classifier has another number of classes (re-initialised)."},
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the targets."})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 disables)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 disables)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix when both are on."})
    rand_augment_num_ops: int = field(default=2, metadata={"help": "RandAugment operations (0 disables)."})
    rand_augment_magnitude: float = field(default=9.0, metadata={"help": "RandAugment magnitude (0..10)."})
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability."})
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest crop area of the views."})
    model_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the weights (saved under OUTPUT/ema)."})
    model_ema_decay: float = field(default=0.99996, metadata={"help": "Decay of the EMA of the weights."})

    def __post_init__(self):
        check_fraction(self, "label_smoothing", "mixup_prob", "mixup_switch_prob", "reprob", "crop_min_scale")
        check_non_negative(self, "mixup", "cutmix", "rand_augment_num_ops")


@dataclass
class SegmentationArguments:
    """Semantic segmentation on image + mask pairs (`training.segmentation`)."""

    _argument_group_name = "segmentation"

    label_column_name: str | None = field(
        default=None,
        metadata={
            "help": "Column with the masks (default: a column named mask/label/annotation/..., else the second "
            "Image column)."
        },
    )
    num_labels: PositiveInt | None = field(default=None, metadata={"help": "Number of classes."})
    id2label: str | None = field(
        default=None, metadata={"help": "JSON file {class id: name} (sets --num_labels to its length)."}
    )
    ignore_index: int = field(default=255, metadata={"help": "Mask value that is not a class."})
    reduce_labels: bool = field(
        default=False, metadata={"help": "Mask 0 is background to ignore; classes start at 1 (ADE20k convention)."}
    )
    palette: str | None = field(
        default=None,
        metadata={
            "help": 'JSON file: a list of [r, g, b] colours (index = class id) or {"#rrggbb": id}, to read RGB '
            "colour masks."
        },
    )
    crop_min_scale: float = field(default=0.25, metadata={"help": "Smallest crop area of the training views."})
    jitter_probability: float = field(default=0.0, metadata={"help": "Colour jitter of training images."})
    segmentation_head_type: Literal["linear", "mlp_projector"] | None = field(
        default=None, metadata={"help": "Head of a new model (default: the checkpoint's, else linear)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose head has another number of classes (re-initialised)."},
    )

    def __post_init__(self):
        check_positive(self, "num_labels")
        check_fraction(self, "crop_min_scale", "jitter_probability")


@dataclass
class LoraArguments:
    """LoRA adapters (`peft_utils.add_lora`)."""

    _argument_group_name = "LoRA"

    lora_r: PositiveInt = field(default=8, metadata={"help": "Rank of the LoRA updates."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    save_merged: bool = field(
        default=False,
        metadata={"help": "Also save the merged model (LoRA folded into the weights) under OUTPUT/merged."},
    )

    def __post_init__(self):
        check_positive(self, "lora_r")
        check_fraction(self, "lora_dropout")


# ---------------------------------------------------------------------------------------------------------------
# The recipes' own defaults
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SupervisedOptimizationArguments(OptimizationArguments):
    """DeiT's learning rate and weight decay."""

    learning_rate: float = recipe_default(OptimizationArguments, "learning_rate", 5e-4)
    weight_decay: float = recipe_default(OptimizationArguments, "weight_decay", 0.05)


@dataclass
class LoraOptimizationArguments(OptimizationArguments):
    """A larger learning rate for the adapters, no weight decay."""

    learning_rate: float = recipe_default(OptimizationArguments, "learning_rate", 1e-3)
    weight_decay: float = recipe_default(OptimizationArguments, "weight_decay", 0.0)


@dataclass
class LoraSupervisedArguments(SupervisedArguments):
    """Fine-tuning with light augmentation: no Mixup / CutMix / RandAugment / erasing / label smoothing."""

    label_smoothing: float = recipe_default(SupervisedArguments, "label_smoothing", 0.0)
    mixup: float = recipe_default(SupervisedArguments, "mixup", 0.0)
    cutmix: float = recipe_default(SupervisedArguments, "cutmix", 0.0)
    rand_augment_num_ops: int = recipe_default(SupervisedArguments, "rand_augment_num_ops", 0)
    reprob: float = recipe_default(SupervisedArguments, "reprob", 0.0)


@dataclass
class SegmentationOptimizationArguments(OptimizationArguments):
    """Segmentation fine-tuning: smaller batches and learning rate."""

    per_device_train_batch_size: PositiveInt = recipe_default(OptimizationArguments, "per_device_train_batch_size", 8)
    per_device_eval_batch_size: PositiveInt = recipe_default(OptimizationArguments, "per_device_eval_batch_size", 8)
    learning_rate: float = recipe_default(OptimizationArguments, "learning_rate", 1e-4)
    weight_decay: float = recipe_default(OptimizationArguments, "weight_decay", 0.05)


# ---------------------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------------------


class TrainingArgumentParser(HfArgumentParser):
    """`HfArgumentParser` that reports what the dataclasses refuse (their `__post_init__` checks) and unknown
    arguments as argparse does: the usage, `error: <message>` and exit status 2, instead of a traceback."""

    def parse_args_into_dataclasses(self, args=None, **kwargs):
        try:
            return super().parse_args_into_dataclasses(args=args, **kwargs)
        except ValueError as error:
            self.error(str(error))


MOCO_ARGUMENTS = (DataArguments, ModelArguments, OptimizationArguments, OutputArguments, MocoArguments)
SUPERVISED_ARGUMENTS = (
    DataArguments,
    ModelArguments,
    SupervisedOptimizationArguments,
    OutputArguments,
    EvaluationArguments,
    SupervisedArguments,
)
LORA_ARGUMENTS = (
    DataArguments,
    ModelArguments,
    LoraOptimizationArguments,
    OutputArguments,
    EvaluationArguments,
    LoraSupervisedArguments,
    LoraArguments,
)
SEGMENTATION_ARGUMENTS = (
    DataArguments,
    ModelArguments,
    SegmentationOptimizationArguments,
    OutputArguments,
    EvaluationArguments,
    SegmentationArguments,
)


def moco_parser():
    """Parser of `scripts/train_moco.py`: the dataclasses of `MOCO_ARGUMENTS`, in `recipes.train_moco`'s order."""
    return TrainingArgumentParser(
        MOCO_ARGUMENTS, description="Self-supervised pre-training of CAST with MoCo v3 (Accelerate)."
    )


def supervised_parser():
    """Parser of `scripts/train_supervised.py`: `SUPERVISED_ARGUMENTS`, in `recipes.train_supervised`'s order."""
    return TrainingArgumentParser(
        SUPERVISED_ARGUMENTS,
        description="Supervised training of CAST for image classification, DeiT recipe (Accelerate).",
    )


def lora_parser():
    """Parser of `scripts/finetune_peft.py`: `LORA_ARGUMENTS`, in `lora.finetune_lora`'s order."""
    return TrainingArgumentParser(
        LORA_ARGUMENTS,
        description="LoRA fine-tuning of a CAST classifier with peft (Accelerate; streamed data supported).",
    )


def segmentation_parser():
    """Parser of `scripts/train_segmentation.py`: `SEGMENTATION_ARGUMENTS`, in
    `segmentation.train_segmentation`'s order."""
    return TrainingArgumentParser(
        SEGMENTATION_ARGUMENTS,
        description="Semantic-segmentation fine-tuning of CAST on image + mask pairs (Accelerate).",
    )


__all__ = [
    "LORA_ARGUMENTS",
    "MOCO_ARGUMENTS",
    "SEGMENTATION_ARGUMENTS",
    "SUPERVISED_ARGUMENTS",
    "DataArguments",
    "EvaluationArguments",
    "LoraArguments",
    "LoraOptimizationArguments",
    "LoraSupervisedArguments",
    "MocoArguments",
    "ModelArguments",
    "OptimizationArguments",
    "OutputArguments",
    "SegmentationArguments",
    "SegmentationOptimizationArguments",
    "SupervisedArguments",
    "SupervisedOptimizationArguments",
    "TrainingArgumentParser",
    "lora_parser",
    "moco_parser",
    "segmentation_parser",
    "supervised_parser",
]
