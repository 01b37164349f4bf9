"""How far a CAST model in another precision (bfloat16, float16) strays from its float32 self: the share of segment
pairs grouped alike at every level, and the cosine of the image embeddings.

    from hf_hierseg.evaluation.precision import compare_precisions, grouping_agreement

    report = grouping_agreement(model_float32, model_bfloat16, inputs)  # inputs: the processor's output
    report.level_agreement  # per level, the share of segment pairs both models group alike (or both apart)
"""

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupingAgreement:
    """`level_agreement`: per level 1..4, the share of pairs of level-1 segments (present in the image, over all
    images) on which both models agree whether the two lie in one group. `embedding_cosine`: per image, the cosine of
    the two `pooler_output` embeddings. `num_pairs`: the pairs counted per level."""

    level_agreement: tuple[float, ...]
    embedding_cosine: tuple[float, ...]
    num_pairs: int

    @property
    def min_embedding_cosine(self):
        return min(self.embedding_cosine)

    def as_dict(self):
        return {
            "level_agreement": list(self.level_agreement),
            "embedding_cosine": list(self.embedding_cosine),
            "min_embedding_cosine": self.min_embedding_cosine,
            "num_pairs": self.num_pairs,
        }


def pair_agreement(groups_a, groups_b, valid):
    """Agreeing and total pairs among the valid segments of one image: groups int64 [N], valid bool [N]."""
    groups_a, groups_b = groups_a[valid], groups_b[valid]
    together_a = groups_a.unsqueeze(0) == groups_a.unsqueeze(1)  # [n, n]
    together_b = groups_b.unsqueeze(0) == groups_b.unsqueeze(1)
    upper = torch.triu(torch.ones_like(together_a), diagonal=1)
    agree = ((together_a == together_b) & upper).sum()
    return int(agree), int(upper.sum())


@torch.no_grad()
def grouping_agreement(model_a, model_b, inputs):
    """Compare two CAST models (e.g. float32 and bfloat16 copies) on the same inputs: a dict-like batch with
    `pixel_values` [B, 3, H, W] and `superpixels` [B, H, W] (each model gets `pixel_values` in its own dtype).
    Returns a `GroupingAgreement`; pairs are counted over the level-1 segments present in each image."""
    outputs = []
    for model in (model_a, model_b):
        parameter = next(model.parameters())
        pixel_values = inputs["pixel_values"].to(parameter.device, parameter.dtype)
        outputs.append(model(pixel_values=pixel_values, superpixels=inputs["superpixels"].to(parameter.device)))
    output_a, output_b = outputs
    present = ~output_a.padding_masks[0].cpu()  # [B, N_1]
    agreements = []
    num_pairs = 0
    for groups_a, groups_b in zip(output_a.hierarchy, output_b.hierarchy):
        agree = total = 0
        for image in range(present.shape[0]):
            image_agree, image_total = pair_agreement(groups_a[image].cpu(), groups_b[image].cpu(), present[image])
            agree, total = agree + image_agree, total + image_total
        agreements.append(agree / max(total, 1))
        num_pairs = total
    embedding_a = output_a.pooler_output.float().cpu()
    embedding_b = output_b.pooler_output.float().cpu()
    cosine = torch.nn.functional.cosine_similarity(embedding_a, embedding_b, dim=-1)
    return GroupingAgreement(tuple(agreements), tuple(float(value) for value in cosine), num_pairs)


def weights_rounded_to(model, dtype):
    """A copy of `model` that keeps its dtype but holds every floating-point parameter and buffer rounded to `dtype`
    (e.g. bfloat16) and back: the half-precision model's weights, computed in the model's own precision. Set
    against the half-precision model, it separates what the rounding of the weights moves from what the rounding of
    the activations moves."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in list(rounded.parameters()) + list(rounded.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
    return rounded


class AutocastForward(torch.nn.Module):
    """`model` (float32) with its forward under `torch.autocast` in `dtype`: half-precision matmuls, float32 norms and
    residual stream."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, **inputs):
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=self.dtype):
            return self.model(**inputs)


def compare_precisions(
    model_path,
    images,
    dtypes=(torch.bfloat16, torch.float16),
    model_class=None,
    batch_size=8,
    rounded_weights=False,
    autocast=False,
):
    """`{dtype name: GroupingAgreement}` of the model saved in `model_path` loaded with `from_pretrained(...,
    dtype=dtype)` against its float32 load, on `images` (PIL images, processed by the model's saved processor).
    With `rounded_weights`, also `{"<dtype name> weights, float32 compute": ...}` per dtype: the float32 model with
    its weights rounded to that dtype (`weights_rounded_to`); with `autocast`, `{"<dtype name> autocast": ...}`, the
    float32 model run under `torch.autocast` in that dtype (`AutocastForward`)."""
    from ..image_processing_cast import CastImageProcessor
    from ..modeling_cast import CastModel

    model_class = model_class or CastModel
    processor = CastImageProcessor.from_pretrained(model_path)
    reference = model_class.from_pretrained(model_path, dtype=torch.float32).eval()
    batches = [
        processor(images[start : start + batch_size], return_tensors="pt")
        for start in range(0, len(images), batch_size)
    ]
    results = {}
    for dtype in dtypes:
        model = model_class.from_pretrained(model_path, dtype=dtype).eval()
        name = str(dtype).removeprefix("torch.")
        candidates = {name: model}
        if rounded_weights:
            candidates[f"{name} weights, float32 compute"] = weights_rounded_to(reference, dtype)
        if autocast:
            candidates[f"{name} autocast"] = AutocastForward(reference, dtype)
        for key, candidate in candidates.items():
            results[key] = merge_agreements([grouping_agreement(reference, candidate, batch) for batch in batches])
    return results


def merge_agreements(reports):
    """One `GroupingAgreement` for several batches (pair-weighted agreement per level, all images' cosines)."""
    total = sum(report.num_pairs for report in reports)
    levels = len(reports[0].level_agreement)
    agreement = tuple(
        sum(report.level_agreement[level] * report.num_pairs for report in reports) / max(total, 1)
        for level in range(levels)
    )
    cosines = tuple(value for report in reports for value in report.embedding_cosine)
    return GroupingAgreement(agreement, cosines, total)


__all__ = [
    "AutocastForward",
    "GroupingAgreement",
    "compare_precisions",
    "grouping_agreement",
    "merge_agreements",
    "pair_agreement",
    "weights_rounded_to",
]
