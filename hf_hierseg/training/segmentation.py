"""Semantic-segmentation fine-tuning of `CastForSemanticSegmentation` on image + mask pairs.

Masks become integer class-id maps (`mask_to_class_ids`): palette ("P") and grayscale images give their pixel
values; RGB(A) colour masks need a `palette` (one colour per class id) unless their three channels are equal
(grayscale saved as RGB). Ids must lie in `0..num_labels-1` or equal the ignore index (255 by default), else a
`ValueError` names them. Image and mask must have the same size.

Training views: a random resized crop and a horizontal flip applied to the image (bilinear) and to the mask (nearest)
with the same random draws, optional colour jitter of the image, then superpixels on the augmented 8-bit image and
normalisation (`augment.ViewEncoder`). Evaluation views: image and mask resized to `size` x `size`; the mIoU is
computed at that resolution with `hf_hierseg.evaluation.metrics.mean_iou`.
"""

import copy
import json
import logging

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from PIL import Image, ImageOps
from transformers import AutoModelForSemanticSegmentation

from ..evaluation.metrics import mean_iou
from ..image_datasets import (
    check_class_ids,
    decode_mask,
    image_column_of,
    load_image_datasets,
    mask_column_of,
    mask_to_class_ids,
    normalize_palette,
    reduce_mask_labels,
)
from ..modeling_cast import CastForSemanticSegmentation
from .arguments import common_parser, positive_int
from .augment import color_jitter, random_resized_crop
from .data import SuperpixelBatches, TrainingBatches, evaluation_loader
from .loop import create_accelerator, setup_logging, steps_for_epochs, train
from .recipes import (
    build_config,
    check_arguments,
    dataset_card_fields,
    evaluation_split,
    image_processor_and_encoder,
    is_hub_id,
    limit,
    select_split,
)


logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------------


class SegmentationTransform:
    """Image + mask -> `{"pixel_values" [3, S, S], "superpixels" [S, S], "labels" [S, S]}`.

    Args:
        encoder: an `augment.ViewEncoder` (superpixels on the 8-bit view, then normalisation).
        size: output side S.
        num_labels, ignore_index, palette, reduce_labels: how masks become class ids (module docstring).
        train: random resized crop + flip (+ jitter) when True; a plain resize when False.
        crop_scale: area range of the random crops; flip_probability; jitter_probability: colour jitter of the image.
    """

    def __init__(
        self,
        encoder,
        size,
        num_labels,
        ignore_index=255,
        palette=None,
        reduce_labels=False,
        train=True,
        crop_scale=(0.25, 1.0),
        flip_probability=0.5,
        jitter_probability=0.0,
    ):
        self.encoder = encoder
        self.size = size
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.palette = palette
        self.reduce_labels = reduce_labels
        self.train = train
        self.crop_scale = crop_scale
        self.flip_probability = flip_probability
        self.jitter_probability = jitter_probability

    def class_ids(self, mask):
        class_ids = mask_to_class_ids(mask, self.palette)
        if self.reduce_labels:
            class_ids = reduce_mask_labels(class_ids, self.ignore_index)
        check_class_ids(class_ids, self.num_labels, self.ignore_index)
        return class_ids

    def geometric(self, image, mask, rng):
        """The same crop box and flip for both: `random_resized_crop` draws its box from `rng` and the image size
        only, so a copy of the generator taken before the image's crop gives the mask the same box."""
        if not self.train:
            return (
                image.resize((self.size, self.size), Image.BILINEAR),
                mask.resize((self.size, self.size), Image.NEAREST),
            )
        mask_rng = copy.deepcopy(rng)
        image = random_resized_crop(image, self.size, rng, scale=self.crop_scale, resample=Image.BILINEAR)
        mask = random_resized_crop(mask, self.size, mask_rng, scale=self.crop_scale, resample=Image.NEAREST)
        if rng.random() < self.flip_probability:
            image, mask = ImageOps.mirror(image), ImageOps.mirror(mask)
        return image, mask

    def __call__(self, image, mask, rng=None):
        class_ids = self.class_ids(mask)
        if (image.height, image.width) != class_ids.shape:
            raise ValueError(
                f"Mask size {class_ids.shape[1]}x{class_ids.shape[0]} (WxH) differs from the image size "
                f"{image.width}x{image.height}: every mask must cover its image pixel for pixel."
            )
        if self.train and rng is None:
            raise ValueError("Training views need a numpy random Generator `rng`.")
        mask = Image.fromarray(class_ids.astype(np.int32), mode="I")
        image, mask = self.geometric(image.convert("RGB"), mask, rng)
        if self.train and self.jitter_probability and rng.random() < self.jitter_probability:
            image = color_jitter(image, rng)
        pixel_values, superpixels = self.encoder(np.asarray(image, dtype=np.uint8))
        labels = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
        return {"pixel_values": pixel_values, "superpixels": superpixels, "labels": labels}


class SegmentationBatches(SuperpixelBatches):
    """`SuperpixelBatches` of image + mask pairs: each record's mask (column `mask_column`) goes through the joint
    `SegmentationTransform` with its image. Records whose mask does not decode are skipped with a warning."""

    def __init__(self, dataset, transform, batch_size, image_column, mask_column, **kwargs):
        columns = dataset.features or {}
        if columns and mask_column not in columns:
            raise ValueError(f"Mask column {mask_column!r} is not a column; columns: {list(columns)}.")
        if isinstance(columns.get(mask_column), datasets.Image):
            dataset = dataset.cast_column(mask_column, datasets.Image(decode=False))
        super().__init__(dataset, self.transform_pair, batch_size, image_column, None, **kwargs)
        self.pair_transform = transform
        self.mask_column = mask_column
        self.current_mask = None

    def slot_records(self, slot, num_slots, start):
        # `SuperpixelBatches.__iter__` decodes and transforms each record right after it is yielded here, so the
        # mask of the record being transformed is kept at hand for `transform_pair`.
        for position, example in super().slot_records(slot, num_slots, start):
            try:
                self.current_mask = decode_mask(example[self.mask_column])
            except Exception as error:  # PIL raises many types for corrupt files
                logger.warning(
                    "Skipping record %d of slot %d (epoch %d): its mask does not decode (%s: %s).",
                    position,
                    slot,
                    self.epoch,
                    type(error).__name__,
                    error,
                )
                continue
            yield position, example

    def transform_pair(self, image, rng):
        return self.pair_transform(image, self.current_mask, rng)


# --------------------------------------------------------------------------------------------------------------
# Objective and evaluation
# --------------------------------------------------------------------------------------------------------------


class SegmentationObjective:
    """Pixel-wise cross-entropy of `CastForSemanticSegmentation` for `hf_hierseg.training.loop.train`."""

    name = "semantic segmentation"
    pipeline_tag = "image-segmentation"

    def __init__(self, model):
        self.module = model

    def training_module(self):
        return self.module

    def compute_loss(self, module, batch, step, micro_step, accelerator):
        outputs = module(pixel_values=batch["pixel_values"], superpixels=batch["superpixels"], labels=batch["labels"])
        labels = batch["labels"]
        valid = labels != self.module.ignore_index
        correct = (outputs.logits.argmax(1) == labels) & valid
        accuracy = correct.sum().item() / max(valid.sum().item(), 1)
        return outputs.loss, {"train_pixel_accuracy": accuracy}

    def after_optimizer_step(self, module, step, total_steps, accelerator):
        return {}

    def pretrained_model(self, module, accelerator):
        return self.module

    def save_state(self, directory):
        pass

    def load_state(self, directory):
        pass

    def card_details(self):
        return {
            "loss": f"pixel cross-entropy, ignore index {self.module.ignore_index}",
            "head": getattr(self.module.config, "segmentation_head_type", "linear"),
        }


@torch.no_grad()
def evaluate_segmentation(model, batches, accelerator):
    """mIoU, mean accuracy and pixel accuracy of `model` (unwrapped) over (batch, skipped) pairs, all processes.

    Label maps are gathered to every process and scored by `hf_hierseg.evaluation.metrics.mean_iou`."""
    was_training = model.training
    model.eval()
    predictions, references, skipped = [], [], 0
    for batch, batch_skipped in batches:
        skipped += batch_skipped
        if "pixel_values" not in batch:
            continue
        logits = model(
            pixel_values=batch["pixel_values"].to(accelerator.device),
            superpixels=batch["superpixels"].to(accelerator.device),
        ).logits
        predictions += [p.astype(np.int32) for p in logits.argmax(1).cpu().numpy()]
        references += [r.astype(np.int32) for r in batch["labels"].numpy()]
    model.train(was_training)
    predictions, references = gather_object(predictions), gather_object(references)
    skipped = int(sum(gather_object([skipped])))
    if not references:
        return {"eval_samples": 0, "eval_skipped_images": skipped}
    scores = mean_iou(predictions, references, model.config.num_labels, ignore_index=model.ignore_index)
    metrics = {
        "eval_mean_iou": float(scores["mean_iou"]),
        "eval_mean_accuracy": float(scores["mean_accuracy"]),
        "eval_overall_accuracy": float(scores["overall_accuracy"]),
        "eval_samples": len(references),
        "eval_skipped_images": skipped,
    }
    names = model.config.id2label
    for index, iou in enumerate(scores["per_category_iou"]):
        if not np.isnan(iou):
            metrics[f"eval_iou_{names.get(index, index)}"] = float(iou)
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------------------


def segmentation_parser():
    parser = common_parser("Semantic-segmentation fine-tuning of CAST on image + mask pairs (Accelerate).")
    parser.add_argument(
        "--label_column_name",
        type=str,
        default=None,
        help="Column with the masks (default: a column named mask/label/annotation/..., else the "
        "second Image column).",
    )
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
    parser.add_argument("--num_labels", type=positive_int, default=None, help="Number of classes.")
    parser.add_argument(
        "--id2label", type=str, default=None, help="JSON file {class id: name} (sets --num_labels to its length)."
    )
    parser.add_argument("--ignore_index", type=int, default=255, help="Mask value that is not a class.")
    parser.add_argument(
        "--reduce_labels",
        action="store_true",
        help="Mask 0 is background to ignore; classes start at 1 (ADE20k convention).",
    )
    parser.add_argument(
        "--palette",
        type=str,
        default=None,
        help='JSON file: a list of [r, g, b] colours (index = class id) or {"#rrggbb": id}, to read RGB colour masks.',
    )
    parser.add_argument("--crop_min_scale", type=float, default=0.25, help="Smallest crop area of the training views.")
    parser.add_argument("--jitter_probability", type=float, default=0.0, help="Colour jitter of training images.")
    parser.add_argument(
        "--segmentation_head_type",
        type=str,
        default=None,
        choices=("linear", "mlp_projector"),
        help="Head of a new model (default: the checkpoint's, else linear).",
    )
    parser.add_argument("--max_eval_samples", type=positive_int, default=None)
    parser.add_argument("--eval_steps", type=int, default=None, help="Evaluate (mIoU) every N steps and at the end.")
    parser.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="Load a checkpoint whose head has another number of classes (re-initialised).",
    )
    parser.set_defaults(
        learning_rate=1e-4, weight_decay=0.05, per_device_train_batch_size=8, per_device_eval_batch_size=8
    )
    return parser


def label_settings(args):
    """`num_labels`, `id2label` and `label2id` from --id2label or --num_labels."""
    if args.id2label is not None:
        with open(args.id2label, encoding="utf-8") as handle:
            id2label = {int(key): str(value) for key, value in json.load(handle).items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"--id2label {args.id2label} must map the ids 0..N-1, got {sorted(id2label)[:10]} ...")
        if args.num_labels is not None and args.num_labels != len(id2label):
            raise ValueError(f"--num_labels {args.num_labels} contradicts --id2label ({len(id2label)} classes).")
    elif args.num_labels is not None:
        id2label = {index: str(index) for index in range(args.num_labels)}
    else:
        raise ValueError("Give --num_labels or --id2label (a JSON file {id: name}).")
    if args.ignore_index in id2label:
        raise ValueError(f"--ignore_index {args.ignore_index} is also a class id; choose another ignore index.")
    return {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {name: index for index, name in id2label.items()},
    }


def load_palette(path):
    """The --palette JSON file (checked here, so a malformed palette fails before training starts)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        palette = json.load(handle)
    normalize_palette(palette)
    return palette


def build_model(args, config):
    if args.model_name_or_path is None:
        return CastForSemanticSegmentation(config)
    return AutoModelForSemanticSegmentation.from_pretrained(
        args.model_name_or_path,
        config=config,
        revision=args.hub_revision,
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
    )


def train_segmentation(args):
    """Fine-tune a `CastForSemanticSegmentation`. Returns the final metrics."""
    check_arguments(args)
    set_seed(args.seed)
    labels = label_settings(args)
    palette = load_palette(args.palette)
    fields = dict(labels, freeze_last_pooling=False, semantic_loss_ignore_index=args.ignore_index)
    if args.segmentation_head_type is not None:
        fields["segmentation_head_type"] = args.segmentation_head_type
    config = build_config(args, **fields)
    model = build_model(args, config)

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
    mask_column = mask_column_of(train_split, image_column, args.label_column_name)

    accelerator = create_accelerator(args)
    setup_logging(accelerator)
    processor, encoder = image_processor_and_encoder(args, config, "self_supervised")
    size = args.image_size or config.image_size
    # No centre crop for segmentation: the saved processor resizes to size x size, as the evaluation views do, so
    # `post_process_semantic_segmentation(target_sizes=...)` maps predictions back onto the whole original image.
    processor.do_center_crop = False
    processor.size = {"height": size, "width": size}
    mask_settings = dict(
        num_labels=labels["num_labels"],
        ignore_index=args.ignore_index,
        palette=palette,
        reduce_labels=args.reduce_labels,
    )
    transform = SegmentationTransform(
        encoder,
        size,
        train=True,
        crop_scale=(args.crop_min_scale, 1.0),
        jitter_probability=args.jitter_probability,
        **mask_settings,
    )
    batches = SegmentationBatches(
        train_split,
        transform,
        args.per_device_train_batch_size,
        image_column,
        mask_column,
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
    training = TrainingBatches(
        batches,
        args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
        worker_timeout=args.dataloader_timeout,
    )

    evaluate = None
    if eval_split is not None:
        eval_split = limit(eval_split, args.max_eval_samples)
        eval_image_column = image_column_of(eval_split, args.image_column_name)
        eval_batches = SegmentationBatches(
            eval_split,
            SegmentationTransform(encoder, size, train=False, **mask_settings),
            args.per_device_eval_batch_size,
            eval_image_column,
            mask_column_of(eval_split, eval_image_column, args.label_column_name),
            shuffle=False,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            drop_last=False,
        )

        def evaluate(model, accelerator):
            loader = evaluation_loader(eval_batches, args.dataloader_num_workers, args.dataloader_timeout)
            return evaluate_segmentation(model, loader, accelerator)

    card = {
        "base_model": args.model_name_or_path if is_hub_id(args.model_name_or_path) else None,
        **dataset_card_fields(args),
    }
    return train(args, accelerator, SegmentationObjective(model), training, processor, evaluate=evaluate, card=card)


__all__ = [
    "SegmentationBatches",
    "SegmentationObjective",
    "SegmentationTransform",
    "evaluate_segmentation",
    "segmentation_parser",
    "train_segmentation",
]
