"""Segment-wise reductions: turning a feature grid and a superpixel map into one token per segment."""

import numpy as np
import torch
import torch.nn.functional as F


def is_capturing_graph():
    """Whether the code runs under graph capture (torch.compile, torch.export / ONNX export, TorchScript tracing):
    there, checks that read tensor values (a host synchronisation, or a shape read from the data) are skipped."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def resize_labels_nearest(superpixels, size):
    """Resize an int label map [B, H, W] to `size` with PyTorch's legacy nearest (source index floor(i * in / out)).

    For a stride-8 grid this samples the top-left pixel of each 8x8 cell, as the original CAST does.
    """
    if tuple(superpixels.shape[-2:]) == tuple(size):
        return superpixels.long()
    resized = F.interpolate(superpixels[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].long()


def segment_sum_and_count(features, labels, num_segments):
    """Sum features per segment label.

    Args:
        features: [B, P, D] values of P grid cells.
        labels: int64 [B, P], values in 0..num_segments-1.
        num_segments: number of output segments S.

    Returns:
        sums [B, S, D] and counts [B, S] (float, the dtype of `features` promoted to at least float32).

    No shape depends on the label values (a label >= num_segments is an error the caller checks), so it compiles
    and exports; the counts are an index_add of ones rather than a `bincount` (whose length follows the data).
    """
    batch, cells, dim = features.shape
    # One index_add over the flattened batch (label l of image b is row b * S + l) adds whole rows at a time.
    offsets = torch.arange(0, batch * num_segments, num_segments, device=labels.device).unsqueeze(1)
    flat_labels = (labels + offsets).reshape(-1)
    # Half-precision features are summed in float32 (bfloat16 holds integers exactly only up to 256).
    accumulate = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    values = features.reshape(-1, dim).to(accumulate)
    sums = values.new_zeros(batch * num_segments, dim).index_add_(0, flat_labels, values)
    counts = values.new_zeros(batch * num_segments).index_add_(
        0, flat_labels, values.new_ones(()).expand(batch * cells)
    )
    return sums.view(batch, num_segments, dim), counts.view(batch, num_segments)


def segment_mean(features, labels, num_segments):
    """Mean of `features` [B, P, D] per label; absent labels give zeros. Returns (means [B, S, D], in the dtype of
    `features`, and counts [B, S], at least float32)."""
    sums, counts = segment_sum_and_count(features, labels, num_segments)
    return (sums / counts.clamp(min=1).unsqueeze(-1)).to(features.dtype), counts


def masked_mean(values, mask, dim=1, keepdim=False):
    """Mean of `values` over `dim`, counting only entries where `mask` [B, N] is True (count clamped to >= 1)."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    total = (values * weights).sum(dim=dim, keepdim=keepdim)
    count = weights.sum(dim=dim, keepdim=keepdim).clamp(min=1)
    return total / count


def relabel_consecutive(labels):
    """Map the label ids of every label map in `labels` (`[..., H, W]`, numpy array or torch tensor) to 0..S-1,
    keeping their order: int64 of the same shape and type. Each `[H, W]` map is relabelled on its own."""
    is_tensor = torch.is_tensor(labels)
    array = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    if array.ndim < 2:
        raise ValueError(f"Expected label maps [..., H, W], got shape {array.shape}.")
    maps = array.reshape(-1, *array.shape[-2:])
    relabelled = np.stack([_relabel_map(label_map) for label_map in maps]).reshape(array.shape)
    return torch.from_numpy(relabelled).to(labels.device) if is_tensor else relabelled


def _relabel_map(labels):
    if labels.size and labels.min() >= 0 and labels.max() < 4 * labels.size:
        # Small non-negative ids (OpenCV's): a lookup table, linear time instead of np.unique's sort.
        present = np.zeros(int(labels.max()) + 1, dtype=bool)
        present[labels] = True
        return (np.cumsum(present) - 1)[labels].astype(np.int64)
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def resize_label_maps(label_maps, size):
    """Nearest resize of integer label maps `[..., H, W]` (numpy array or torch tensor) to `size = (height, width)`,
    sampling at pixel centres (as PIL's `NEAREST` and `F.interpolate(mode="nearest-exact")`). Returns int64 of the
    same type. (`resize_labels_nearest` is the model's own grid sampling, which takes the top-left pixel.)"""
    size = tuple(int(v) for v in size)
    is_tensor = torch.is_tensor(label_maps)
    tensor = label_maps if is_tensor else torch.from_numpy(np.ascontiguousarray(label_maps))
    if tuple(tensor.shape[-2:]) == size:
        resized = tensor.long()
    else:
        flat = tensor.reshape(-1, 1, *tensor.shape[-2:]).double()  # float64 holds every int32 label exactly
        resized = F.interpolate(flat, size=size, mode="nearest-exact").reshape(*tensor.shape[:-2], *size).long()
    return resized if is_tensor else resized.numpy()


def present_labels(grid_labels, num_labels):
    """Bool [B, num_labels]: which labels occur in each image of an int map [B, h, w]."""
    batch = grid_labels.shape[0]
    flat = grid_labels.reshape(batch, -1).long().clamp(max=num_labels)
    present = torch.zeros(batch, num_labels + 1, dtype=torch.bool, device=grid_labels.device)
    present.scatter_(1, flat, True)
    return present[:, :num_labels]


def unused_label_counts(label_maps):
    """Per image, how many ids below its largest one its int label map [B, ..., H, W] does not use (int64 [B]); all
    zeros when every map is numbered consecutively from 0 (see `relabel_consecutive`)."""
    flat = label_maps.reshape(label_maps.shape[0], -1).long()  # [B, P]
    largest = flat.amax(dim=1)  # [B]
    present = present_labels(flat, int(largest.max()) + 1)  # [B, max + 1]
    return largest + 1 - present.sum(dim=1)


__all__ = [
    "is_capturing_graph",
    "resize_labels_nearest",
    "segment_sum_and_count",
    "segment_mean",
    "masked_mean",
    "relabel_consecutive",
    "resize_label_maps",
    "present_labels",
    "unused_label_counts",
]
