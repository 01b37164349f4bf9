"""Hierarchical classification of labelled datasets (H-CAST's evaluation): per-level top-1 accuracy, full-path
accuracy and tree consistency (`metrics.hierarchical_accuracy`) of a `CastForHierarchicalImageClassification`, or of
any model whose output has `logits_per_level` (finest first).

A record's labels per level come from one dataset column per level (`label_columns`, finest first), or from its
finest label alone (`label_column`), the coarser ones derived through the model's taxonomy. Images go through
`CastImageProcessor` with DeiT's evaluation view (`classification_eval.classification_processor`).
"""

import numpy as np
import torch

from ..errors import InvalidInputError
from ..loading import resolve_model_source
from .classification_eval import labelled_batches, load_classifier_and_processor
from .metrics import hierarchical_accuracy
from .segmentation_eval import format_score, load_dataset_split
from .views import superpixel_settings


def level_labels(example, paths, label_columns=None, label_column="label"):
    """Class ids per label level, finest first, of one record: `example[c]` for each of `label_columns` (one column
    per level, finest first), or the row of `paths` (the taxonomy, one row `[fine, ..., coarsest]` per finest class,
    `CastConfig.hierarchy_paths()`) of the finest label `example[label_column]`.

    Raises:
        InvalidInputError: a missing column, a label outside the taxonomy, or the wrong number of columns.
    """
    num_levels = len(paths[0])
    if label_columns:
        if len(label_columns) != num_levels:
            raise InvalidInputError(
                f"Give one label column per taxonomy level ({num_levels}, finest first), got {list(label_columns)}."
            )
        missing = [column for column in label_columns if column not in example]
        if missing:
            raise InvalidInputError(f"The dataset has no label column(s) {missing}; it has {sorted(example)}.")
        return [int(example[column]) for column in label_columns]
    if label_column not in example:
        raise InvalidInputError(f"The dataset has no label column {label_column!r}; it has {sorted(example)}.")
    finest = int(example[label_column])
    if not 0 <= finest < len(paths):
        raise InvalidInputError(f"Label {finest} is not a finest class of the taxonomy (0..{len(paths) - 1}).")
    return list(paths[finest])


@torch.no_grad()
def predict_levels(model, pixel_values, superpixels):
    """The argmax class of every label level, int64 `[B, L]` (finest first), of a model with `logits_per_level`."""
    outputs = model(pixel_values=pixel_values, superpixels=superpixels)
    return torch.stack([logits.argmax(dim=-1) for logits in outputs.logits_per_level], dim=1)


def evaluate_hierarchical(
    model,
    examples,
    processor,
    paths,
    image_column="image",
    label_column="label",
    label_columns=None,
    batch_size=64,
    max_samples=None,
):
    """`metrics.hierarchical_accuracy` of `model` on `examples` (a dataset or an iterable of dicts with a PIL
    image and labels, see `level_labels`), inputs made by `processor`; `paths` is the taxonomy.

    Returns:
        the metrics of `hierarchical_accuracy`.
    """
    model.eval()
    device = next(model.parameters()).device
    predictions, references = [], []
    batches = labelled_batches(
        examples,
        processor,
        lambda example: level_labels(example, paths, label_columns, label_column),
        image_column,
        batch_size,
        max_samples,
    )
    for inputs, labels in batches:
        predicted = predict_levels(model, inputs["pixel_values"].to(device), inputs["superpixels"].to(device))
        predictions.append(predicted.cpu().numpy())
        references.extend(labels)
    if not references:
        raise InvalidInputError("No examples to evaluate.")
    return hierarchical_accuracy(np.concatenate(predictions), np.asarray(references, dtype=np.int64), paths)


def format_hierarchical_table(rows, level_names):
    """A markdown table from `{model name: hierarchical_accuracy results}`: top-1 per level, full-path accuracy,
    tree consistency and TICE, in percent."""
    titles = [f"top-1 {name}" for name in level_names] + ["full path", "consistency", "TICE"]
    lines = ["| model | images | " + " | ".join(titles) + " |", "|---|---:|" + "---:|" * len(titles)]
    for name, results in rows.items():
        values = [*results["top1_accuracy_per_level"], results["full_path_accuracy"]]
        values += [results["tree_consistency"], results["tice"]]
        cells = [format_score(value) for value in values]
        lines.append(f"| {name} | {results['num_samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_hierarchical_evaluation(
    model_name_or_path,
    dataset_name,
    split="test",
    image_column=None,
    label_column=None,
    label_columns=None,
    superpixel_method=None,
    num_superpixels=None,
    seeds_recipe=None,
    image_size=None,
    crop_fraction=0.875,
    batch_size=64,
    max_samples=None,
    device="cpu",
):
    """Evaluate an H-CAST model folder (or Hub id) on a labelled dataset (scripts/evaluate_hierarchical.py).

    Returns `{"settings": ..., "results": hierarchical_accuracy results + "level_names"}`."""
    from ..image_datasets import image_column_of, label_column_of

    resolve_model_source(model_name_or_path)  # a missing folder is named before the data are read
    examples = load_dataset_split(dataset_name, split)
    image_column = image_column or image_column_of(examples)
    if not label_columns:
        label_column = label_column or label_column_of(examples)
    model, image_size, processor = load_classifier_and_processor(
        model_name_or_path, image_size, crop_fraction, superpixel_method, num_superpixels, seeds_recipe, device
    )
    if not getattr(model.config, "hierarchy_num_labels", None):
        raise InvalidInputError(
            f"{model_name_or_path} is not a hierarchical classifier (CastForHierarchicalImageClassification): its "
            "config has no taxonomy (`hierarchy_num_labels`)."
        )
    paths = model.config.hierarchy_paths()
    results = evaluate_hierarchical(
        model, examples, processor, paths, image_column, label_column, label_columns, batch_size, max_samples
    )
    results["level_names"] = list(model.config.hierarchy_level_names)
    settings = {
        "model": str(model_name_or_path),
        "dataset": str(dataset_name),
        "split": split,
        "labels": list(label_columns) if label_columns else f"{label_column} (coarser levels from the taxonomy)",
        "image_size": image_size,
        "crop_fraction": crop_fraction,
        "superpixels": superpixel_settings(processor),
    }
    return {"settings": settings, "results": results}


__all__ = [
    "evaluate_hierarchical",
    "format_hierarchical_table",
    "level_labels",
    "predict_levels",
    "run_hierarchical_evaluation",
]
