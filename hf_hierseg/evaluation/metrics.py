"""Segmentation and classification metrics (numpy, offline).

Label maps are 2-D integer arrays (numpy arrays or torch tensors); a batch is a 3-D array `[B, H, W]` or a list
of 2-D maps (sizes may differ between images). Every function compares `predictions` with `references` pixel by
pixel, so a prediction must have the size of its reference (resize label maps with nearest-neighbour first).
"""

import math

import cv2
import numpy as np


# --------------------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------------------


def _to_numpy(array):
    if hasattr(array, "detach"):  # torch.Tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def as_label_maps(label_maps, name="label_maps"):
    """A list of 2-D integer numpy arrays from a 2-D map, a `[B, H, W]` array/tensor or a list of 2-D maps."""
    if isinstance(label_maps, (list, tuple)):
        maps = [_to_numpy(label_map) for label_map in label_maps]
    else:
        array = _to_numpy(label_maps)
        maps = [array] if array.ndim == 2 else list(array) if array.ndim == 3 else [array]
    for index, label_map in enumerate(maps):
        if label_map.ndim != 2:
            raise ValueError(
                f"`{name}` must hold 2-D label maps ([H, W], or a [B, H, W] batch); item {index} has shape "
                f"{tuple(label_map.shape)}."
            )
        if label_map.dtype == bool:
            maps[index] = label_map.astype(np.int64)
        elif not np.issubdtype(label_map.dtype, np.integer):
            if label_map.size and not np.all(np.mod(label_map, 1) == 0):
                raise TypeError(f"`{name}` must hold integer labels; item {index} has dtype {label_map.dtype}.")
            maps[index] = label_map.astype(np.int64)
    return maps


def _paired_label_maps(predictions, references):
    predictions = as_label_maps(predictions, "predictions")
    references = as_label_maps(references, "references")
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        if prediction.shape != reference.shape:
            raise ValueError(
                f"Prediction {index} has shape {prediction.shape} but its reference has shape {reference.shape}; "
                "resize the prediction to the reference size (nearest-neighbour) first."
            )
    return predictions, references


def _valid_mask(reference, ignore_index):
    if ignore_index is None:
        return np.ones(reference.shape, dtype=bool)
    return reference != ignore_index


# --------------------------------------------------------------------------------------------------------------
# Mean IoU (semantics of `evaluate`'s "mean_iou")
# --------------------------------------------------------------------------------------------------------------


def _prepare_reference(reference, label_map=None, reduce_labels=False):
    """Apply `label_map` ({old: new}, all at once) then `reduce_labels` to a reference."""
    reference = reference.astype(np.int64, copy=True)
    if label_map:
        original = reference.copy()
        for old_id, new_id in label_map.items():
            reference[original == int(old_id)] = int(new_id)
    if reduce_labels:  # as `evaluate`: 0 and 255 become 255, every other label l becomes l - 1
        background = (reference == 0) | (reference == 255)
        reference -= 1
        reference[background] = 255
    return reference


def intersect_and_union(prediction, reference, num_labels, ignore_index=None, label_map=None, reduce_labels=False):
    """Per-class pixel counts of one image: `(area_intersect, area_union, area_prediction, area_reference)`.

    Reference pixels equal to `ignore_index` are left out. Labels outside `0..num_labels-1` count for no class
    (a prediction outside that range is simply wrong).
    """
    reference = _prepare_reference(_to_numpy(reference), label_map, reduce_labels)
    valid = _valid_mask(reference, ignore_index)
    prediction = _to_numpy(prediction).astype(np.int64)[valid]
    reference = reference[valid]

    def histogram(labels):
        labels = labels[(labels >= 0) & (labels < num_labels)]
        return np.bincount(labels, minlength=num_labels).astype(np.int64)

    area_intersect = histogram(prediction[prediction == reference])
    area_prediction = histogram(prediction)
    area_reference = histogram(reference)
    area_union = area_prediction + area_reference - area_intersect
    return area_intersect, area_union, area_prediction, area_reference


def _check_num_labels(num_labels):
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"`num_labels` must be a positive integer, got {num_labels!r}.")


def mean_iou(
    predictions, references, num_labels, ignore_index=None, nan_to_num=None, label_map=None, reduce_labels=False
):
    """Mean intersection-over-union over a dataset, like `evaluate.load("mean_iou")`.

    Pixel counts are summed over all images first, then divided per class. A class absent from both predictions
    and references has IoU NaN and is left out of the means.

    Args:
        predictions, references: label maps (see module docstring).
        num_labels (`int`): number of classes.
        ignore_index (`int`, *optional*): reference label that is not evaluated (e.g. 255).
        nan_to_num (`float`, *optional*): replace NaN per-class values by this number.
        label_map (`dict`, *optional*): `{old_id: new_id}` applied to the references.
        reduce_labels (`bool`): map reference 0 (background) to 255 and subtract 1 from the other labels.

    Returns:
        dict with `mean_iou`, `mean_accuracy`, `overall_accuracy` (pixel accuracy), `per_category_iou` and
        `per_category_accuracy` (numpy arrays of length `num_labels`).
    """
    _check_num_labels(num_labels)
    predictions, references = _paired_label_maps(predictions, references)
    totals = np.zeros((4, num_labels), dtype=np.int64)
    for prediction, reference in zip(predictions, references):
        totals += np.stack(
            intersect_and_union(prediction, reference, num_labels, ignore_index, label_map, reduce_labels)
        )
    total_intersect, total_union, _, total_reference = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        per_category_iou = total_intersect / total_union
        per_category_accuracy = total_intersect / total_reference
        overall_accuracy = total_intersect.sum() / total_reference.sum() if total_reference.sum() else math.nan
    metrics = {
        "mean_iou": _nanmean(per_category_iou),
        "mean_accuracy": _nanmean(per_category_accuracy),
        "overall_accuracy": float(overall_accuracy),
        "per_category_iou": per_category_iou,
        "per_category_accuracy": per_category_accuracy,
    }
    if nan_to_num is not None:
        metrics = {
            key: np.nan_to_num(value, nan=nan_to_num) if isinstance(value, np.ndarray) else value
            for key, value in metrics.items()
        }
    return metrics


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values[~np.isnan(values)].mean()) if np.any(~np.isnan(values)) else math.nan


# --------------------------------------------------------------------------------------------------------------
# Per-image Jaccard index (semantics of torchmetrics' `MulticlassJaccardIndex(average="macro")`)
# --------------------------------------------------------------------------------------------------------------


def jaccard_from_counts(area_intersect, area_union):
    """Mean IoU of one image from its per-class counts (`intersect_and_union`), as torchmetrics'
    `MulticlassJaccardIndex(num_classes, average="macro")` computes it for that image (torchmetrics >= 1.0): the mean
    of intersection / union over the classes present in the prediction or the reference; classes absent from both
    are left out (torchmetrics gives them weight 0), not counted as 0. NaN when no class is present (an empty
    image)."""
    area_intersect, area_union = np.asarray(area_intersect), np.asarray(area_union)
    present = area_union > 0
    return float((area_intersect[present] / area_union[present]).mean()) if present.any() else math.nan


def per_image_jaccard(predictions, references, num_labels, ignore_index=None):
    """The Jaccard index of every image, averaged over images (the open-vocabulary protocol of CAST's paper: one
    torchmetrics `JaccardIndex(task="multiclass", average="macro")` call per image), beside the dataset-level mean
    IoU (pixel counts summed over images first, as `mean_iou`).

    Args:
        predictions, references: label maps (see module docstring), values in `0..num_labels-1`.
        num_labels (`int`): number of classes (background included).
        ignore_index (`int`, *optional*): reference label left out (the paper uses none).

    Returns:
        dict with `mean_per_image_jaccard` (mean over images), `per_image_jaccard` (numpy array), `mean_iou`
        (dataset level) and `per_category_iou` (dataset level, NaN for classes absent everywhere).
    """
    _check_num_labels(num_labels)
    predictions, references = _paired_label_maps(predictions, references)
    if not predictions:
        raise ValueError("`per_image_jaccard` needs at least one image.")
    totals = np.zeros((2, num_labels), dtype=np.int64)
    scores = []
    for prediction, reference in zip(predictions, references):
        area_intersect, area_union, _, _ = intersect_and_union(prediction, reference, num_labels, ignore_index)
        scores.append(jaccard_from_counts(area_intersect, area_union))
        totals += np.stack([area_intersect, area_union])
    with np.errstate(divide="ignore", invalid="ignore"):
        per_category_iou = totals[0] / totals[1]
    scores = np.asarray(scores, dtype=np.float64)
    return {
        "mean_per_image_jaccard": _nanmean(scores),
        "per_image_jaccard": scores,
        "mean_iou": _nanmean(per_category_iou),
        "per_category_iou": per_category_iou,
    }


# --------------------------------------------------------------------------------------------------------------
# Boundary F-score
# --------------------------------------------------------------------------------------------------------------


def boundary_map(label_map):
    """Boolean map of boundary pixels: pixels with a 4-neighbour of a different label (both sides of an edge)."""
    label_map = _to_numpy(label_map)
    boundary = np.zeros(label_map.shape, dtype=bool)
    horizontal = label_map[:, 1:] != label_map[:, :-1]
    vertical = label_map[1:, :] != label_map[:-1, :]
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    boundary[1:, :] |= vertical
    boundary[:-1, :] |= vertical
    return boundary


def _dilate(mask, tolerance):
    """Pixels within Euclidean distance `tolerance` of `mask` (a disk-shaped dilation)."""
    if tolerance == 0:
        return mask
    radius = int(math.floor(tolerance))
    offsets = np.arange(-radius, radius + 1)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= tolerance**2).astype(np.uint8)
    return cv2.dilate(mask.astype(np.uint8), disk, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def boundary_precision_recall(prediction, reference, tolerance=1, ignore_index=None):
    """Boundary precision and recall of one image (dilation matching, as in the DAVIS benchmark).

    A predicted boundary pixel is correct when a reference boundary pixel lies within `tolerance` pixels
    (Euclidean); a reference boundary pixel is recalled when a predicted one lies within `tolerance`. Pixels whose
    reference is `ignore_index` are left out of both boundary sets. An image without reference (predicted)
    boundaries has recall (precision) 1.

    Returns:
        `(precision, recall)` as floats.
    """
    prediction, reference = _to_numpy(prediction), _to_numpy(reference)
    valid = _valid_mask(reference, ignore_index)
    predicted_boundary = boundary_map(prediction) & valid
    reference_boundary = boundary_map(reference) & valid
    num_predicted, num_reference = predicted_boundary.sum(), reference_boundary.sum()
    precision, recall = 1.0, 1.0
    if num_predicted:
        precision = (predicted_boundary & _dilate(reference_boundary, tolerance)).sum() / num_predicted
    if num_reference:
        recall = (reference_boundary & _dilate(predicted_boundary, tolerance)).sum() / num_reference
    return float(precision), float(recall)


def _f_score(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def boundary_fscore(predictions, references, tolerance=1, ignore_index=None):
    """Boundary F-score averaged over images (label ids do not matter, only where labels change).

    Args:
        predictions, references: label maps (see module docstring).
        tolerance (`float`): matching distance in pixels (0 = exact position).
        ignore_index (`int`, *optional*): reference label whose pixels are not evaluated.

    Returns:
        dict with `boundary_fscore`, `boundary_precision`, `boundary_recall` (means over images) and
        `per_image_fscore` (numpy array).
    """
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance < 0:
        raise ValueError(f"`tolerance` must be a non-negative number of pixels, got {tolerance!r}.")
    predictions, references = _paired_label_maps(predictions, references)
    if not predictions:
        raise ValueError("`boundary_fscore` needs at least one image.")
    scores = np.array(
        [boundary_precision_recall(p, r, tolerance, ignore_index) for p, r in zip(predictions, references)]
    )
    per_image_fscore = np.array([_f_score(precision, recall) for precision, recall in scores])
    return {
        "boundary_fscore": float(per_image_fscore.mean()),
        "boundary_precision": float(scores[:, 0].mean()),
        "boundary_recall": float(scores[:, 1].mean()),
        "per_image_fscore": per_image_fscore,
    }


# --------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------


def top_k_accuracy(logits, labels, top_k=(1, 5)):
    """Fraction of samples whose label is among the `k` highest scores, for each `k` in `top_k`.

    Args:
        logits: `[N, num_classes]` scores (array or tensor).
        labels: `[N]` integer labels.
        top_k: the values of k; a k above `num_classes` counts as `num_classes` (always correct).

    Returns:
        dict `{"top1_accuracy": ..., "top5_accuracy": ...}`. Ties are broken towards the lower class index.
    """
    logits, labels = _to_numpy(logits), _to_numpy(labels)
    if logits.ndim != 2:
        raise ValueError(f"`logits` must be [num_samples, num_classes], got shape {logits.shape}.")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"`labels` must be [num_samples] = [{logits.shape[0]}], got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"`labels` must be integers, got dtype {labels.dtype}.")
    if isinstance(top_k, int):
        top_k = (top_k,)
    if logits.shape[0] == 0:
        raise ValueError("`top_k_accuracy` needs at least one sample.")
    # Rank of the true class = number of classes scoring strictly higher, plus ties at a lower index.
    true_scores = logits[np.arange(len(labels)), labels][:, None]
    class_index = np.arange(logits.shape[1])[None, :]
    rank = (logits > true_scores).sum(1) + ((logits == true_scores) & (class_index < labels[:, None])).sum(1)
    metrics = {}
    for k in top_k:
        if k < 1:
            raise ValueError(f"Every k in `top_k` must be >= 1, got {top_k}.")
        metrics[f"top{k}_accuracy"] = float((rank < k).mean())
    return metrics


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07, batch_size=1024):
    """Weighted k-nearest-neighbour accuracy on embeddings (the DINO / MoCo-v3 protocol).

    Features are L2-normalised; each test sample takes the `k` most cosine-similar training samples, each voting for
    its label with weight `exp(similarity / temperature)`, and is predicted as the label with the most weight.

    Returns:
        dict with `knn_accuracy`.
    """
    import torch

    train = torch.nn.functional.normalize(torch.as_tensor(_to_numpy(train_features), dtype=torch.float32), dim=-1)
    test = torch.nn.functional.normalize(torch.as_tensor(_to_numpy(test_features), dtype=torch.float32), dim=-1)
    train_labels = torch.as_tensor(_to_numpy(train_labels)).long()
    test_labels = torch.as_tensor(_to_numpy(test_labels)).long()
    if train.dim() != 2 or test.dim() != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"Features must be [N, D] with the same D, got {tuple(train.shape)} and {tuple(test.shape)}.")
    if train_labels.shape != (train.shape[0],) or test_labels.shape != (test.shape[0],):
        raise ValueError("There must be one label per train and per test feature row.")
    if test.shape[0] == 0 or train.shape[0] == 0:
        raise ValueError("`knn_accuracy` needs at least one train and one test sample.")
    k = min(int(k), train.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, test.shape[0], batch_size):
        similarity, neighbours = (test[start : start + batch_size] @ train.T).topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], num_classes).scatter_add_(
            1, train_labels[neighbours], (similarity / temperature).exp()
        )
        correct += (votes.argmax(1) == test_labels[start : start + batch_size]).sum().item()
    return {"knn_accuracy": correct / test.shape[0]}


def _level_labels(array, name):
    array = _to_numpy(array)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise ValueError(
            f"`{name}` must be [num_samples, num_levels] class ids (finest level first, >= 2 levels, >= 1 sample), "
            f"got shape {array.shape}."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integer class ids, got dtype {array.dtype}.")
    return array


def hierarchical_accuracy(predictions, references, paths):
    """Accuracy of hierarchical classification along a taxonomy (H-CAST's evaluation).

    Args:
        predictions: `[N, L]` predicted class ids per label level, finest first (e.g. the argmax of each level's
            logits).
        references: `[N, L]` true class ids, finest first.
        paths: the taxonomy as its root-to-leaf paths, one row `[fine, ..., coarsest]` per finest class (H-CAST's
            `data/*_tree.json`; `CastConfig.hierarchy_paths()`).

    Returns:
        dict with `top1_accuracy_per_level` (list, finest first), `full_path_accuracy` (all L levels right),
        `tree_consistency` (fraction of samples whose predicted tuple is a row of `paths`, the authors' TICE check
        `[pred, family_pred] in trees`), `tice` (tree-based inconsistency error, `1 - tree_consistency`) and
        `num_samples`.
    """
    predictions, references = _level_labels(predictions, "predictions"), _level_labels(references, "references")
    if predictions.shape != references.shape:
        raise ValueError(f"`predictions` {predictions.shape} and `references` {references.shape} must have one shape.")
    rows = {tuple(int(value) for value in row) for row in paths}
    if not rows or any(len(row) != predictions.shape[1] for row in rows):
        raise ValueError(f"`paths` must be non-empty rows of {predictions.shape[1]} class ids (one per level).")
    correct = predictions == references
    consistency = float(np.mean([tuple(int(value) for value in row) in rows for row in predictions]))
    return {
        "top1_accuracy_per_level": [float(level) for level in correct.mean(axis=0)],
        "full_path_accuracy": float(correct.all(axis=1).mean()),
        "tree_consistency": consistency,
        "tice": 1.0 - consistency,
        "num_samples": int(predictions.shape[0]),
    }


# --------------------------------------------------------------------------------------------------------------
# Unsupervised segmentation: matching predicted regions to ground-truth regions
# --------------------------------------------------------------------------------------------------------------


def contingency_table(prediction, reference, ignore_index=None):
    """Pixel overlap of predicted and reference regions of one image, ignoring `ignore_index` reference pixels.

    Returns:
        `(predicted_ids, reference_ids, table)` with `table[i, j]` = number of pixels in predicted region
        `predicted_ids[i]` and reference region `reference_ids[j]`.
    """
    prediction, reference = _to_numpy(prediction), _to_numpy(reference)
    valid = _valid_mask(reference, ignore_index)
    predicted_ids, predicted_index = np.unique(prediction[valid], return_inverse=True)
    reference_ids, reference_index = np.unique(reference[valid], return_inverse=True)
    table = np.bincount(
        predicted_index.ravel() * len(reference_ids) + reference_index.ravel(),
        minlength=len(predicted_ids) * len(reference_ids),
    ).reshape(len(predicted_ids), len(reference_ids))
    return predicted_ids, reference_ids, table


def best_overlap(prediction, reference, ignore_index=None, exclude_labels=()):
    """For every reference region of one image, the IoU of its best-overlapping predicted region.

    Args:
        exclude_labels: reference labels that are not scored as regions (e.g. background); their pixels still
            count in the predicted regions' areas.

    Returns:
        `(reference_ids, best_iou, region_sizes)`, numpy arrays over the scored reference regions.
    """
    _, reference_ids, table = contingency_table(prediction, reference, ignore_index)
    union = table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - table
    iou = table / np.maximum(union, 1)
    scored = ~np.isin(reference_ids, np.asarray(list(exclude_labels), dtype=reference_ids.dtype))
    if iou.shape[0] == 0:
        best = np.zeros(len(reference_ids))
    else:
        best = iou.max(0)
    return reference_ids[scored], best[scored], table.sum(0)[scored]


def segment_matching(predictions, references, ignore_index=None, exclude_labels=()):
    """Best-overlap matching of reference regions to predicted regions over a dataset.

    Returns:
        dict with `mean_best_overlap` (mean over all scored reference regions of all images), `covering` (per image
        the region-size-weighted mean of best IoUs, then averaged over images) and `num_regions`.
    """
    predictions, references = _paired_label_maps(predictions, references)
    all_best, coverings = [], []
    for prediction, reference in zip(predictions, references):
        _, best, sizes = best_overlap(prediction, reference, ignore_index, exclude_labels)
        all_best.append(best)
        if sizes.sum() > 0:
            coverings.append(float((best * sizes).sum() / sizes.sum()))
    all_best = np.concatenate(all_best) if all_best else np.zeros(0)
    return {
        "mean_best_overlap": float(all_best.mean()) if all_best.size else math.nan,
        "covering": float(np.mean(coverings)) if coverings else math.nan,
        "num_regions": int(all_best.size),
    }


def majority_label_assignment(prediction, reference, ignore_index=None):
    """Relabel one image's predicted regions with the majority reference label of their pixels.

    Ties go to the smaller label. A region made only of ignored pixels gets `ignore_index` (or -1).

    Returns:
        int64 map of the prediction's shape with reference labels.
    """
    prediction = _to_numpy(prediction)
    predicted_ids, reference_ids, table = contingency_table(prediction, reference, ignore_index)
    relabelled = np.full(prediction.shape, -1 if ignore_index is None else ignore_index, dtype=np.int64)
    if table.size == 0:
        return relabelled
    majority = reference_ids[table.argmax(1)]  # argmax takes the first (smallest id) on ties
    index = np.searchsorted(predicted_ids, prediction)
    found = (index < len(predicted_ids)) & (predicted_ids[np.minimum(index, len(predicted_ids) - 1)] == prediction)
    relabelled[found] = majority[index[found]]
    return relabelled


def majority_mean_iou(predictions, references, num_labels, ignore_index=None):
    """Mean IoU after majority-label assignment of every predicted region (see `majority_label_assignment`)."""
    predictions, references = _paired_label_maps(predictions, references)
    relabelled = [majority_label_assignment(p, r, ignore_index) for p, r in zip(predictions, references)]
    return mean_iou(relabelled, references, num_labels=num_labels, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------------------------
# Segmentation hierarchies
# --------------------------------------------------------------------------------------------------------------


def evaluate_hierarchy(
    label_maps_per_level, references, num_labels, ignore_index=None, tolerance=1, exclude_labels=()
):
    """Score every level of a segmentation hierarchy (CAST's or the ViT + k-means baseline's).

    Args:
        label_maps_per_level: one entry per level (finest first), each a `[B, H, W]` batch or a list of maps with
            arbitrary region ids.
        references: the ground-truth label maps of the same images (e.g. object or part masks).
        num_labels (`int`): number of reference classes, for the majority-assignment mIoU.
        ignore_index, tolerance, exclude_labels: as in `mean_iou`, `boundary_fscore`, `segment_matching`.

    Returns:
        list (one dict per level) with `num_segments` (mean regions per image), `majority_mean_iou`,
        `majority_pixel_accuracy`, `mean_best_overlap`, `covering`, `boundary_fscore`.
    """
    references = as_label_maps(references, "references")
    results = []
    for level, label_maps in enumerate(label_maps_per_level):
        predictions, _ = _paired_label_maps(label_maps, references)
        majority = majority_mean_iou(predictions, references, num_labels, ignore_index)
        matching = segment_matching(predictions, references, ignore_index, exclude_labels)
        boundary = boundary_fscore(predictions, references, tolerance, ignore_index)
        results.append(
            {
                "level": level,
                "num_segments": float(np.mean([len(np.unique(p)) for p in predictions])),
                "majority_mean_iou": majority["mean_iou"],
                "majority_pixel_accuracy": majority["overall_accuracy"],
                "mean_best_overlap": matching["mean_best_overlap"],
                "covering": matching["covering"],
                "boundary_fscore": boundary["boundary_fscore"],
            }
        )
    return results


__all__ = [
    "as_label_maps",
    "intersect_and_union",
    "mean_iou",
    "jaccard_from_counts",
    "per_image_jaccard",
    "boundary_map",
    "boundary_precision_recall",
    "boundary_fscore",
    "top_k_accuracy",
    "knn_accuracy",
    "contingency_table",
    "best_overlap",
    "segment_matching",
    "majority_label_assignment",
    "majority_mean_iou",
    "evaluate_hierarchy",
]
