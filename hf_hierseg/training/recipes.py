"""The two training recipes, assembled from command-line arguments: MoCo-v3 pre-training (`train_moco`) and
DeiT-style supervised classification (`train_supervised`). `scripts/train_*.py` parse the arguments and call these."""

import dataclasses
import logging
import os

import datasets
import PIL.Image
import torch
from accelerate.utils import set_seed
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForImageClassification

from ..configuration_cast import CAST_PRESETS, CastConfig
from ..convert import load_original_checkpoint, momentum_encoder_from_original, parse_overrides
from ..image_datasets import image_column_of, label_column_of, label_names_of, load_image_datasets
from ..image_processing_cast import CastImageProcessor
from ..modeling_cast import CastForImageClassification, CastForSelfSupervisedPretraining
from .augment import (
    MOCO_VIEW_1,
    MOCO_VIEW_2,
    DeitTransform,
    MocoTransform,
    ProcessorTransform,
    RandAugment,
    ViewEncoder,
)
from .data import SuperpixelBatches, TrainingBatches, evaluation_loader
from .loop import create_accelerator, setup_logging, steps_for_epochs, train
from .moco import MocoObjective
from .supervised import SupervisedObjective, evaluate_classifier


logger = logging.getLogger(__name__)


def check_arguments(args):
    if args.model_name_or_path is None and args.config_name is None:
        raise ValueError(
            "Give --model_name_or_path (a model folder or Hub id) or --config_name (a preset such as "
            f"{sorted(CAST_PRESETS)}, or a config folder) to train from scratch."
        )
    if args.dataset_name is None and args.train_dir is None:
        raise ValueError("Give --dataset_name or --train_dir.")
    if args.streaming and args.max_train_steps is None:
        raise ValueError("A streamed dataset has no known length: give --max_train_steps.")
    if args.push_to_hub and args.hub_model_id is not None:
        try:
            validate_repo_id(args.hub_model_id)
        except HFValidationError as error:
            raise ValueError(f"--hub_model_id {args.hub_model_id!r} is not a valid Hub repo id: {error}") from None


def build_config(args, **fields):
    """Config of --model_name_or_path, or of --config_name (a preset or a config folder), with --config_overrides
    and `fields` applied."""
    overrides = {**parse_overrides(args.config_overrides), **fields}
    if args.model_name_or_path is not None:
        return AutoConfig.from_pretrained(args.model_name_or_path, revision=args.hub_revision, **overrides)
    if args.config_name in CAST_PRESETS:
        return CastConfig.from_preset(args.config_name, **overrides)
    return CastConfig.from_pretrained(args.config_name, **overrides)


def image_processor_and_encoder(args, config, seeds_recipe, resample=None):
    """The image processor saved with the model and the `ViewEncoder` of the training views.

    The processor is that of --model_name_or_path (else a new one for the config's image size: shortest edge
    size / 0.875, centre crop size); --superpixel_method / --num_superpixels and the recipe's SEEDS settings
    (`"self_supervised"` for MoCo, `"supervised"` for DeiT) are written into it, so inference computes superpixels as
    training did."""
    processor = None
    if args.model_name_or_path is not None:
        try:
            processor = CastImageProcessor.from_pretrained(args.model_name_or_path, revision=args.hub_revision)
        except OSError:  # a model folder without preprocessor_config.json (e.g. a converted checkpoint)
            processor = None
    size = args.image_size or config.image_size
    if processor is None or args.image_size is not None:
        resize = {"shortest_edge": round(size / 0.875)}, {"height": size, "width": size}
        if processor is None:
            processor = CastImageProcessor(size=resize[0], crop_size=resize[1])
        processor.size, processor.crop_size = resize
    processor.superpixel_recipe = seeds_recipe
    if args.superpixel_method is not None:
        processor.superpixel_method = args.superpixel_method
    if args.num_superpixels is not None:
        processor.num_superpixels = args.num_superpixels
    if resample is not None:
        processor.resample = resample
    encoder = ViewEncoder(
        processor.superpixel_method,
        processor.num_superpixels,
        seeds_recipe,
        processor.image_mean,
        processor.image_std,
        processor.superpixel_reference_size,
    )
    return processor, encoder


def select_split(splits, name):
    if name not in splits:
        raise ValueError(f"No split {name!r} in the dataset; splits: {list(splits)}.")
    return splits[name]


def limit(dataset, max_samples):
    if max_samples is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(max_samples)
    return dataset.select(range(min(max_samples, len(dataset))))


def training_batches(args, accelerator, dataset, transform, image_column, label_column=None):
    """This process's `TrainingBatches`; also sets `args.max_train_steps` from --num_train_epochs if needed."""
    batches = SuperpixelBatches(
        dataset,
        transform,
        args.per_device_train_batch_size,
        image_column,
        label_column,
        seed=args.seed,
        shuffle=True,
        shuffle_buffer_size=args.shuffle_buffer_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        drop_last=True,
        return_keys=args.log_sample_keys,
    )
    if args.max_train_steps is None:
        per_epoch = batches.batches_per_epoch(max(1, args.dataloader_num_workers))
        args.max_train_steps = steps_for_epochs(args.num_train_epochs, per_epoch, args.gradient_accumulation_steps)
    return TrainingBatches(
        batches,
        args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
        worker_timeout=args.dataloader_timeout,
    )


def dataset_card_fields(args):
    """`datasets` metadata of the model card (Hub ids only) and a one-line description of the data."""
    name = args.dataset_name or args.train_dir
    hub_ids = [args.dataset_name] if is_hub_id(args.dataset_name) else []
    return {"datasets": hub_ids, "data": f"{name} ({'streamed' if args.streaming else 'map-style'})"}


def train_moco(args):
    """MoCo-v3 pre-training of a `CastForSelfSupervisedPretraining`. Returns the final metrics."""
    check_arguments(args)
    set_seed(args.seed)
    config = build_config(args)
    if args.model_name_or_path is not None:
        model = CastForSelfSupervisedPretraining.from_pretrained(
            args.model_name_or_path, config=config, revision=args.hub_revision
        )
    else:
        model = CastForSelfSupervisedPretraining(config)
    accelerator = create_accelerator(args, find_unused_parameters=not config.freeze_last_pooling)
    setup_logging(accelerator)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # Batch statistics over the global batch, as MoCo v3 (SyncBatchNorm runs on GPUs only).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    objective = MocoObjective(model, args.moco_temperature, args.moco_momentum)
    if args.momentum_encoder_checkpoint:
        original = load_original_checkpoint(args.momentum_encoder_checkpoint)
        objective.module.load_momentum_encoder(momentum_encoder_from_original(original, config))

    processor, encoder = image_processor_and_encoder(args, config, "self_supervised")
    size = args.image_size or config.image_size
    crop_scale = (args.crop_min_scale, 1.0)
    transform = MocoTransform(
        encoder,
        size,
        views=(
            dataclasses.replace(MOCO_VIEW_1, crop_scale=crop_scale),
            dataclasses.replace(MOCO_VIEW_2, crop_scale=crop_scale),
        ),
    )
    splits = load_image_datasets(
        args.dataset_name,
        args.dataset_config_name,
        args.train_dir,
        None,
        args.streaming,
        args.cache_dir,
        args.hub_token,
    )
    train_split = limit(select_split(splits, args.train_split_name), args.max_train_samples)
    batches = training_batches(
        args, accelerator, train_split, transform, image_column_of(train_split, args.image_column_name)
    )
    card = {
        "base_model": args.model_name_or_path if is_hub_id(args.model_name_or_path) else None,
        **dataset_card_fields(args),
    }
    return train(args, accelerator, objective, batches, processor, card=card)


def is_hub_id(name):
    return bool(name) and "/" in name and not os.path.exists(name) and not name.startswith((".", "/"))


def evaluation_split(splits, train_split, args):
    """(train, evaluation) datasets: --validation_split_name, `validation`, `test`, or a held-out part of train."""
    for name in filter(None, (args.validation_split_name, "validation", "test")):
        if name in splits:
            return train_split, splits[name]
        if name == args.validation_split_name:
            raise ValueError(f"No split {name!r} in the dataset; splits: {list(splits)}.")
    if isinstance(train_split, datasets.IterableDataset) or not args.train_val_split:
        logger.warning("No evaluation split: training without evaluation.")
        return train_split, None
    held_out = train_split.train_test_split(test_size=args.train_val_split, seed=args.seed)
    return held_out["train"], held_out["test"]


def train_supervised(args):
    """DeiT-style training of a `CastForImageClassification`. Returns the final metrics."""
    check_arguments(args)
    set_seed(args.seed)
    splits = load_image_datasets(
        args.dataset_name,
        args.dataset_config_name,
        args.train_dir,
        args.validation_dir,
        args.streaming,
        args.cache_dir,
        args.hub_token,
    )
    train_split, eval_split = evaluation_split(splits, select_split(splits, args.train_split_name), args)
    train_split = limit(train_split, args.max_train_samples)
    image_column = image_column_of(train_split, args.image_column_name)
    label_column = label_column_of(train_split, args.label_column_name)
    names = label_names_of(train_split, label_column)
    config = build_config(
        args,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
    )
    if args.model_name_or_path is not None:
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path,
            config=config,
            revision=args.hub_revision,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        )
    else:
        model = CastForImageClassification(config)
    accelerator = create_accelerator(args, find_unused_parameters=not config.freeze_last_pooling)
    setup_logging(accelerator)
    objective = SupervisedObjective(
        model,
        args.label_smoothing,
        args.mixup,
        args.cutmix,
        args.mixup_prob,
        args.mixup_switch_prob,
        args.model_ema_decay if args.model_ema else None,
        seed=args.seed,
    )

    processor, encoder = image_processor_and_encoder(args, config, "supervised", resample=PIL.Image.BICUBIC)
    size = args.image_size or config.image_size
    rand_augment = (
        RandAugment(args.rand_augment_num_ops, args.rand_augment_magnitude) if args.rand_augment_num_ops > 0 else None
    )
    transform = DeitTransform(
        encoder, size, rand_augment, crop_scale=(args.crop_min_scale, 1.0), erasing_probability=args.reprob
    )
    batches = training_batches(args, accelerator, train_split, transform, image_column, label_column)

    evaluate = None
    if eval_split is not None:
        eval_split = limit(eval_split, args.max_eval_samples)
        eval_batches = SuperpixelBatches(
            eval_split,
            ProcessorTransform(processor),
            args.per_device_eval_batch_size,
            image_column_of(eval_split, args.image_column_name),
            label_column_of(eval_split, args.label_column_name),
            shuffle=False,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            drop_last=False,
        )

        def evaluate(model, accelerator):
            loader = evaluation_loader(eval_batches, args.dataloader_num_workers, args.dataloader_timeout)
            metrics = evaluate_classifier(model, loader, accelerator)
            if objective.ema is not None:
                loader = evaluation_loader(eval_batches, args.dataloader_num_workers, args.dataloader_timeout)
                ema_metrics = evaluate_classifier(objective.ema.module, loader, accelerator)
                metrics.update(
                    {
                        f"{key}_ema": value
                        for key, value in ema_metrics.items()
                        if key in ("eval_accuracy", "eval_loss")
                    }
                )
            return metrics

    card = {
        "base_model": args.model_name_or_path if is_hub_id(args.model_name_or_path) else None,
        **dataset_card_fields(args),
    }
    return train(args, accelerator, objective, batches, processor, evaluate=evaluate, card=card)


__all__ = ["build_config", "train_moco", "train_supervised"]
