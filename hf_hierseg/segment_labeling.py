"""Open-vocabulary labels for segments: every segment is shown alone to a CLIP-style model and matched to prompts.

This is the protocol of CAST's PartImageNet evaluation (Ke, Mo & Yu, ICLR 2024; the authors' notebooks
`eval_ovseg_cast.ipynb` and `utils.py`):

- a segment's *view* is CLIP's input image with every pixel outside the segment set to 0.5 *after* CLIP's
  normalisation (`masking="fill"`, the default); alternatives: `"crop"` (the segment's bounding box, context
  included, resized to the input size) and `"blur"` (pixels outside the segment blurred);
- the view's image embedding is matched (cosine similarity) against the text embeddings of
  `"a photo of a {name}"` for every object name and `"Background"`;
- a part segment is matched only against the part names of the object its pixels were labelled with; a part of the
  background is background.

Segments are given as boolean masks `[S, H, W]` at the resolution their labels are painted at, and the CLIP input
of their image as `pixel_values` `[3, h, w]`; views are built from the masks resized to `(h, w)`. Views are encoded
in batches: one `get_image_features` call per `segment_batch_size` views, across images. Works with any model that
has `get_image_features` and `get_text_features` (`CLIPModel`, `SiglipModel`, ...).

This module is shipped as remote code: relative imports only.
"""

import itertools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .segment_ops import resize_label_maps


BACKGROUND_LABEL = "Background"
DEFAULT_HYPOTHESIS_TEMPLATE = "a photo of a {}"  # the authors' prompt, without a full stop
MASKING_MODES = ("fill", "crop", "blur")
DEFAULT_FILL_VALUE = 0.5  # in CLIP's normalised pixel space, as the authors
DEFAULT_BLUR_SIGMA = 8.0  # pixels of CLIP's input
DEFAULT_SEGMENT_BATCH_SIZE = 32
SIGLIP_TEXT_LENGTH = 64  # SigLIP was trained on texts padded to 64 tokens (as transformers' zero-shot pipeline)


# --------------------------------------------------------------------------------------------------------------
# The CLIP-style model
# --------------------------------------------------------------------------------------------------------------


def check_clip_model(clip_model, user):
    """Raise a `TypeError` naming `user` unless `clip_model` has `get_image_features` and `get_text_features`."""
    missing = [
        name for name in ("get_image_features", "get_text_features") if not callable(getattr(clip_model, name, None))
    ]
    if missing:
        raise TypeError(
            f"{user} needs a CLIP-style model with `get_image_features` and `get_text_features` (CLIPModel, "
            f"SiglipModel, ...); {type(clip_model).__name__} has no {', '.join(missing)}."
        )


def uses_sigmoid(clip_model):
    """SigLIP models score each text on its own (sigmoid); CLIP models compare the texts (softmax)."""
    return "siglip" in str(getattr(clip_model.config, "model_type", ""))


def _unit_embeddings(output):
    """Unit-norm float32 embeddings from `get_*_features` (a tensor, or an output with `pooler_output`)."""
    features = output if torch.is_tensor(output) else output.pooler_output
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def encode_texts(clip_model, tokenizer, names, hypothesis_template=DEFAULT_HYPOTHESIS_TEMPLATE):
    """Unit text embeddings float32 `[N, D]` of `hypothesis_template.format(name)` for each of `names`."""
    prompts = [hypothesis_template.format(name) for name in names]
    if uses_sigmoid(clip_model):  # SigLIP reads 64 tokens, padding included (it was trained without a mask)
        options, keys = {"padding": "max_length", "max_length": SIGLIP_TEXT_LENGTH, "truncation": True}, ("input_ids",)
    else:
        options, keys = {"padding": True, "truncation": True}, ("input_ids", "attention_mask")
    tokens = tokenizer(prompts, return_tensors="pt", **options)
    inputs = {key: tokens[key].to(clip_model.device) for key in keys if key in tokens}
    return _unit_embeddings(clip_model.get_text_features(**inputs))


def match_texts(clip_model, image_embeddings, text_embeddings):
    """The best text for each image embedding: `(indices int64 [S], scores float32 [S])`.

    The index is the argmax of the cosine similarity (the authors' rule). The score is the probability of that text:
    the softmax over the texts of CLIP's scaled logits (`logit_scale`), or for SigLIP the sigmoid of its scaled and
    biased logit."""
    cosine = image_embeddings @ text_embeddings.T  # [S, N]
    logit_scale = getattr(clip_model, "logit_scale", None)
    logits = cosine * (logit_scale.exp().float() if logit_scale is not None else 1.0)
    if uses_sigmoid(clip_model):
        logit_bias = getattr(clip_model, "logit_bias", None)
        probabilities = torch.sigmoid(logits + (logit_bias.float() if logit_bias is not None else 0.0))
    else:
        probabilities = logits.softmax(dim=-1)
    indices = cosine.argmax(dim=-1)
    return indices, probabilities.gather(1, indices[:, None])[:, 0]


# --------------------------------------------------------------------------------------------------------------
# Segment masks and views
# --------------------------------------------------------------------------------------------------------------


def segment_masks(segment_map):
    """The segments of an integer label map `[H, W]`: `(ids int64 [S], masks bool [S, H, W])`, ids ascending."""
    segment_map = torch.as_tensor(segment_map).long()
    ids = segment_map.unique()
    return ids, segment_map[None] == ids[:, None, None]


def resize_masks(masks, size):
    """Boolean masks `[S, H, W]` at `size = (h, w)`: nearest at pixel centres (`segment_ops.resize_label_maps`); a
    mask too small to keep a pixel gets every pixel its area overlaps, so no non-empty mask becomes empty."""
    size = tuple(int(value) for value in size)
    if tuple(masks.shape[-2:]) == size:
        return masks
    resized = resize_label_maps(masks.to(torch.uint8), size).bool()
    lost = masks.flatten(1).any(1) & ~resized.flatten(1).any(1)
    if lost.any():
        coverage = F.interpolate(masks[lost][None].float(), size=size, mode="area")[0]  # fraction of each pixel
        resized[lost] = coverage > 0
    return resized


def gaussian_blur(pixel_values, sigma):
    """`[3, h, w]` blurred with a separable Gaussian of standard deviation `sigma` pixels (edges replicated)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixel_values.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(pixel_values.dtype)
    channels = pixel_values.shape[0]
    image = F.pad(pixel_values[None], (radius, radius, radius, radius), mode="replicate")
    image = F.conv2d(image, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    image = F.conv2d(image, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return image[0]


def check_masking(masking, fill_value=DEFAULT_FILL_VALUE, blur_sigma=DEFAULT_BLUR_SIGMA):
    if masking not in MASKING_MODES:
        raise ValueError(f"`masking` must be one of {MASKING_MODES}, got {masking!r}.")
    if isinstance(fill_value, bool) or not isinstance(fill_value, (int, float)) or not math.isfinite(fill_value):
        raise ValueError(f"`fill_value` must be a finite number, got {fill_value!r}.")
    if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not blur_sigma > 0:
        raise ValueError(f"`blur_sigma` must be a positive number of pixels, got {blur_sigma!r}.")


def segment_views(
    pixel_values, masks, masking="fill", fill_value=DEFAULT_FILL_VALUE, blur_sigma=DEFAULT_BLUR_SIGMA, blurred=None
):
    """CLIP inputs `[S, 3, h, w]` showing each segment of `masks` (bool `[S, h, w]`) of one image alone.

    Args:
        pixel_values: the image as CLIP's processor returns it, `[3, h, w]` (normalised).
        masking: `"fill"`: pixels outside the segment set to `fill_value` (in normalised space; the authors' 0.5);
            `"crop"`: the segment's bounding box (other segments' pixels in it included), resized to `(h, w)`
            (bicubic); `"blur"`: pixels outside the segment replaced by the image blurred with a Gaussian of
            `blur_sigma` pixels (`blurred`, if given, is that blurred image).
    """
    check_masking(masking, fill_value, blur_sigma)
    if masks.shape[-2:] != pixel_values.shape[-2:]:
        raise ValueError(
            f"`masks` {tuple(masks.shape)} must have the size of `pixel_values` {tuple(pixel_values.shape)}."
        )
    inside = masks[:, None]  # [S, 1, h, w]
    if masking == "fill":
        return torch.where(inside, pixel_values[None], torch.full_like(pixel_values[None], fill_value))
    if masking == "blur":
        blurred = gaussian_blur(pixel_values, blur_sigma) if blurred is None else blurred
        return torch.where(inside, pixel_values[None], blurred[None])
    views = []
    size = tuple(pixel_values.shape[-2:])
    for mask in masks:
        rows, columns = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
        if len(rows) == 0:  # an empty mask shows the whole image
            views.append(pixel_values)
            continue
        box = pixel_values[:, rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        views.append(F.interpolate(box[None].float(), size=size, mode="bicubic", align_corners=False)[0])
    return torch.stack(views).to(pixel_values.dtype)


def check_segment_batch_size(segment_batch_size):
    """Raise a `ValueError` unless `segment_batch_size` (views per CLIP call) is a positive integer."""
    if isinstance(segment_batch_size, bool) or not isinstance(segment_batch_size, int) or segment_batch_size < 1:
        raise ValueError(f"`segment_batch_size` must be a positive integer, got {segment_batch_size!r}.")


@torch.no_grad()
def encode_segments(
    clip_model,
    pixel_values,
    masks,
    masking="fill",
    segment_batch_size=DEFAULT_SEGMENT_BATCH_SIZE,
    fill_value=DEFAULT_FILL_VALUE,
    blur_sigma=DEFAULT_BLUR_SIGMA,
):
    """Unit image embeddings of the views of every segment (see `segment_views`).

    Args:
        pixel_values: CLIP input of each image, a list of `[3, h, w]`.
        masks: boolean masks of each image's segments, a list of `[S_i, H, W]` (resized to `(h, w)` here).
        segment_batch_size: views per `get_image_features` call; the views of several images share a batch.

    Returns:
        a list of float32 `[S_i, D]`, one per image.
    """
    check_segment_batch_size(segment_batch_size)
    if len(pixel_values) != len(masks):
        raise ValueError(f"Got {len(pixel_values)} images but segment masks for {len(masks)}.")
    view_masks = [resize_masks(image_masks, image.shape[-2:]) for image, image_masks in zip(pixel_values, masks)]
    blurred = [gaussian_blur(image, blur_sigma) if masking == "blur" else None for image in pixel_values]
    order = [(index, segment) for index, image_masks in enumerate(view_masks) for segment in range(len(image_masks))]
    dtype, device = getattr(clip_model, "dtype", torch.float32), clip_model.device
    embeddings = []
    for start in range(0, len(order), segment_batch_size):
        views = []  # the batch's views, image by image
        for index, group in itertools.groupby(order[start : start + segment_batch_size], key=lambda item: item[0]):
            segments = [segment for _, segment in group]
            chosen = view_masks[index][segments[0] : segments[-1] + 1]
            views.append(segment_views(pixel_values[index], chosen, masking, fill_value, blur_sigma, blurred[index]))
        views = torch.cat(views).to(device=device, dtype=dtype)
        embeddings.append(_unit_embeddings(clip_model.get_image_features(pixel_values=views)))
    if not embeddings:
        return [torch.zeros(0, 0) for _ in masks]
    return list(torch.cat(embeddings).split([len(image_masks) for image_masks in view_masks]))


# --------------------------------------------------------------------------------------------------------------
# Objects and parts
# --------------------------------------------------------------------------------------------------------------


def _check_names(names, argument):
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"`{argument}` must be a non-empty list of names, got {names!r}.")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"`{argument}` must hold non-empty strings, got {name!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`{argument}` has duplicate names: {sorted({n for n in names if names.count(n) > 1})}.")
    return list(names)


def check_object_labels(candidate_labels):
    """The object names as a list: non-empty, unique strings, without the background (added by the labelling)."""
    names = _check_names(candidate_labels, "candidate_labels")
    if any(name.strip().lower() == BACKGROUND_LABEL.lower() for name in names):
        raise ValueError(f"`candidate_labels` must not contain {BACKGROUND_LABEL!r}: it is always a candidate.")
    return names


def part_vocabulary(object_labels, part_labels):
    """The part names and, for each object, the indices (into the part names) of its parts.

    Args:
        object_labels: the object names (see `check_object_labels`).
        part_labels: a mapping object name -> its part names, or a flat list of part names, where a part belongs to
            every object whose name it contains (the authors' rule for PartImageNet: "Quadruped Head" is a part of
            "Quadruped"). An object without parts keeps its own name as its only part.

    Returns:
        `(part_names, parts_of)`: the unique part names (in the order of the objects, then of their parts; the
        background is not among them) and, for every object, the list of its part indices.
    """
    object_labels = check_object_labels(object_labels)
    if isinstance(part_labels, Mapping):
        unknown = [name for name in part_labels if name not in object_labels]
        if unknown:
            raise ValueError(f"`part_labels` names objects that are not candidate labels: {unknown}.")
        grouped = {}
        for name, parts in part_labels.items():
            grouped[name] = _check_names(parts, f"part_labels[{name!r}]") if parts else []
    else:
        parts = _check_names(part_labels, "part_labels")
        grouped = {name: [part for part in parts if name in part] for name in object_labels}
        orphans = [part for part in parts if not any(part in group for group in grouped.values())]
        if orphans:
            raise ValueError(
                f"The parts {orphans} contain no object name, so they belong to no object: name each part after "
                "its object (e.g. 'Quadruped Head') or pass `part_labels` as a mapping object -> parts."
            )
    part_names, parts_of = [], []
    for name in object_labels:
        own_parts = grouped.get(name) or [name]
        for part in own_parts:
            if part not in part_names:
                part_names.append(part)
        parts_of.append([part_names.index(part) for part in own_parts])
    if any(name.strip().lower() == BACKGROUND_LABEL.lower() for name in part_names):
        raise ValueError(f"Part names must not contain {BACKGROUND_LABEL!r}: a part of the background is background.")
    return part_names, parts_of


def paint_masks(masks, values, fill, first_wins=True):
    """A map `[H, W]` with each mask's value; where masks overlap the first (or, with `first_wins=False`, the last)
    mask wins; pixels in no mask get `fill`. For a partition (a segment map's masks) both rules agree."""
    values = torch.as_tensor(values)
    if len(masks) == 0:
        return torch.full(masks.shape[-2:], fill, dtype=values.dtype, device=masks.device)
    order = masks if first_wins else masks.flip(0)
    winner = order.to(torch.uint8).argmax(dim=0)  # the first True along the masks
    if not first_wins:
        winner = len(masks) - 1 - winner
    painted = values.to(masks.device)[winner]
    return torch.where(masks.any(dim=0), painted, torch.full_like(painted, fill))


def majority_labels(masks, label_map, num_labels):
    """For each mask `[S, H, W]`, the most frequent label of `label_map` `[H, W]` (values in 0..num_labels-1) on its
    pixels; ties go to the smaller label. Returns int64 `[S]`."""
    one_hot = F.one_hot(label_map.flatten().long(), num_labels).float()  # [H*W, L]
    counts = masks.flatten(1).float() @ one_hot  # [S, L]
    return counts.argmax(dim=1)


def label_segments(
    clip_model,
    pixel_values,
    object_masks,
    object_texts,
    part_masks=None,
    part_texts=None,
    parts_of=None,
    masking="fill",
    segment_batch_size=DEFAULT_SEGMENT_BATCH_SIZE,
    fill_value=DEFAULT_FILL_VALUE,
    blur_sigma=DEFAULT_BLUR_SIGMA,
):
    """Object labels and, optionally, part labels of the segments of a batch of images.

    Args:
        clip_model: a CLIP-style model (see `check_clip_model`).
        pixel_values: CLIP input of each image, a list of `[3, h, w]`.
        object_masks: each image's object segments, a list of bool `[S_i, H, W]` (one resolution per image, shared
            with `part_masks`; the label maps are painted at it).
        object_texts: `encode_texts` of the object names followed by `BACKGROUND_LABEL`, `[C + 1, D]`.
        part_masks: each image's part segments, a list of bool `[P_i, H, W]`, or None for objects only.
        part_texts: `encode_texts` of the part names (`part_vocabulary`), `[N, D]`.
        parts_of: for each object, the indices of its parts (`part_vocabulary`).

    Returns:
        one dict per image: `object_labels` (int64 `[S_i]`, indices into the names + background, the background
        being `C`), `object_scores` (`[S_i]`, see `match_texts`), `object_map` (int64 `[H, W]`, where masks overlap
        the first wins, pixels in no mask are background) and, with parts, `part_labels` (indices into the part
        names + background, the background being `N`), `part_scores` (the object's score times the part's
        probability among the object's parts) and `part_map` (where masks overlap the last wins). The object under
        a part is the object label of most of its pixels; a part of the background, or of an object with a single
        part, is labelled without CLIP.
    """
    background = object_texts.shape[0] - 1
    object_embeddings = encode_segments(
        clip_model, pixel_values, object_masks, masking, segment_batch_size, fill_value, blur_sigma
    )
    results = []
    for masks, embeddings in zip(object_masks, object_embeddings):
        labels, scores = _match(clip_model, embeddings, object_texts, masks.device)
        results.append(
            {
                "object_labels": labels,
                "object_scores": scores,
                "object_map": paint_masks(masks, labels, background, first_wins=True),
            }
        )
    if part_masks is None:
        return results
    part_embeddings = encode_segments(
        clip_model, pixel_values, part_masks, masking, segment_batch_size, fill_value, blur_sigma
    )
    for result, objects, masks, embeddings in zip(results, object_masks, part_masks, part_embeddings):
        object_map = result["object_map"]
        score_map = paint_masks(objects, result["object_scores"], 1.0, first_wins=True)  # background: certain
        parents = majority_labels(masks, object_map, background + 1)
        on_parent = masks & (object_map[None] == parents[:, None, None])  # [P, H, W]
        parent_scores = (score_map[None] * on_parent).flatten(1).sum(1) / on_parent.flatten(1).sum(1).clamp(min=1)
        labels, scores = _label_parts(clip_model, embeddings, parents, parent_scores, part_texts, parts_of, background)
        result.update(
            part_labels=labels,
            part_scores=scores,
            part_map=paint_masks(masks, labels, part_texts.shape[0], first_wins=False),
        )
    return results


def _match(clip_model, embeddings, texts, device):
    """`match_texts` on `device`; no segments give empty results."""
    if len(embeddings) == 0:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device)
    labels, scores = match_texts(clip_model, embeddings, texts)
    return labels.to(device), scores.to(device)


def _label_parts(clip_model, embeddings, parents, parent_scores, part_texts, parts_of, background):
    """Part label and score of each part segment given the object under it (see `label_segments`)."""
    labels = torch.full_like(parents, part_texts.shape[0])  # the background
    scores = parent_scores.clone()
    for parent in parents.unique().tolist():
        if parent == background:
            continue
        chosen, candidates = parents == parent, parts_of[parent]
        if len(candidates) == 1:
            labels[chosen] = candidates[0]
            continue
        indices, probabilities = _match(
            clip_model, embeddings[chosen.to(embeddings.device)], part_texts[candidates], labels.device
        )
        labels[chosen] = torch.tensor(candidates, device=labels.device)[indices]
        scores[chosen] = parent_scores[chosen] * probabilities
    return labels, scores


__all__ = [
    "BACKGROUND_LABEL",
    "DEFAULT_HYPOTHESIS_TEMPLATE",
    "MASKING_MODES",
    "check_clip_model",
    "check_masking",
    "check_object_labels",
    "check_segment_batch_size",
    "encode_segments",
    "encode_texts",
    "gaussian_blur",
    "label_segments",
    "majority_labels",
    "match_texts",
    "paint_masks",
    "part_vocabulary",
    "resize_masks",
    "segment_masks",
    "segment_views",
    "uses_sigmoid",
]
