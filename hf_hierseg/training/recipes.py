"""The assembly every trainer shares (`TrainingRun`) and the two base recipes built on it: MoCo-v3 pre-training
(`train_moco`) and DeiT-style supervised classification (`train_supervised`).

A trainer is a `TrainingRun` (checks, seed, data and splits, image processor, accelerator, batches, evaluation hook,
model card fields, the loop) plus its own model, objective and views. LoRA (`lora.finetune_lora`), segmentation
(`segmentation.train_segmentation`) and the reproduction's pixel-only classifier
(`apps.reproduce.train_pixel_classifier`) are built the same way. `scripts/train_*.py` parse the arguments
(`arguments.moco_parser()` ...) and call the runners with the parsed dataclasses.
"""

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import datasets
import PIL.Image
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_seed
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from transformers import AutoConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from ..configuration_cast import CAST_PRESETS, CastConfig
from ..convert import load_original_checkpoint, momentum_encoder_from_original, parse_overrides
from ..errors import InvalidInputError
from ..image_datasets import image_column_of, label_column_of, label_names_of, load_image_datasets
from ..image_processing_cast import CastImageProcessor
from ..loading import is_hub_id, resolve_model_source
from ..modeling_cast import CastForImageClassification, CastForSelfSupervisedPretraining
from .augment import MOCO_VIEW_1, MOCO_VIEW_2, DeitTransform, MocoTransform, ProcessorTransform, RandAugment
from .data import SuperpixelBatches, TrainingBatches, evaluation_loader
from .loop import create_accelerator, sanitized_config, setup_logging, steps_for_epochs, train
from .moco import MocoObjective
from .supervised import SupervisedObjective, evaluate_classifier


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Checks, config, image processor, model
# ---------------------------------------------------------------------------------------------------------------


def check_arguments(data_args, optimization_args, output_args):
    """What the dataclasses cannot check alone: a data source, steps for streamed data, a valid Hub repo id."""
    if data_args.dataset_name is None and data_args.train_dir is None:
        raise InvalidInputError("Give --dataset_name or --train_dir.")
    if data_args.streaming and optimization_args.max_train_steps is None:
        raise InvalidInputError("A streamed dataset has no known length: give --max_train_steps.")
    if output_args.push_to_hub and output_args.hub_model_id is not None:
        try:
            validate_repo_id(output_args.hub_model_id)
        except HFValidationError as error:
            raise InvalidInputError(
                f"--hub_model_id {output_args.hub_model_id!r} is not a valid Hub repo id: {error}"
            ) from None


def check_model_source(model_args):
    """A model to start from: --model_name_or_path (an existing folder or a Hub id) or --config_name."""
    if model_args.model_name_or_path is not None:
        resolve_model_source(model_args.model_name_or_path)  # a clear error for a folder that does not exist
    elif model_args.config_name is None:
        raise InvalidInputError(
            "Give --model_name_or_path (a model folder or Hub id) or --config_name (a preset such as "
            f"{sorted(CAST_PRESETS)}, or a config folder) to train from scratch."
        )


def build_config(model_args, **fields):
    """Config of --model_name_or_path, or of --config_name (a preset or a config folder), with --config_overrides
    and `fields` applied."""
    check_model_source(model_args)
    overrides = {**parse_overrides(model_args.config_overrides), **fields}
    if model_args.model_name_or_path is not None:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.hub_revision, **overrides)
    if model_args.config_name in CAST_PRESETS:
        return CastConfig.from_preset(model_args.config_name, **overrides)
    return CastConfig.from_pretrained(model_args.config_name, **overrides)


def image_processor_for(model_args, config, superpixel_recipe, resample=None):
    """The image processor of the run: it computes the training views' superpixels and normalisation (`encode_view`)
    and is saved with the model, so inference computes superpixels as training did.

    It is that of --model_name_or_path (else a new one for the config's image size: shortest edge size / 0.875,
    centre crop size), with --image_size, --superpixel_method, --num_superpixels and the recipe's SEEDS settings
    (`superpixel_recipe`: `"self_supervised"` for MoCo, `"supervised"` for DeiT's truncation path) written into it."""
    processor = None
    if model_args.model_name_or_path is not None:
        try:
            processor = CastImageProcessor.from_pretrained(
                model_args.model_name_or_path, revision=model_args.hub_revision
            )
        except OSError:  # a model folder without preprocessor_config.json (e.g. a converted checkpoint)
            processor = None
    size = model_args.image_size or config.image_size
    if processor is None or model_args.image_size is not None:
        resize = {"shortest_edge": round(size / 0.875)}, {"height": size, "width": size}
        if processor is None:
            processor = CastImageProcessor(size=resize[0], crop_size=resize[1])
        processor.size, processor.crop_size = resize
    processor.superpixel_recipe = superpixel_recipe
    if model_args.superpixel_method is not None:
        processor.superpixel_method = model_args.superpixel_method
    if model_args.num_superpixels is not None:
        processor.num_superpixels = model_args.num_superpixels
    if resample is not None:
        processor.resample = resample
    return processor


def resolved_checkpoint_file(model_name_or_path, filename, revision=None):
    """Path of `filename` in a model folder or Hub repo (downloaded into the cache), or None if it has none."""
    folder = Path(model_name_or_path)
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    try:
        return cached_file(model_name_or_path, filename, revision=revision)
    except OSError:
        return None


def checkpoint_shapes(model_name_or_path, revision=None):
    """{name: shape} of the tensors of a safetensors checkpoint (one file or shards), read from the file headers
    without loading the tensors; {} for a checkpoint in another format."""
    index = resolved_checkpoint_file(model_name_or_path, SAFE_WEIGHTS_INDEX_NAME, revision)
    if index is not None:
        shards = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
        files = [resolved_checkpoint_file(model_name_or_path, shard, revision) for shard in shards]
    else:
        files = [resolved_checkpoint_file(model_name_or_path, SAFE_WEIGHTS_NAME, revision)]
    shapes = {}
    for file in filter(None, files):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def mismatched_weights(model_class, model_args, config):
    """[(name, checkpoint shape, model shape)] of the weights of --model_name_or_path whose shapes differ from those
    of `model_class(config)` (built without memory and without touching the random state)."""
    saved = checkpoint_shapes(model_args.model_name_or_path, model_args.hub_revision)
    with torch.random.fork_rng(devices=[]), init_empty_weights():
        model = model_class(config)
    prefix = f"{model.base_model_prefix}."
    mismatched = []
    for name, tensor in model.state_dict().items():
        shape = saved.get(name, saved.get(name.removeprefix(prefix)))
        if shape is not None and shape != tuple(tensor.shape):
            mismatched.append((name, shape, tuple(tensor.shape)))
    return mismatched


def load_or_create(model_class, model_args, config, ignore_mismatched_sizes=False):
    """A `model_class` with `config`: the weights of --model_name_or_path, or new ones (--config_name).

    Weights of the checkpoint with other shapes (a classifier for another number of classes) are started anew with
    `ignore_mismatched_sizes`; without it a `ValueError` names the weights, both class counts and the flag."""
    if model_args.model_name_or_path is None:
        return model_class(config)
    if not ignore_mismatched_sizes:
        mismatched = mismatched_weights(model_class, model_args, config)
        if mismatched:
            saved_labels = AutoConfig.from_pretrained(
                model_args.model_name_or_path, revision=model_args.hub_revision
            ).num_labels
            shapes = ", ".join(f"{name} {list(saved)} vs {list(new)}" for name, saved, new in mismatched[:4])
            raise InvalidInputError(
                f"{model_args.model_name_or_path} has {saved_labels} classes and this run {config.num_labels}: its "
                f"weights {shapes} do not fit. Pass --ignore_mismatched_sizes to start them anew."
            )
    return model_class.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        revision=model_args.hub_revision,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
    )


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def select_split(splits, name):
    if name not in splits:
        raise InvalidInputError(f"No split {name!r} in the dataset; splits: {list(splits)}.")
    return splits[name]


def limit(dataset, max_samples):
    if max_samples is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(max_samples)
    return dataset.select(range(min(max_samples, len(dataset))))


def evaluation_split(splits, train_split, evaluation_args, seed):
    """(train, evaluation) datasets: --validation_split_name, `validation`, `test`, or a held-out part of train."""
    for name in filter(None, (evaluation_args.validation_split_name, "validation", "test")):
        if name in splits:
            return train_split, splits[name]
        if name == evaluation_args.validation_split_name:
            raise InvalidInputError(f"No split {name!r} in the dataset; splits: {list(splits)}.")
    if isinstance(train_split, datasets.IterableDataset) or not evaluation_args.train_val_split:
        logger.warning("No evaluation split: training without evaluation.")
        return train_split, None
    held_out = train_split.train_test_split(test_size=evaluation_args.train_val_split, seed=seed)
    return held_out["train"], held_out["test"]


def hub_repo_id(name):
    """`name` if it names a Hub repo (not a local path), else None: what the model card may link to."""
    return name if name and not os.path.exists(name) and is_hub_id(name) else None


def dataset_card_fields(data_args):
    """`datasets` metadata of the model card (Hub ids only) and a one-line description of the data."""
    name = data_args.dataset_name or data_args.train_dir
    hub_ids = [data_args.dataset_name] if hub_repo_id(data_args.dataset_name) else []
    return {"datasets": hub_ids, "data": f"{name} ({'streamed' if data_args.streaming else 'map-style'})"}


@dataclasses.dataclass
class ClassLabels:
    """The target of classification: each record's class label in `column_name` (default: the first ClassLabel
    column)."""

    column_name: str | None = None
    batches_class = SuperpixelBatches

    def column(self, split, image_column):
        return label_column_of(split, self.column_name)

    def config_fields(self, split):
        """`id2label` and `label2id` of the classes of `split` (the config's `num_labels` follows)."""
        names = label_names_of(split, self.column(split, None))
        return {"id2label": dict(enumerate(names)), "label2id": {name: index for index, name in enumerate(names)}}


@dataclasses.dataclass
class Evaluation:
    """How a trainer is evaluated: the view of an evaluation image (`transform(image, rng)`) and
    `metrics(model, batches, accelerator) -> dict` over (batch, skipped) pairs, summed over processes."""

    transform: object
    metrics: object


class Evaluator:
    """The loop's evaluation hook (`evaluate(model, accelerator) -> metrics`): `metrics` over one pass of
    `batches`, and of the objective's EMA weights (if any), reported with an `_ema` suffix."""

    COUNTS = ("eval_samples", "eval_skipped_images")

    def __init__(self, batches, metrics, num_workers=0, worker_timeout=600.0, ema=None):
        self.batches = batches
        self.metrics = metrics
        self.num_workers = num_workers
        self.worker_timeout = worker_timeout
        self.ema = ema

    def evaluate(self, model, accelerator):
        """`metrics` over the evaluation batches; an `InvalidInputError` if not one image could be evaluated (an
        accuracy of nothing would read as 0)."""
        with contextlib.closing(evaluation_loader(self.batches, self.num_workers, self.worker_timeout)) as batches:
            metrics = self.metrics(model, batches, accelerator)
        if metrics.get("eval_samples") == 0:
            raise InvalidInputError(
                f"The evaluation split gave no image to evaluate ({metrics.get('eval_skipped_images', 0)} "
                "undecodable image(s) skipped): it is empty or none of its images decodes. Fix the data, or choose "
                "another split (--validation_split_name, --train_val_split)."
            )
        return metrics

    def __call__(self, model, accelerator):
        metrics = self.evaluate(model, accelerator)
        if self.ema is not None:
            ema_metrics = self.evaluate(self.ema.module, accelerator)
            metrics.update({f"{key}_ema": value for key, value in ema_metrics.items() if key not in self.COUNTS})
        return metrics


# ---------------------------------------------------------------------------------------------------------------
# The assembly
# ---------------------------------------------------------------------------------------------------------------


class TrainingRun:
    """What every trainer shares, in the order it happens: checks, seed, data (training split, evaluation split),
    config, image processor, then in `train`: accelerator, batches, evaluation hook, model card fields and the loop.

    Args:
        data_args, model_args, optimization_args, output_args: the run's `arguments` dataclasses.
        evaluation_args: an `arguments.EvaluationArguments` for trainers that evaluate (None: no evaluation split).
        recipe_args: the trainer's own dataclasses (logged with the others as the run's hyper-parameters).
    """

    def __init__(self, data_args, model_args, optimization_args, output_args, evaluation_args=None, recipe_args=()):
        check_arguments(data_args, optimization_args, output_args)
        self.data_args = data_args
        self.model_args = model_args
        self.optimization_args = optimization_args
        self.output_args = output_args
        self.evaluation_args = evaluation_args
        self.settings = tuple(
            filter(None, (data_args, model_args, optimization_args, output_args, evaluation_args, *recipe_args))
        )
        self.accelerator = None  # created by `train`, once the trainer knows its DDP settings
        set_seed(optimization_args.seed)
        splits = load_image_datasets(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.train_dir,
            data_args.validation_dir,
            data_args.streaming,
            data_args.cache_dir,
            output_args.hub_token,
        )
        train_split, eval_split = select_split(splits, data_args.train_split_name), None
        if evaluation_args is not None:
            train_split, eval_split = evaluation_split(splits, train_split, evaluation_args, optimization_args.seed)
            eval_split = limit(eval_split, evaluation_args.max_eval_samples) if eval_split is not None else None
        self.train_split = limit(train_split, data_args.max_train_samples)
        self.eval_split = eval_split

    def config(self, **fields):
        """The model's config (`build_config`) with `fields` set."""
        return build_config(self.model_args, **fields)

    def image_processor(self, config, superpixel_recipe, resample=None):
        """The run's image processor (`image_processor_for`)."""
        return image_processor_for(self.model_args, config, superpixel_recipe, resample)

    def view_size(self, config):
        """Side of the training views: --image_size, else the config's image size."""
        return self.model_args.image_size or config.image_size

    def batches(self, split, transform, targets, batch_size, accelerator, training):
        """This process's batches of `split`: shuffled, full batches with `training`; in order, the last one kept
        without."""
        image_column = image_column_of(split, self.data_args.image_column_name)
        batches_class = targets.batches_class if targets is not None else SuperpixelBatches
        return batches_class(
            split,
            transform,
            batch_size,
            image_column,
            targets.column(split, image_column) if targets is not None else None,
            seed=self.optimization_args.seed,
            shuffle=training,
            shuffle_buffer_size=self.data_args.shuffle_buffer_size,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            drop_last=training,
            return_keys=training and self.data_args.log_sample_keys,
        )

    def train(
        self,
        objective,
        transform,
        processor=None,
        targets=None,
        evaluation=None,
        find_unused_parameters=False,
        sync_batch_norm=False,
    ):
        """Train `objective` on views made by `transform(image, rng)`; save the model with `processor`.

        Args:
            objective: the trainer's objective (see `loop`).
            transform: the training view of a record's image.
            processor: the image processor saved beside the model (None: none saved).
            targets: what each record gives besides its image (`ClassLabels`, `segmentation.SegmentationMasks`), or
                None for images only.
            evaluation: an `Evaluation`, run on the evaluation split (if there is one) every --eval_steps and at the
                end.
            find_unused_parameters: for DDP, when some trainable parameters get no gradient.
            sync_batch_norm: batch statistics over the global batch on several GPUs (`torch.nn.SyncBatchNorm`).
        Returns the final metrics.
        """
        data, optimization = self.data_args, self.optimization_args
        accelerator = self.accelerator = create_accelerator(self.output_args, find_unused_parameters)
        setup_logging(accelerator)
        if sync_batch_norm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective.training_module())  # in place
        batches = self.batches(
            self.train_split, transform, targets, optimization.per_device_train_batch_size, accelerator, training=True
        )
        max_steps = optimization.max_train_steps
        if max_steps is None:
            per_epoch = batches.batches_per_epoch(max(1, data.dataloader_num_workers))
            max_steps = steps_for_epochs(
                optimization.num_train_epochs, per_epoch, optimization.gradient_accumulation_steps
            )
        training_batches = TrainingBatches(
            batches,
            data.dataloader_num_workers,
            pin_memory=accelerator.device.type == "cuda",
            worker_timeout=data.dataloader_timeout,
        )
        evaluate = None
        if evaluation is not None and self.eval_split is not None:
            evaluate = Evaluator(
                self.batches(
                    self.eval_split,
                    evaluation.transform,
                    targets,
                    optimization.per_device_eval_batch_size,
                    accelerator,
                    training=False,
                ),
                evaluation.metrics,
                data.dataloader_num_workers,
                data.dataloader_timeout,
                ema=getattr(objective, "ema", None),
            )
        card = {"base_model": hub_repo_id(self.model_args.model_name_or_path), **dataset_card_fields(data)}
        return train(
            accelerator,
            objective,
            training_batches,
            optimization,
            self.output_args,
            max_steps,
            processor=processor,
            evaluate=evaluate,
            eval_steps=self.evaluation_args.eval_steps if self.evaluation_args is not None else None,
            card=card,
            log_sample_keys=data.log_sample_keys,
            hyperparameters={**sanitized_config(self.settings), "max_train_steps": max_steps},
        )

    def train_classifier(
        self, objective, config, supervised_args, find_unused_parameters=False, evaluate=True, save_processor=True
    ):
        """`train` with DeiT's views (`deit_transform`) through the DeiT recipe's processor, class labels as
        targets and top-1 accuracy on the evaluation split (`evaluate`)."""
        processor = self.image_processor(config, "supervised", resample=PIL.Image.BICUBIC)
        return self.train(
            objective,
            deit_transform(processor, self.view_size(config), supervised_args),
            processor if save_processor else None,
            targets=ClassLabels(supervised_args.label_column_name),
            evaluation=Evaluation(ProcessorTransform(processor), evaluate_classifier) if evaluate else None,
            find_unused_parameters=find_unused_parameters,
        )


def deit_transform(processor, size, supervised_args):
    """DeiT's training view with the settings of an `arguments.SupervisedArguments`."""
    rand_augment = None
    if supervised_args.rand_augment_num_ops > 0:
        rand_augment = RandAugment(supervised_args.rand_augment_num_ops, supervised_args.rand_augment_magnitude)
    return DeitTransform(
        processor,
        size,
        rand_augment,
        crop_scale=(supervised_args.crop_min_scale, 1.0),
        erasing_probability=supervised_args.reprob,
    )


def supervised_objective(model, optimization_args, supervised_args, ema_decay=None, objective_class=None):
    """The DeiT objective (label smoothing, Mixup / CutMix) of an `arguments.SupervisedArguments`."""
    objective_class = objective_class or SupervisedObjective
    return objective_class(
        model,
        supervised_args.label_smoothing,
        supervised_args.mixup,
        supervised_args.cutmix,
        supervised_args.mixup_prob,
        supervised_args.mixup_switch_prob,
        ema_decay,
        seed=optimization_args.seed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------


def train_moco(data_args, model_args, optimization_args, output_args, moco_args):
    """MoCo-v3 pre-training of a `CastForSelfSupervisedPretraining`, with the dataclasses of
    `arguments.moco_parser()` in its order. Returns the final metrics."""
    check_model_source(model_args)
    run = TrainingRun(data_args, model_args, optimization_args, output_args, recipe_args=(moco_args,))
    config = run.config()
    model = load_or_create(CastForSelfSupervisedPretraining, model_args, config)
    objective = MocoObjective(model, moco_args.moco_temperature, moco_args.moco_momentum)
    if moco_args.momentum_encoder_checkpoint:
        original = load_original_checkpoint(moco_args.momentum_encoder_checkpoint)
        objective.module.load_momentum_encoder(momentum_encoder_from_original(original, config))
    processor = run.image_processor(config, "self_supervised")
    crop_scale = (moco_args.crop_min_scale, 1.0)
    views = tuple(dataclasses.replace(view, crop_scale=crop_scale) for view in (MOCO_VIEW_1, MOCO_VIEW_2))
    transform = MocoTransform(processor, run.view_size(config), views=views)
    # Batch statistics over the global batch, as MoCo v3 (SyncBatchNorm runs on GPUs only).
    return run.train(
        objective,
        transform,
        processor,
        find_unused_parameters=not config.freeze_last_pooling,
        sync_batch_norm=True,
    )


def train_supervised(data_args, model_args, optimization_args, output_args, evaluation_args, supervised_args):
    """DeiT-style training of a `CastForImageClassification`, with the dataclasses of
    `arguments.supervised_parser()` in its order. Returns the final metrics."""
    check_model_source(model_args)
    run = TrainingRun(
        data_args, model_args, optimization_args, output_args, evaluation_args, recipe_args=(supervised_args,)
    )
    config = run.config(**ClassLabels(supervised_args.label_column_name).config_fields(run.train_split))
    model = load_or_create(CastForImageClassification, model_args, config, supervised_args.ignore_mismatched_sizes)
    ema_decay = supervised_args.model_ema_decay if supervised_args.model_ema else None
    objective = supervised_objective(model, optimization_args, supervised_args, ema_decay)
    return run.train_classifier(
        objective, config, supervised_args, find_unused_parameters=not config.freeze_last_pooling
    )


__all__ = [
    "ClassLabels",
    "Evaluation",
    "Evaluator",
    "TrainingRun",
    "build_config",
    "deit_transform",
    "image_processor_for",
    "load_or_create",
    "supervised_objective",
    "train_moco",
    "train_supervised",
]
