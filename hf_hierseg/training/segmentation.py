"""Semantic-segmentation fine-tuning of `CastForSemanticSegmentation` on image + mask pairs.

Masks become integer class-id maps (`mask_to_class_ids`): palette ("P") and grayscale images give their pixel
values; RGB(A) colour masks need a `palette` (one colour per class id) unless their three channels are equal
(grayscale saved as RGB). Ids must lie in `0..num_labels-1` or equal the ignore index (255 by default), else a
`ValueError` names them. Image and mask must have the same size.

Training views: a random resized crop and a horizontal flip applied to the image (bilinear) and to the mask (nearest)
with the same random draws, optional colour jitter of the image, then superpixels on the augmented 8-bit image and
normalisation by the run's `CastImageProcessor` (`augment.encode_view`). Evaluation views: the image through the
processor resized to `size` x `size` (what inference computes), the mask resized (nearest) to the same size; the
mIoU is computed at that resolution with `hf_hierseg.evaluation.metrics.mean_iou`.
"""

import copy
import dataclasses
import json
import logging

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image, ImageOps

from ..errors import InvalidInputError
from ..evaluation.metrics import mean_iou
from ..image_datasets import (
    check_class_ids,
    decode_mask,
    mask_column_of,
    mask_to_class_ids,
    normalize_palette,
    reduce_mask_labels,
)
from ..modeling_cast import CastForSemanticSegmentation
from .augment import color_jitter, encode_view, random_resized_crop
from .data import SuperpixelBatches
from .recipes import Evaluation, TrainingRun, check_model_source, load_or_create


logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------------


class SegmentationTransform:
    """Image + mask -> `{"pixel_values" [3, S, S], "superpixels" [S, S], "labels" [S, S]}`.

    Args:
        processor: the run's `CastImageProcessor` (superpixels on the 8-bit view, then normalisation).
        size: output side S.
        num_labels, ignore_index, palette, reduce_labels: how masks become class ids (module docstring).
        train: random resized crop + flip (+ jitter) when True; when False, the processor resizes the image to S x S
            (as the saved processor does at inference) and the mask is resized to match.
        crop_scale: area range of the random crops; flip_probability; jitter_probability: colour jitter of the image.
    """

    def __init__(
        self,
        processor,
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
        self.processor = processor
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
        mask_rng = copy.deepcopy(rng)
        image = random_resized_crop(image, self.size, rng, scale=self.crop_scale, resample=Image.BILINEAR)
        mask = random_resized_crop(mask, self.size, mask_rng, scale=self.crop_scale, resample=Image.NEAREST)
        if rng.random() < self.flip_probability:
            image, mask = ImageOps.mirror(image), ImageOps.mirror(mask)
        return image, mask

    def evaluation_view(self, image):
        """The image resized to size x size by the processor: (pixel_values [3, S, S], superpixels [S, S])."""
        inputs = self.processor(
            images=np.asarray(image),
            do_resize=True,
            size={"height": self.size, "width": self.size},
            do_center_crop=False,
            input_data_format="channels_last",
            return_tensors="pt",
        )
        return inputs["pixel_values"][0], inputs["superpixels"][0]

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
        image = image.convert("RGB")
        if self.train:
            image, mask = self.geometric(image, mask, rng)
            if self.jitter_probability and rng.random() < self.jitter_probability:
                image = color_jitter(image, rng)
            pixel_values, superpixels = encode_view(self.processor, np.asarray(image, dtype=np.uint8))
        else:
            pixel_values, superpixels = self.evaluation_view(image)
            mask = mask.resize((self.size, self.size), Image.NEAREST)
        labels = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
        return {"pixel_values": pixel_values, "superpixels": superpixels, "labels": labels}


class SegmentationBatches(SuperpixelBatches):
    """`SuperpixelBatches` of image + mask pairs: each record's mask (column `mask_column`) goes through the joint
    `SegmentationTransform` with its image. Records whose mask does not decode are skipped with a warning."""

    def __init__(self, dataset, transform, batch_size, image_column, mask_column, **kwargs):
        columns = dataset.features or {}
        if columns and mask_column not in columns:
            raise InvalidInputError(f"Mask column {mask_column!r} is not a column; columns: {list(columns)}.")
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


@dataclasses.dataclass
class SegmentationMasks:
    """The target of segmentation (for `recipes.TrainingRun.train`): each record's mask in `column_name` (default:
    a column named mask/label/annotation/..., else the second Image column), read by `SegmentationBatches`."""

    column_name: str | None = None
    batches_class = SegmentationBatches

    def column(self, split, image_column):
        return mask_column_of(split, image_column, self.column_name)


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


def label_settings(segmentation_args):
    """`num_labels`, `id2label` and `label2id` from --id2label or --num_labels (an `arguments.SegmentationArguments`)."""
    args = segmentation_args
    if args.id2label is not None:
        with open(args.id2label, encoding="utf-8") as handle:
            id2label = {int(key): str(value) for key, value in json.load(handle).items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise InvalidInputError(
                f"--id2label {args.id2label} must map the ids 0..N-1, got {sorted(id2label)[:10]} ..."
            )
        if args.num_labels is not None and args.num_labels != len(id2label):
            raise InvalidInputError(
                f"--num_labels {args.num_labels} contradicts --id2label ({len(id2label)} classes)."
            )
    elif args.num_labels is not None:
        id2label = {index: str(index) for index in range(args.num_labels)}
    else:
        raise InvalidInputError("Give --num_labels or --id2label (a JSON file {id: name}).")
    if args.ignore_index in id2label:
        raise InvalidInputError(f"--ignore_index {args.ignore_index} is also a class id; choose another ignore index.")
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


def train_segmentation(data_args, model_args, optimization_args, output_args, evaluation_args, segmentation_args):
    """Fine-tune a `CastForSemanticSegmentation`, with the dataclasses of `arguments.segmentation_parser()` in its
    order. Returns the final metrics."""
    check_model_source(model_args)
    labels = label_settings(segmentation_args)
    palette = load_palette(segmentation_args.palette)
    run = TrainingRun(
        data_args, model_args, optimization_args, output_args, evaluation_args, recipe_args=(segmentation_args,)
    )
    fields = {
        "id2label": labels["id2label"],  # the config's num_labels follows
        "label2id": labels["label2id"],
        "freeze_last_pooling": False,
        "semantic_loss_ignore_index": segmentation_args.ignore_index,
    }
    if segmentation_args.segmentation_head_type is not None:
        fields["segmentation_head_type"] = segmentation_args.segmentation_head_type
    config = run.config(**fields)
    model = load_or_create(CastForSemanticSegmentation, model_args, config, segmentation_args.ignore_mismatched_sizes)
    processor = run.image_processor(config, "self_supervised")
    size = run.view_size(config)
    # No centre crop for segmentation: the saved processor resizes to size x size, as the evaluation views do, so
    # `post_process_semantic_segmentation(target_sizes=...)` maps predictions back onto the whole original image.
    processor.do_center_crop = False
    processor.size = {"height": size, "width": size}
    mask_settings = dict(
        num_labels=labels["num_labels"],
        ignore_index=segmentation_args.ignore_index,
        palette=palette,
        reduce_labels=segmentation_args.reduce_labels,
    )
    transform = SegmentationTransform(
        processor,
        size,
        train=True,
        crop_scale=(segmentation_args.crop_min_scale, 1.0),
        jitter_probability=segmentation_args.jitter_probability,
        **mask_settings,
    )
    evaluation = Evaluation(
        SegmentationTransform(processor, size, train=False, **mask_settings), evaluate_segmentation
    )
    return run.train(
        SegmentationObjective(model),
        transform,
        processor,
        targets=SegmentationMasks(segmentation_args.label_column_name),
        evaluation=evaluation,
    )


__all__ = [
    "SegmentationBatches",
    "SegmentationMasks",
    "SegmentationObjective",
    "SegmentationTransform",
    "evaluate_segmentation",
    "label_settings",
    "load_palette",
    "train_segmentation",
]
