"""SAM's automatic masks without torchvision: transformers' `mask-generation` pipeline with its last step in torch.

transformers' pipeline (a grid of point prompts, batch by batch, masks filtered by predicted IoU and stability)
ends with a non-maximum suppression of the masks' boxes, for which its image processors call torchvision's
`batched_nms`. This package does not install torchvision, so there that step raises an ImportError.
`SamMaskGenerationPipeline` is the same pipeline with that step in plain torch (`non_maximum_suppression`, the same
greedy rule as torchvision's `nms`):

    from hf_hierseg.evaluation.sam_masks import sam_mask_generator

    generator = sam_mask_generator("facebook/sam-vit-huge")
    masks = generator(image, points_per_batch=64)["masks"]  # boolean [H, W] arrays, one per mask
"""

from collections import defaultdict

import numpy as np
import torch
from transformers import MaskGenerationPipeline, pipeline


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """[N, N] intersection over union of every pair of `boxes` ([N, 4] as x0, y0, x1, y1; the area of a box is
    (x1 - x0) * (y1 - y0), as torchvision counts it). Two empty boxes have IoU 0."""
    boxes = boxes.float()
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])  # [N, N, 2]
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = areas[:, None] + areas[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def non_maximum_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64, highest score first) of the boxes that greedy non-maximum suppression keeps: going down the
    scores, a box is dropped when its IoU with a box already kept is above `iou_threshold` (torchvision's `nms`;
    equal scores keep the earlier box first). `boxes`: [N, 4] as x0, y0, x1, y1; `scores`: [N]."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"Expected boxes [N, 4] and scores [N], got {tuple(boxes.shape)} and {tuple(scores.shape)}.")
    order = torch.argsort(scores, descending=True, stable=True)
    overlaps = box_iou(boxes[order]) > iou_threshold  # [N, N], in score order
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    kept = []
    for position in range(len(order)):
        if not suppressed[position]:
            kept.append(position)
            suppressed |= overlaps[position]
    return order[torch.tensor(kept, dtype=torch.long)]


def rle_to_mask(rle: dict) -> np.ndarray:
    """Boolean [height, width] mask of an uncompressed run-length encoding {"size": [height, width], "counts": [...]}
    (column-major runs, starting with a run of False), as SAM's mask generation encodes its masks."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"The runs cover {counts.sum()} pixels, not {height} x {width}.")
    values = np.arange(len(counts)) % 2 == 1  # False, True, False, ...
    return np.repeat(values, counts).reshape(width, height).T


class SamMaskGenerationPipeline(MaskGenerationPipeline):
    """transformers' `mask-generation` pipeline whose last step, the non-maximum suppression of the masks found by
    every batch of point prompts, runs in torch (`non_maximum_suppression`) instead of torchvision. The outputs are
    the pipeline's: `masks` (boolean arrays), `scores`, and with `output_rle_mask` / `output_bboxes_mask` the
    run-length encodings and boxes."""

    def postprocess(self, model_outputs, output_rle_mask=False, output_bboxes_mask=False, crops_nms_thresh=0.7):
        scores = torch.cat([output.pop("iou_scores") for output in model_outputs])
        encodings = [encoding for output in model_outputs for encoding in output.pop("masks")]
        boxes = torch.cat([output.pop("boxes") for output in model_outputs])
        kept = non_maximum_suppression(boxes, scores, crops_nms_thresh).tolist()
        result = {"masks": [rle_to_mask(encodings[index]) for index in kept], "scores": scores[kept]}
        if output_rle_mask:
            result["rle_mask"] = [encodings[index] for index in kept]
        if output_bboxes_mask:
            result["bounding_boxes"] = boxes[kept]
        extra = defaultdict(list)  # what else the model outputs carried, as the parent class returns it
        for output in model_outputs:
            for key, value in output.items():
                extra[key].append(value)
        return {**result, **extra}


def sam_mask_generator(model, device="cpu", **pipeline_kwargs):
    """The `mask-generation` pipeline of a SAM model (Hub id, folder or `SamModel`) as `SamMaskGenerationPipeline`:
    no torchvision needed."""
    return pipeline(
        "mask-generation", model=model, device=device, pipeline_class=SamMaskGenerationPipeline, **pipeline_kwargs
    )


__all__ = ["SamMaskGenerationPipeline", "box_iou", "non_maximum_suppression", "rle_to_mask", "sam_mask_generator"]
