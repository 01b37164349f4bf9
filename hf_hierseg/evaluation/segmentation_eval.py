"""Part-whole segmentation of image + mask datasets: CAST's hierarchy beside the ViT + k-means baseline.

Every image is resized to the model's square input size (bilinear, no crop). CAST's inputs are made by its
`CastImageProcessor` (superpixels of the resized 8-bit image, then normalisation, with the settings of the image
processor saved with the model when it has one; `views`); the label maps of levels 1..4 (`outputs.hierarchy_maps`) are resized
back to each mask (nearest), so scores are computed at mask resolution. The baseline clusters the upsampled patch
tokens of a transformers ViT of the same width and depth (`baselines.vit_kmeans_hierarchy`) into as many groups per
level as CAST keeps (`config.num_clusters`, 64/32/16/8 for the paper's models); its level with `num_clusters[i]`
groups is reported as CAST level i + 1. Scores: `metrics.evaluate_hierarchy`.
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidInputError, MissingInputError
from ..loading import is_hub_id, load_cast_model, load_config, resolve_model_source
from .baselines import images_to_pixel_values, make_vit_like, resize_label_maps, vit_kmeans_hierarchy
from .metrics import evaluate_hierarchy
from .views import evaluation_processor, square_view, superpixel_settings


logger = logging.getLogger(__name__)

CAST_LEVELS = (1, 2, 3, 4)
VIT_BASELINE_PATCH_SIZE = 16
SCORE_COLUMNS = (
    ("num_segments", "segments / image"),
    ("majority_mean_iou", "mIoU (majority)"),
    ("majority_pixel_accuracy", "pixel acc. (majority)"),
    ("mean_best_overlap", "best overlap"),
    ("covering", "covering"),
    ("boundary_fscore", "boundary F"),
)


# --------------------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------------------


def segmentation_processor(
    image_size, model_name_or_path=None, superpixel_method=None, num_superpixels=None, seeds_recipe=None
):
    """The `CastImageProcessor` of the segmentation evaluation: the whole image resized to `image_size` x
    `image_size` (`views.square_view`), with the settings saved with the model unless overridden (see
    `views.evaluation_processor`)."""
    return evaluation_processor(
        square_view(image_size), model_name_or_path, superpixel_method, num_superpixels, seeds_recipe
    )


@torch.no_grad()
def cast_hierarchy(model, pixel_values, superpixels, levels=CAST_LEVELS):
    """CAST's label maps `[B, H, W]` (input resolution) for each of `levels` (0 = the superpixels the model saw)."""
    outputs = model(pixel_values=pixel_values, superpixels=superpixels)
    maps = outputs.hierarchy_maps(superpixels)
    return [maps[level] for level in levels]


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def load_dataset_split(dataset_name, split="test"):
    """One split of a dataset: a folder written by `synthetic.write_synthetic_dataset` (its `label` as a
    `ClassLabel`), any local imagefolder / parquet folder, or a Hub id (anything `datasets.load_dataset` reads).

    Raises:
        MissingInputError: no such folder, or a Hub dataset that cannot be found (offline: in the cache).
        InvalidInputError: the dataset has no split `split`.
    """
    import datasets

    from .synthetic import INFO_FILE, load_synthetic_dataset

    path = Path(dataset_name)
    if (path / INFO_FILE).is_file():
        splits = load_synthetic_dataset(path)
    elif path.exists():
        splits = datasets.load_dataset(str(path))
    elif not is_hub_id(str(dataset_name)):
        raise MissingInputError(f"The dataset folder {path} does not exist.")
    else:
        try:
            splits = datasets.load_dataset(str(dataset_name))
        except (FileNotFoundError, ConnectionError) as error:
            raise MissingInputError(
                f"There is no dataset folder {path}, and the Hub dataset {str(dataset_name)!r} could not be loaded: "
                f"{str(error).splitlines()[0]}"
            ) from error
    if split not in splits:
        raise InvalidInputError(f"No split {split!r} in {dataset_name}; splits: {list(splits)}.")
    return splits[split]


def read_image_mask_pairs(examples, mask_column, image_column=None, max_samples=None):
    """Decode `(RGB PIL image, int64 [H, W] mask)` pairs from a dataset or an iterable of dicts.

    The image column defaults to the dataset's first `datasets.Image` column (else `"image"`); masks go through
    `image_datasets.mask_to_class_ids` (palette indices, grayscale values or grayscale stored as RGB)."""
    from ..image_datasets import decode_image, decode_mask, image_column_of, mask_to_class_ids

    if image_column is None:
        image_column = image_column_of(examples) if getattr(examples, "features", None) else "image"
    pairs = []
    for example in examples:
        if max_samples is not None and len(pairs) >= max_samples:
            break
        for column in (image_column, mask_column):
            if column not in example:
                raise InvalidInputError(f"Column {column!r} is missing; the examples have {sorted(example)}.")
        image = decode_image(example[image_column])
        mask = mask_to_class_ids(decode_mask(example[mask_column]))
        if mask.shape != (image.height, image.width):
            raise InvalidInputError(f"Mask {len(pairs)} is {mask.shape[::-1]} (W x H) but its image is {image.size}.")
        pairs.append((image, mask))
    if not pairs:
        raise InvalidInputError("No examples to evaluate.")
    return pairs


def infer_num_labels(masks, ignore_index=None):
    """1 + the largest label in `masks` (ignoring `ignore_index`)."""
    largest = 0
    for mask in masks:
        labels = mask if ignore_index is None else mask[mask != ignore_index]
        largest = max(largest, int(labels.max(initial=0)))
    return largest + 1


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def predict_level_maps(images, output_sizes, num_levels, predict_batch, batch_size=16):
    """Run `predict_batch(images) -> [num_levels x int [B, h, w]]` on batches of `images` and resize every map to its
    image's entry of `output_sizes` (nearest). Returns, per level, a list of int64 numpy maps."""
    predictions = [[] for _ in range(num_levels)]
    for start in range(0, len(images), batch_size):
        maps = predict_batch(images[start : start + batch_size])
        for index, size in enumerate(output_sizes[start : start + batch_size]):
            for level, level_maps in enumerate(maps):
                predictions[level].append(resize_label_maps(level_maps[index : index + 1], size)[0].numpy())
    return predictions


def predict_cast_levels(model, images, processor, output_sizes, levels=CAST_LEVELS, batch_size=16):
    """CAST's label maps of `images` (inputs by `processor`, see `segmentation_processor`) at each of `levels`, at
    `output_sizes`.

    Batches are padded to their largest superpixel count; with `config.mask_padding_tokens=False` (the original),
    an image's result then depends slightly on its batch partners (`batch_size=1` avoids it)."""
    model.eval()

    def predict_batch(batch):
        inputs = processor(images=batch, return_tensors="pt")
        return cast_hierarchy(model, inputs["pixel_values"], inputs["superpixels"], levels)

    return predict_level_maps(images, output_sizes, len(levels), predict_batch, batch_size)


def predict_vit_levels(vit_model, images, num_clusters, output_sizes, batch_size=16, seed=0, max_fit_pixels=4096):
    """The ViT + k-means baseline's label maps (`baselines.vit_kmeans_hierarchy`, one level per entry of
    `num_clusters`; k-means fitted on at most `max_fit_pixels` upsampled features) of `images`, at
    `output_sizes`."""
    vit_model.eval()
    image_size = getattr(vit_model, "vit", vit_model).config.image_size

    def predict_batch(batch):
        pixel_values = images_to_pixel_values(batch, image_size)
        return vit_kmeans_hierarchy(vit_model, pixel_values, num_clusters, max_fit_pixels=max_fit_pixels, seed=seed)

    return predict_level_maps(images, output_sizes, len(num_clusters), predict_batch, batch_size)


def score_levels(predictions, levels, masks, num_labels, ignore_index=None, tolerance=1, exclude_labels=()):
    """`metrics.evaluate_hierarchy` of per-level predictions, each dict's `level` set to the CAST level."""
    scores = evaluate_hierarchy(
        predictions, masks, num_labels, ignore_index=ignore_index, tolerance=tolerance, exclude_labels=exclude_labels
    )
    for level, score in zip(levels, scores):
        score["level"] = level
    return scores


def evaluate_cast_hierarchy(
    model,
    pairs,
    num_labels,
    processor,
    levels=CAST_LEVELS,
    batch_size=16,
    ignore_index=None,
    tolerance=1,
    exclude_labels=(),
):
    """Per-level scores of CAST's hierarchy on `(image, mask)` pairs (see `predict_cast_levels`)."""
    images, masks = [image for image, _ in pairs], [mask for _, mask in pairs]
    predictions = predict_cast_levels(model, images, processor, [mask.shape for mask in masks], levels, batch_size)
    return score_levels(predictions, levels, masks, num_labels, ignore_index, tolerance, exclude_labels)


def evaluate_vit_hierarchy(
    vit_model,
    pairs,
    num_labels,
    num_clusters,
    levels=CAST_LEVELS,
    batch_size=16,
    ignore_index=None,
    tolerance=1,
    exclude_labels=(),
    seed=0,
):
    """Per-level scores of the ViT + k-means baseline on `(image, mask)` pairs, the level with `num_clusters[i]`
    clusters numbered `levels[i]` (the CAST level with as many segments)."""
    images, masks = [image for image, _ in pairs], [mask for _, mask in pairs]
    predictions = predict_vit_levels(vit_model, images, num_clusters, [mask.shape for mask in masks], batch_size, seed)
    return score_levels(predictions, levels, masks, num_labels, ignore_index, tolerance, exclude_labels)


def vit_baseline_model(cast_config, vit_model=None, patch_size=VIT_BASELINE_PATCH_SIZE, seed=0):
    """`(ViT, random_weights)`: the ViT at `vit_model` (a folder or Hub id of a `ViTModel` or a
    `ViTForImageClassification`), else a randomly initialised `ViTModel` of CAST's width and depth (`make_vit_like`),
    with a loud warning."""
    from transformers import ViTForImageClassification, ViTModel

    if vit_model is not None:
        vit_model = resolve_model_source(vit_model)
        architectures = load_config(vit_model).architectures or ()
        if "ViTForImageClassification" in architectures:
            return ViTForImageClassification.from_pretrained(vit_model).eval(), False
        return ViTModel.from_pretrained(vit_model, add_pooling_layer=False).eval(), False
    logger.warning(
        "NO --vit_model GIVEN: the ViT + k-means baseline uses a RANDOMLY INITIALISED ViT (width %d, %d layers, "
        "patch %d). Its scores say what k-means of untrained features gives, not what a trained ViT gives.",
        cast_config.hidden_size,
        sum(cast_config.depths),
        patch_size,
    )
    torch.manual_seed(seed)
    return ViTModel(make_vit_like(cast_config, patch_size=patch_size), add_pooling_layer=False).eval(), True


def evaluate_segmentation(
    cast_model,
    images,
    references,
    processor,
    vit_model=None,
    levels=CAST_LEVELS,
    vit_num_clusters=None,
    vit_max_fit_pixels=4096,
    batch_size=16,
    ignore_index=None,
    tolerance=1,
    exclude_labels=(),
    seed=0,
):
    """CAST's hierarchy and, if `vit_model` is given, the ViT + k-means baseline of `images`, each computed once and
    scored against every set of ground-truth masks in `references`.

    Args:
        cast_model: a CAST model (`CastModel`, `CastForImageClassification`, ...).
        images: PIL images.
        references: `{name: (masks, num_labels)}`: one int `[H, W]` mask per image (the masks of an image share
            its size) and the number of classes (None: inferred from the masks).
        processor: the `CastImageProcessor` of CAST's inputs (see `segmentation_processor`).
        vit_model: a `ViTModel` (or classifier) for the baseline, or None to skip it.
        levels: CAST levels to score (0 = superpixels, 1..4 = the hierarchy); the baseline has levels 1..4 only.
        vit_num_clusters: clusters of the baseline at levels 1..4 (default: `cast_model.config.num_clusters`).
        vit_max_fit_pixels: see `baselines.vit_kmeans_hierarchy`.
        batch_size, ignore_index, tolerance, exclude_labels, seed: as in `predict_*_levels` / `score_levels`.

    Returns:
        `{name: {"num_images", "num_labels", "models": {"cast": [per-level dicts], "vit_kmeans": [...]}}}`.
    """
    sizes = [mask.shape for mask in next(iter(references.values()))[0]]
    for name, (masks, _) in references.items():
        if [mask.shape for mask in masks] != sizes:
            raise ValueError(f"The {name!r} masks do not have one mask per image of the sizes of the other masks.")
    predictions = {"cast": (predict_cast_levels(cast_model, images, processor, sizes, levels, batch_size), levels)}
    vit_levels = tuple(level for level in levels if level >= 1)
    if vit_model is not None and vit_levels:
        clusters = tuple(vit_num_clusters or cast_model.config.num_clusters)
        vit_clusters = tuple(clusters[level - 1] for level in vit_levels)
        vit_predictions = predict_vit_levels(
            vit_model, images, vit_clusters, sizes, batch_size, seed, vit_max_fit_pixels
        )
        predictions["vit_kmeans"] = (vit_predictions, vit_levels)
    results = {}
    for name, (masks, num_labels) in references.items():
        num_labels = int(num_labels or infer_num_labels(masks, ignore_index))
        scores = {
            model: score_levels(
                model_predictions, model_levels, masks, num_labels, ignore_index, tolerance, exclude_labels
            )
            for model, (model_predictions, model_levels) in predictions.items()
        }
        results[name] = {"num_images": len(images), "num_labels": num_labels, "models": scores}
    return results


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------


def format_score(value, digits=3):
    """A table cell: `-` for a missing or NaN score."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_segmentation_table(results, model_names=None):
    """A markdown table with one row per model and level of `evaluate_segmentation`'s results."""
    model_names = model_names or {"cast": "CAST", "vit_kmeans": "ViT + k-means"}
    lines = [
        "| model | level | " + " | ".join(title for _, title in SCORE_COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(SCORE_COLUMNS),
    ]
    for key, levels in results["models"].items():
        for score in levels:
            cells = [format_score(score.get(name), 1 if name == "num_segments" else 3) for name, _ in SCORE_COLUMNS]
            lines.append(f"| {model_names.get(key, key)} | {score['level']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_jsonable(value):
    """Results with numpy scalars / arrays and tuples turned into plain JSON types."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(results, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(results), indent=2), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# The whole run of scripts/evaluate_segmentation.py
# --------------------------------------------------------------------------------------------------------------


def real_photo_references(name, cache_dir=None):
    """`(image, {"class_mask": (mask, number of classes), "instance_mask": (mask, None)})` of a real photo shipped by
    a PyPI package (`"voc"` or `"arc2017"`, see `real_photos`)."""
    from .real_photos import load_arc2017_photo, load_voc_photo

    loaders = {"voc": load_voc_photo, "arc2017": load_arc2017_photo}
    if name not in loaders:
        raise ValueError(f"Unknown real photo {name!r}; choose one of {sorted(loaders)}.")
    photo = loaders[name](cache_dir)
    masks = {column: np.asarray(photo[column], dtype=np.int64) for column in ("class_mask", "instance_mask")}
    return photo["image"], {
        "class_mask": (masks["class_mask"], len(photo["class_names"])),
        "instance_mask": (masks["instance_mask"], None),
    }


def run_segmentation_evaluation(
    model_name_or_path,
    dataset_name=None,
    split="test",
    mask_column="object_mask",
    image_column=None,
    max_samples=None,
    num_labels=None,
    levels=CAST_LEVELS,
    vit_model=None,
    vit_patch_size=VIT_BASELINE_PATCH_SIZE,
    skip_vit=False,
    vit_max_fit_pixels=4096,
    real_photos=(),
    superpixel_method=None,
    num_superpixels=None,
    seeds_recipe=None,
    batch_size=16,
    ignore_index=None,
    tolerance=1,
    exclude_labels=(),
    seed=0,
):
    """Evaluate a CAST model folder on a dataset split and/or real photos, with the ViT baseline unless
    `skip_vit`. Returns `{"settings": ..., "random_vit_weights": ..., "evaluations": [{"data": description,
    "num_images", "num_labels", "models"}]}`."""
    if dataset_name is None and not real_photos:
        raise InvalidInputError("Give a dataset (--dataset_name) and/or real photos (--real_photos voc).")
    resolve_model_source(model_name_or_path)  # a missing folder is named before the data are read
    image_sets = []  # (description of the images, images, references)
    if dataset_name is not None:
        pairs = read_image_mask_pairs(load_dataset_split(dataset_name, split), mask_column, image_column, max_samples)
        references = {mask_column: ([mask for _, mask in pairs], num_labels)}
        image_sets.append((f"{dataset_name} [{split}]", [image for image, _ in pairs], references))
    for name in real_photos:
        image, masks = real_photo_references(name)
        image_sets.append((f"{name} photo", [image], {key: ([mask], count) for key, (mask, count) in masks.items()}))
    cast_model = load_cast_model(model_name_or_path)
    processor = segmentation_processor(
        cast_model.config.image_size, model_name_or_path, superpixel_method, num_superpixels, seeds_recipe
    )
    vit, random_vit = (
        (None, False) if skip_vit else vit_baseline_model(cast_model.config, vit_model, vit_patch_size, seed)
    )
    settings = {
        "model": str(model_name_or_path),
        "image_size": cast_model.config.image_size,
        "superpixels": superpixel_settings(processor),
        "vit_model": None if vit is None else (str(vit_model) if vit_model else "random weights"),
        "vit_patch_size": None if vit is None else vit.config.patch_size,
        "vit_num_clusters": list(cast_model.config.num_clusters),
        "vit_max_fit_pixels": vit_max_fit_pixels,
        "tolerance": tolerance,
        "ignore_index": ignore_index,
        "exclude_labels": list(exclude_labels),
    }
    evaluations = []
    for description, images, references in image_sets:
        results = evaluate_segmentation(
            cast_model,
            images,
            references,
            processor,
            vit,
            levels,
            vit_max_fit_pixels=vit_max_fit_pixels,
            batch_size=batch_size,
            ignore_index=ignore_index,
            tolerance=tolerance,
            exclude_labels=exclude_labels,
            seed=seed,
        )
        evaluations += [{"data": f"{description} {mask}", **result} for mask, result in results.items()]
    return {"settings": settings, "random_vit_weights": random_vit, "evaluations": evaluations}


def format_segmentation_report(run):
    """Markdown: one table per evaluated dataset of `run_segmentation_evaluation`'s output."""
    sections = []
    if run.get("random_vit_weights"):
        sections.append("**Note: the ViT baseline has random weights (no `--vit_model`).**")
    vit_name = f"ViT/{run['settings']['vit_patch_size']} + k-means" if run["settings"]["vit_patch_size"] else None
    for evaluation in run["evaluations"]:
        sections.append(
            f"**{evaluation['data']}**: {evaluation['num_images']} image(s), {evaluation['num_labels']} labels"
        )
        sections.append(format_segmentation_table(evaluation, {"cast": "CAST", "vit_kmeans": vit_name}))
    return "\n\n".join(sections)


__all__ = [
    "CAST_LEVELS",
    "cast_hierarchy",
    "evaluate_cast_hierarchy",
    "evaluate_segmentation",
    "evaluate_vit_hierarchy",
    "format_segmentation_report",
    "format_segmentation_table",
    "infer_num_labels",
    "predict_cast_levels",
    "predict_level_maps",
    "predict_vit_levels",
    "score_levels",
    "segmentation_processor",
    "load_dataset_split",
    "read_image_mask_pairs",
    "real_photo_references",
    "run_segmentation_evaluation",
    "to_jsonable",
    "vit_baseline_model",
    "write_json",
]
