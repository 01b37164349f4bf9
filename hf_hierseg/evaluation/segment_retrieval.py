"""Unsupervised semantic segmentation by nearest-neighbour retrieval of segments: the authors' VOC protocol.

What the authors' code computes (twke18/CAST, MIT: `scripts/spml/nn_cast.sh`, which runs the SPML scripts
`pyscripts/inference/prototype_suppix.py` (memory), `pyscripts/inference/inference_suppix.py` (retrieval) and
`pyscripts/benchmark/benchmark_by_mIoU.py` (score), with the embedding model `spml/models/embeddings/cast.py`,
`cast_small_p512_retrieval`, and the config `configs/voc12_template.yaml`):

- **Model.** CAST-S pre-trained with MoCo v3 on COCO as `cast_seg_small_pretrain` (the segmentation-stage CAST
  of `cast_models/cast_seg.py`: no final LayerNorm; its image embedding is the mean over the level-1 segments of
  BlockFusion's output, fed to the MoCo projector), the epoch-149 checkpoint. For retrieval it is rebuilt as
  `cast_small` of the same file (512 px, superpixel features pooled at full resolution, 320 / 160 / 80 / 40
  clusters) and keeps the MoCo projector (Linear 384-4096, BN, ReLU, Linear 4096-4096, BN, ReLU, Linear 4096-256,
  BN without affine; EMBEDDING_DIM 256) as a head applied to every level-1 segment. In this package that is a
  converted checkpoint loaded as `CastForSemanticSegmentation` with `segmentation_head_type="mlp_projector"`.
- **Inputs.** SEEDS superpixels on each VOC image at its own size (1024 superpixels, LAB, 1 level, prior 2,
  5 histogram bins, 15 iterations); then image (bilinear), superpixels and ground truth (nearest) are resized so that
  the longer side is 512 (`config.test.image_size`; the crop size 512 is the training crop, and the inference
  scripts neither crop nor pad). ImageNet mean / std normalisation.
- **Segment embeddings.** One 256-d vector per superpixel: BlockFusion (the superpixel's level-1 token concatenated
  with the tokens of its level-2, 3 and 4 groups through the argmax assignments, BatchNorm, Linear 4C -> C), then
  the projector. Every pixel takes its superpixel's vector, L2-normalised.
- **Segments.** The level-4 groups of CAST's hierarchy (the argmax of the four assignment logits, composed: at most
  40 per image). No k-means: `KMEANS_ITERATIONS 15`, `--kmeans_num_clusters 6,6` and `--label_divisor 2048` configure
  SPML's spherical k-means, which the CAST embedding model never calls.
- **Prototypes.** A segment's prototype is the L2-normalised sum of its pixels' normalised embeddings (so
  superpixels weigh by their area).
- **Memory.** Every segment of every training image (VOC `train+`, 10,582 images), its prototype labelled with the
  majority ground-truth label of its pixels, the ignore label 255 counting as one more label; segments whose
  majority is 255 are dropped. No per-class averaging: the memory holds all training segments.
- **Retrieval.** Each validation segment's prototype is compared by inner product (cosine) with every memory
  prototype; the 20 most similar vote, unweighted, and the segment takes the most frequent label (ties: the smaller
  label). Its pixels take that label; the map is resized (nearest) back to the image's size.
- **Metric.** TP, TP + FP and TP + FN per class accumulated over all validation pixels whose ground truth is a
  class (255 ignored); IoU_c = TP / (TP + FP + FN); mIoU = the sum over the 21 classes / 21 (a class absent from
  both counts 0). Paper: 38.4 for CAST-S.

This module implements those steps for any segments and embeddings:

- `CastRetrievalSegments`: segments from any CAST level; embeddings `"fused"` (a `CastForSemanticSegmentation`'s
  per-segment output: for a converted MoCo `cast_seg` checkpoint, exactly the authors' BlockFusion + projector),
  `"levels"` (the segment's tokens at the four levels, each L2-normalised, concatenated: BlockFusion's input without
  its learned projection, the default for models without a fusion, e.g. MoCo or classifier CAST) or `"last"` (the
  level-4 token).
- `VitRetrievalSegments`: the ViT + k-means segments of `baselines.vit_kmeans_hierarchy` with as many clusters as
  the CAST level, embedded by the ViT's patch tokens (`"levels"`: four evenly spaced layers, each L2-normalised,
  concatenated; `"last"`: the final layer, which k-means clusters), bilinearly upsampled to pixels.
- `SegmentMemory`, `retrieve_labels`, `evaluate_segment_retrieval`: memory, the 20-NN vote and the scores
  (`metrics.mean_iou`, both means: classes absent everywhere left out, and the authors' sum / number of classes).
- Floors: `majority_class_floor` (every pixel the memory's most frequent label: what retrieval scores when the
  embeddings carry no class information) and `grid_partition` / `superpixel_grid_partition` (content-blind segments
  for the majority-label mIoU).

Views: `"square"` resizes every image to `image_size` x `image_size` (the models trained here); `"longest_edge"`
resizes the longer side to `image_size` keeping the aspect ratio (the authors' 512), both sides rounded down to
multiples of 8 (CAST's stride). Superpixels are computed on the resized view by the model's `CastImageProcessor`
(the authors compute them before resizing, on the original image, with 1024 per image).
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..configuration_cast import NUM_LEVELS, check_is_cast
from ..errors import InvalidInputError
from ..loading import load_cast_model, resolve_model_source
from ..modeling_cast import gather_to_segments
from ..segment_ops import relabel_consecutive, resize_label_maps, segment_sum_and_count
from .baselines import vit_kmeans_hierarchy
from .metrics import mean_iou
from .segmentation_eval import (
    format_score,
    infer_num_labels,
    load_dataset_split,
    read_image_mask_pairs,
    vit_baseline_model,
)
from .views import evaluation_processor, superpixel_settings


logger = logging.getLogger(__name__)

PAPER_TOP_K = 20
PAPER_LEVEL = 4
PAPER_IMAGE_SIZE = 512  # the longer side of the authors' views
VIEW_GEOMETRIES = ("square", "longest_edge")
CAST_EMBEDDINGS = ("fused", "levels", "last")
VIT_EMBEDDINGS = ("levels", "last")
VIEW_STRIDE = 8


# --------------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------------


def view_size(height, width, image_size, geometry="square"):
    """`(height, width)` of an image's view: `image_size` square, or the longer side `image_size` with the aspect
    ratio kept (`"longest_edge"`, as the authors' `resize_with_interpolation`), rounded down to multiples of 8."""
    if geometry not in VIEW_GEOMETRIES:
        raise ValueError(f"`geometry` must be one of {VIEW_GEOMETRIES}, got {geometry!r}.")
    if geometry == "square":
        new_height = new_width = image_size
    else:
        ratio = min(image_size / height, image_size / width)
        new_height, new_width = int(ratio * height), int(ratio * width)
    return (
        max(VIEW_STRIDE, new_height // VIEW_STRIDE * VIEW_STRIDE),
        max(VIEW_STRIDE, new_width // VIEW_STRIDE * VIEW_STRIDE),
    )


def resize_view(image, size):
    """An RGB PIL image resized (bilinear) to `size = (height, width)`."""
    image = image.convert("RGB")
    if image.size == (size[1], size[0]):
        return image
    return image.resize((size[1], size[0]), Image.Resampling.BILINEAR)


# --------------------------------------------------------------------------------------------------------------
# Segments and prototypes
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSegments:
    """One image's segments at each evaluated level: `segment_maps` (int64 `[h, w]` at the view size, ids 0..S-1)
    and `prototypes` (`[S, D]` unit rows, row s = segment s)."""

    segment_maps: list
    prototypes: list


def unit_prototypes(embeddings, weights, segment_ids, num_segments):
    """Prototypes of segments: the L2-normalised, `weights`-weighted sum of the L2-normalised `embeddings` `[P, D]`
    of their members (`segment_ids` int64 `[P]` in 0..num_segments-1). Returns `[num_segments, D]`."""
    unit = F.normalize(embeddings.float(), dim=-1) * weights.float().unsqueeze(-1)
    sums, _ = segment_sum_and_count(unit[None], segment_ids[None].long(), num_segments)
    return F.normalize(sums[0], dim=-1)


def cast_token_embeddings(model, outputs, embedding):
    """Per level-1 token embeddings `[B, N_1, D]` of a CAST forward pass `outputs` (see the module docstring)."""
    if embedding == "fused":
        if getattr(outputs, "segment_logits", None) is None:
            raise InvalidInputError(
                f"embedding 'fused' needs a CastForSemanticSegmentation (BlockFusion + head), got "
                f"{type(model).__name__}; use 'levels' or 'last'."
            )
        return outputs.segment_logits
    level_tokens = [hidden[:, 1:] for hidden in outputs.level_hidden_states]  # 4 x [B, N_l, C]
    if embedding == "last":
        return gather_to_segments(level_tokens[-1], outputs.hierarchy[NUM_LEVELS - 2])
    if embedding != "levels":
        raise ValueError(f"`embedding` must be one of {CAST_EMBEDDINGS}, got {embedding!r}.")
    segments = [level_tokens[0]] + [
        gather_to_segments(tokens, groups) for tokens, groups in zip(level_tokens[1:], outputs.hierarchy)
    ]
    return torch.cat([F.normalize(tokens, dim=-1) for tokens in segments], dim=-1)  # [B, N_1, 4C]


def default_cast_embedding(model):
    """`"fused"` for a model with BlockFusion and a per-segment head, else `"levels"`."""
    return "fused" if hasattr(model, "fusion") and hasattr(model, "classifier_per_segment") else "levels"


class CastRetrievalSegments:
    """CAST's segments at `levels` with their prototypes (`embedding` in `CAST_EMBEDDINGS`; None: the model's
    default, see `default_cast_embedding`). `processor` is the `CastImageProcessor` of the model's inputs; images are
    given already resized to their views."""

    name = "cast"

    def __init__(self, model, processor, levels=(PAPER_LEVEL,), embedding=None):
        check_is_cast(model, "CastRetrievalSegments")
        if any(level not in range(1, NUM_LEVELS + 1) for level in levels):
            raise ValueError(f"CAST levels are 1..{NUM_LEVELS}, got {tuple(levels)}.")
        self.model, self.processor, self.levels = model.eval(), processor, tuple(levels)
        self.embedding = embedding or default_cast_embedding(model)
        if self.embedding not in CAST_EMBEDDINGS:
            raise ValueError(f"`embedding` must be one of {CAST_EMBEDDINGS}, got {self.embedding!r}.")

    @torch.no_grad()
    def __call__(self, images):
        inputs = self.processor(images=images, do_resize=False, do_center_crop=False, return_tensors="pt")
        device = self.model.device
        pixel_values, superpixels = inputs["pixel_values"].to(device), inputs["superpixels"].to(device)
        outputs = self.model(pixel_values=pixel_values, superpixels=superpixels)
        embeddings = cast_token_embeddings(self.model, outputs, self.embedding).float()  # [B, N_1, D]
        token_maps = outputs.hierarchy_maps(superpixels)[0]  # [B, H, W]: the level-1 token of every pixel
        results = []
        for index in range(len(images)):
            token_map = token_maps[index]
            area = torch.bincount(token_map.flatten(), minlength=embeddings.shape[1]).float()  # [N_1]
            present = area > 0
            maps, prototypes = [], []
            for level in self.levels:
                groups = outputs.hierarchy[level - 1][index]  # [N_1]: group of every token
                _, segment_of_present = torch.unique(groups[present], return_inverse=True)
                segment_of_token = torch.zeros_like(groups).masked_scatter_(present, segment_of_present)
                num_segments = int(segment_of_present.max()) + 1
                maps.append(segment_of_token[token_map].cpu())
                prototypes.append(
                    unit_prototypes(embeddings[index][present], area[present], segment_of_present, num_segments).cpu()
                )
            results.append(ImageSegments(maps, prototypes))
        return results


def vit_layer_features(vit_model, pixel_values, embedding="levels", num_layers=NUM_LEVELS):
    """ViT patch-token maps `[B, D, h, w]`: the final layer (`"last"`, after the final LayerNorm, what the k-means
    baseline clusters) or `num_layers` evenly spaced layers, each L2-normalised per token, concatenated
    (`"levels"`)."""
    if embedding not in VIT_EMBEDDINGS:
        raise ValueError(f"`embedding` must be one of {VIT_EMBEDDINGS}, got {embedding!r}.")
    vit = getattr(vit_model, "vit", vit_model)
    patch_size = vit.config.patch_size
    height, width = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
    image_size = vit.config.image_size
    image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    outputs = vit(
        pixel_values=pixel_values,
        interpolate_pos_encoding=tuple(pixel_values.shape[-2:]) != image_size,
        output_hidden_states=embedding == "levels",
    )
    if embedding == "last":
        layers = [outputs.last_hidden_state]
    else:
        depth = len(outputs.hidden_states) - 1
        picked = sorted({max(1, round(depth * (index + 1) / num_layers)) for index in range(num_layers)})
        layers = [F.normalize(outputs.hidden_states[layer], dim=-1) for layer in picked]
    maps = []
    for tokens in layers:  # [B, prefix + h*w, C]
        patches = tokens[:, tokens.shape[1] - height * width :]
        maps.append(patches.transpose(1, 2).reshape(tokens.shape[0], -1, height, width))
    return torch.cat(maps, dim=1)


class VitRetrievalSegments:
    """The ViT + k-means segments (`baselines.vit_kmeans_hierarchy`, `num_clusters[i]` clusters for `levels[i]`)
    with prototypes of the upsampled patch tokens (`embedding` in `VIT_EMBEDDINGS`). `processor` gives the
    normalised pixels (any `CastImageProcessor`; its superpixels are not used: `superpixel_method="grid"` is cheapest).
    Prototypes are computed on the view resized to at most `max_prototype_pixels` pixels."""

    name = "vit_kmeans"

    def __init__(
        self,
        vit_model,
        processor,
        num_clusters,
        levels=(PAPER_LEVEL,),
        embedding="levels",
        max_fit_pixels=4096,
        max_prototype_pixels=65536,
        seed=0,
    ):
        if len(num_clusters) != len(levels):
            raise ValueError(f"Give one cluster count per level: {tuple(num_clusters)} for levels {tuple(levels)}.")
        self.vit_model, self.processor = vit_model.eval(), processor
        self.num_clusters, self.levels = tuple(num_clusters), tuple(levels)
        self.embedding, self.max_fit_pixels, self.max_prototype_pixels, self.seed = (
            embedding,
            max_fit_pixels,
            max_prototype_pixels,
            seed,
        )

    @torch.no_grad()
    def __call__(self, images):
        inputs = self.processor(images=images, do_resize=False, do_center_crop=False, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.vit_model.device)
        # k-means needs strictly decreasing counts: cluster once per distinct count, finest first.
        counts = sorted(set(self.num_clusters), reverse=True)
        maps = vit_kmeans_hierarchy(
            self.vit_model, pixel_values, counts, max_fit_pixels=self.max_fit_pixels, seed=self.seed
        )
        maps_of = dict(zip(counts, maps))
        features = vit_layer_features(self.vit_model, pixel_values, self.embedding).float()
        height, width = pixel_values.shape[-2:]
        scale = min(1.0, math.sqrt(self.max_prototype_pixels / (height * width)))
        grid = (max(1, round(height * scale)), max(1, round(width * scale)))
        pixel_features = F.interpolate(features, size=grid, mode="bilinear").flatten(2).transpose(1, 2)  # [B, P, D]
        results = []
        for index in range(len(images)):
            segment_maps, prototypes = [], []
            for clusters in self.num_clusters:
                segment_map = relabel_consecutive(maps_of[clusters][index].cpu())
                grid_ids = resize_label_maps(segment_map, grid).flatten()
                num_segments = int(segment_map.max()) + 1
                weights = torch.ones_like(grid_ids, dtype=torch.float32)
                segment_maps.append(segment_map)
                prototypes.append(unit_prototypes(pixel_features[index].cpu(), weights, grid_ids, num_segments))
            results.append(ImageSegments(segment_maps, prototypes))
        return results


# --------------------------------------------------------------------------------------------------------------
# Memory and retrieval
# --------------------------------------------------------------------------------------------------------------


def majority_segment_labels(segment_map, label_map, num_labels, ignore_index=None):
    """The majority label of every segment of `segment_map` (int `[h, w]`, ids 0..S-1) in `label_map` (same size),
    `ignore_index` pixels counting as one more label (as the authors count 255); ties go to the smaller label.
    Returns int64 `[S]`, `ignore_index` (or -1) for segments whose majority is ignored."""
    segment_map = torch.as_tensor(np.asarray(segment_map)).long().flatten()
    labels = torch.as_tensor(np.asarray(label_map)).long().flatten()
    ignored = labels == ignore_index if ignore_index is not None else torch.zeros_like(labels, dtype=torch.bool)
    outside = ~ignored & ((labels < 0) | (labels >= num_labels))
    if outside.any():
        raise InvalidInputError(
            f"Mask labels must be 0..{num_labels - 1} (or the ignore index {ignore_index}); found "
            f"{sorted(labels[outside].unique().tolist())[:5]}."
        )
    labels = torch.where(ignored, torch.full_like(labels, num_labels), labels)
    num_segments = int(segment_map.max()) + 1
    counts = torch.zeros(num_segments * (num_labels + 1), dtype=torch.long)
    counts.index_add_(0, segment_map * (num_labels + 1) + labels, torch.ones_like(labels))
    majority = counts.view(num_segments, num_labels + 1).argmax(dim=1)  # the first maximum: the smaller label
    return torch.where(
        majority == num_labels, torch.full_like(majority, -1 if ignore_index is None else ignore_index), majority
    )


class SegmentMemory:
    """Labelled training segments: unit prototypes `[M, D]` and their labels `[M]` (segments whose majority label is
    ignored are left out)."""

    def __init__(self, num_labels):
        self.num_labels = num_labels
        self._prototypes, self._labels = [], []

    def add(self, prototypes, labels):
        keep = (labels >= 0) & (labels < self.num_labels)
        self._prototypes.append(prototypes[keep].float())
        self._labels.append(labels[keep].long())

    @property
    def prototypes(self):
        return torch.cat(self._prototypes) if self._prototypes else torch.zeros(0, 0)

    @property
    def labels(self):
        return torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long)

    def __len__(self):
        return sum(len(labels) for labels in self._labels)


def retrieve_labels(queries, memory_prototypes, memory_labels, num_labels, top_k=PAPER_TOP_K, batch_size=4096):
    """The label of each query prototype (`[Q, D]`, unit rows): the most frequent label among the `top_k` memory
    prototypes with the largest inner product (unweighted vote, ties to the smaller label). Returns int64 `[Q]`."""
    if len(memory_labels) == 0:
        raise InvalidInputError("The memory holds no labelled segment (every memory segment is mostly ignored).")
    top_k = min(int(top_k), len(memory_labels))
    predictions = []
    for start in range(0, queries.shape[0], batch_size):
        similarity = queries[start : start + batch_size].float() @ memory_prototypes.T  # [q, M]
        neighbours = similarity.topk(top_k, dim=1).indices  # [q, k]
        votes = F.one_hot(memory_labels[neighbours], num_labels).sum(dim=1)  # [q, num_labels]
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------------------


def view_batches(pairs, image_size, geometry, batch_size):
    """Batches of `(views, masks)`: consecutive images whose views have the same size, at most `batch_size`."""
    batch, batch_size_hw = [], None
    for image, mask in pairs:
        size = view_size(image.height, image.width, image_size, geometry)
        if batch and (size != batch_size_hw or len(batch) == batch_size):
            yield [view for view, _ in batch], [mask for _, mask in batch]
            batch = []
        batch.append((resize_view(image, size), mask))
        batch_size_hw = size
    if batch:
        yield [view for view, _ in batch], [mask for _, mask in batch]


def build_memories(segmenter, pairs, num_labels, image_size, geometry="square", ignore_index=None, batch_size=16):
    """One `SegmentMemory` per level of `segmenter` from `(image, mask)` pairs: every segment, labelled with the
    majority label of the mask resized (nearest) to the view."""
    memories = [SegmentMemory(num_labels) for _ in segmenter.levels]
    batches = view_batches(pairs, image_size, geometry, batch_size)
    for views, masks in tqdm(batches, desc=f"memory ({segmenter.name})", leave=False):
        for segments, mask in zip(segmenter(views), masks):
            for memory, segment_map, prototypes in zip(memories, segments.segment_maps, segments.prototypes):
                view_mask = resize_label_maps(np.asarray(mask), segment_map.shape)
                memory.add(prototypes, majority_segment_labels(segment_map, view_mask, num_labels, ignore_index))
    return memories


def predict_by_retrieval(
    segmenter, memories, pairs, num_labels, image_size, geometry="square", top_k=PAPER_TOP_K, batch_size=16
):
    """Per level, the label maps of the query images (each segment labelled by `retrieve_labels`, resized nearest
    to its mask's size), and the mean segment count per image."""
    predictions = [[] for _ in memories]
    segment_counts = [[] for _ in memories]
    memory_tensors = [(memory.prototypes, memory.labels) for memory in memories]
    batches = view_batches(pairs, image_size, geometry, batch_size)
    for views, masks in tqdm(batches, desc=f"retrieval ({segmenter.name})", leave=False):
        for segments, mask in zip(segmenter(views), masks):
            for level, (segment_map, prototypes) in enumerate(zip(segments.segment_maps, segments.prototypes)):
                labels = retrieve_labels(prototypes, *memory_tensors[level], num_labels, top_k)
                predictions[level].append(resize_label_maps(labels[segment_map].numpy(), np.asarray(mask).shape))
                segment_counts[level].append(prototypes.shape[0])
    return predictions, [float(np.mean(counts)) for counts in segment_counts]


def retrieval_scores(predictions, masks, num_labels, ignore_index=None):
    """`metrics.mean_iou` of predicted label maps: `mean_iou` (classes absent from predictions and masks left
    out), `mean_iou_all_classes` (the authors' sum of IoUs / `num_labels`, absent classes counting 0),
    `pixel_accuracy` and `per_category_iou`."""
    scores = mean_iou(predictions, masks, num_labels=num_labels, ignore_index=ignore_index)
    per_category = scores["per_category_iou"]
    return {
        "mean_iou": scores["mean_iou"],
        "mean_iou_all_classes": float(np.nansum(per_category) / num_labels),
        "pixel_accuracy": scores["overall_accuracy"],
        "per_category_iou": per_category,
    }


def evaluate_segment_retrieval(
    segmenter,
    memory_pairs,
    query_pairs,
    num_labels,
    image_size,
    geometry="square",
    top_k=PAPER_TOP_K,
    ignore_index=None,
    batch_size=16,
):
    """The protocol for one segmenter (`CastRetrievalSegments` / `VitRetrievalSegments`): a memory of the segments of
    `memory_pairs` (`(PIL image, int [H, W] mask)`), the query segments of `query_pairs` labelled by their
    `top_k` nearest memory segments, scores over the query masks.

    Returns:
        one dict per level of the segmenter: `level`, `memory_size`, `num_segments` (per query image), and the
        scores of `retrieval_scores`.
    """
    memory_pairs, query_pairs = list(memory_pairs), list(query_pairs)
    if not memory_pairs or not query_pairs:
        raise InvalidInputError("Segment retrieval needs at least one memory image and one query image.")
    memories = build_memories(segmenter, memory_pairs, num_labels, image_size, geometry, ignore_index, batch_size)
    predictions, counts = predict_by_retrieval(
        segmenter, memories, query_pairs, num_labels, image_size, geometry, top_k, batch_size
    )
    masks = [np.asarray(mask) for _, mask in query_pairs]
    results = []
    for level, memory, level_predictions, count in zip(segmenter.levels, memories, predictions, counts):
        scores = retrieval_scores(level_predictions, masks, num_labels, ignore_index)
        results.append({"level": level, "memory_size": len(memory), "num_segments": count, **scores})
    return results


# --------------------------------------------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------------------------------------------


def majority_class_floor(memory_masks, query_masks, num_labels, ignore_index=None):
    """The retrieval floor: every query pixel given the most frequent (non-ignored) label of the memory masks, what
    nearest-neighbour labels of embeddings without class information tend to. Returns `retrieval_scores`."""
    counts = np.zeros(num_labels, dtype=np.int64)
    for mask in memory_masks:
        labels = np.asarray(mask).ravel()
        labels = labels[(labels >= 0) & (labels < num_labels)]
        counts += np.bincount(labels, minlength=num_labels)[:num_labels]
    constant = int(counts.argmax())
    predictions = [np.full(np.asarray(mask).shape, constant, dtype=np.int64) for mask in query_masks]
    return {"label": constant, **retrieval_scores(predictions, list(query_masks), num_labels, ignore_index)}


def grid_shape(num_segments, height, width):
    """`(rows, columns)` with rows * columns <= num_segments, as close to it and to the image's aspect as possible."""
    best = (1, 1)
    for rows in range(1, num_segments + 1):
        columns = num_segments // rows
        score = (rows * columns, -abs(math.log((height / rows) / (width / columns))))
        if score > (best[0] * best[1], -abs(math.log((height / best[0]) / (width / best[1])))):
            best = (rows, columns)
    return best


def grid_partition(height, width, num_segments):
    """A content-blind segmentation: a regular grid of at most `num_segments` cells, int64 `[height, width]`."""
    rows, columns = grid_shape(num_segments, height, width)
    row = np.minimum((np.arange(height) + 0.5) * rows // height, rows - 1).astype(np.int64)
    column = np.minimum((np.arange(width) + 0.5) * columns // width, columns - 1).astype(np.int64)
    return row[:, None] * columns + column[None, :]


def superpixel_grid_partition(superpixels, num_segments):
    """Superpixels grouped without looking at the image: each superpixel (int `[H, W]` map) joins the cell of
    `grid_partition` that holds its centroid. The floor of a model that starts from superpixels."""
    superpixels = np.asarray(superpixels).astype(np.int64)
    height, width = superpixels.shape
    cells = grid_partition(height, width, num_segments)
    ids = superpixels.ravel()
    num_ids = int(ids.max()) + 1
    rows, columns = np.indices((height, width))
    area = np.maximum(np.bincount(ids, minlength=num_ids), 1)
    centre_row = (np.bincount(ids, rows.ravel(), minlength=num_ids) / area).astype(np.int64)
    centre_column = (np.bincount(ids, columns.ravel(), minlength=num_ids) / area).astype(np.int64)
    return cells[centre_row, centre_column][superpixels]


# --------------------------------------------------------------------------------------------------------------
# The whole run of `hf-hierseg evaluate segment-retrieval`
# --------------------------------------------------------------------------------------------------------------


def run_segment_retrieval_evaluation(
    model_name_or_path,
    dataset_name,
    memory_split="train",
    query_split="test",
    mask_column="object_mask",
    image_column=None,
    max_memory_samples=None,
    max_query_samples=None,
    num_labels=None,
    ignore_index=None,
    levels=(PAPER_LEVEL,),
    top_k=PAPER_TOP_K,
    embedding=None,
    image_size=None,
    geometry="square",
    vit_model=None,
    skip_vit=False,
    vit_patch_size=16,
    vit_embedding="levels",
    vit_max_fit_pixels=4096,
    superpixel_method=None,
    num_superpixels=None,
    seeds_recipe=None,
    batch_size=16,
    seed=0,
):
    """Evaluate a CAST model folder (and the ViT + k-means baseline unless `skip_vit`) with the retrieval protocol:
    the memory from `memory_split`, the queries from `query_split` of `dataset_name`. Returns `{"settings",
    "random_vit_weights", "num_memory_images", "num_query_images", "num_labels", "floor", "models": {"cast": [per-level
    dicts], "vit_kmeans": [...]}}`."""
    resolve_model_source(model_name_or_path)  # a missing folder is named before the data are read
    memory = read_image_mask_pairs(
        load_dataset_split(dataset_name, memory_split), mask_column, image_column, max_memory_samples
    )
    queries = read_image_mask_pairs(
        load_dataset_split(dataset_name, query_split), mask_column, image_column, max_query_samples
    )
    masks = [mask for _, mask in memory + queries]
    num_labels = int(num_labels or infer_num_labels(masks, ignore_index))
    cast_model = load_cast_model(model_name_or_path)
    image_size = image_size or cast_model.config.image_size
    no_resize = {"do_resize": False, "do_center_crop": False}
    processor = evaluation_processor(no_resize, model_name_or_path, superpixel_method, num_superpixels, seeds_recipe)
    segmenters = {"cast": CastRetrievalSegments(cast_model, processor, levels, embedding)}
    vit, random_vit = (None, False)
    if not skip_vit:
        vit, random_vit = vit_baseline_model(cast_model.config, vit_model, vit_patch_size, seed)
        clusters = [cast_model.config.num_clusters[level - 1] for level in levels]
        pixels = evaluation_processor(no_resize, superpixel_method="grid")
        segmenters["vit_kmeans"] = VitRetrievalSegments(
            vit, pixels, clusters, levels, vit_embedding, max_fit_pixels=vit_max_fit_pixels, seed=seed
        )
    models = {
        name: evaluate_segment_retrieval(
            segmenter, memory, queries, num_labels, image_size, geometry, top_k, ignore_index, batch_size
        )
        for name, segmenter in segmenters.items()
    }
    settings = {
        "model": str(model_name_or_path),
        "dataset": str(dataset_name),
        "memory_split": memory_split,
        "query_split": query_split,
        "mask_column": mask_column,
        "levels": list(levels),
        "top_k": top_k,
        "embedding": segmenters["cast"].embedding,
        "image_size": image_size,
        "geometry": geometry,
        "superpixels": superpixel_settings(processor),
        "ignore_index": ignore_index,
        "vit_model": None if vit is None else (str(vit_model) if vit_model else "random weights"),
        "vit_patch_size": None if vit is None else vit.config.patch_size,
        "vit_embedding": None if vit is None else vit_embedding,
    }
    floor = majority_class_floor([mask for _, mask in memory], [mask for _, mask in queries], num_labels, ignore_index)
    return {
        "settings": settings,
        "random_vit_weights": random_vit,
        "num_memory_images": len(memory),
        "num_query_images": len(queries),
        "num_labels": num_labels,
        "floor": floor,
        "models": models,
    }


def format_segment_retrieval_report(run):
    """Markdown: one row per model and level of `run_segment_retrieval_evaluation`'s output, and the floor."""
    settings = run["settings"]
    lines = []
    if run.get("random_vit_weights"):
        lines += ["**Note: the ViT baseline has random weights (no `--vit_model`).**", ""]
    lines += [
        f"**{settings['dataset']}**: memory {run['num_memory_images']} image(s) [{settings['memory_split']}], "
        f"queries {run['num_query_images']} image(s) [{settings['query_split']}], {run['num_labels']} labels, "
        f"{settings['top_k']} nearest segments, {settings['geometry']} views of {settings['image_size']} px",
        "",
        "| model | level | memory segments | segments / image | mIoU | mIoU (all classes) | pixel acc. |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"cast": f"CAST ({settings['embedding']})", "vit_kmeans": f"ViT/{settings['vit_patch_size']} + k-means"}
    for key, levels in run["models"].items():
        for score in levels:
            cells = [
                str(score["memory_size"]),
                format_score(score["num_segments"], 1),
                format_score(score["mean_iou"]),
                format_score(score["mean_iou_all_classes"]),
                format_score(score["pixel_accuracy"]),
            ]
            lines.append(f"| {names.get(key, key)} | {score['level']} | " + " | ".join(cells) + " |")
    floor = run["floor"]
    cells = [format_score(floor[name]) for name in ("mean_iou", "mean_iou_all_classes", "pixel_accuracy")]
    lines.append(f"| *floor: every pixel {floor['label']}* | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "CAST_EMBEDDINGS",
    "CastRetrievalSegments",
    "ImageSegments",
    "PAPER_IMAGE_SIZE",
    "PAPER_LEVEL",
    "PAPER_TOP_K",
    "SegmentMemory",
    "VIEW_GEOMETRIES",
    "VIT_EMBEDDINGS",
    "VitRetrievalSegments",
    "build_memories",
    "cast_token_embeddings",
    "default_cast_embedding",
    "evaluate_segment_retrieval",
    "format_segment_retrieval_report",
    "grid_partition",
    "grid_shape",
    "majority_class_floor",
    "majority_segment_labels",
    "predict_by_retrieval",
    "resize_view",
    "retrieval_scores",
    "retrieve_labels",
    "run_segment_retrieval_evaluation",
    "superpixel_grid_partition",
    "unit_prototypes",
    "view_batches",
    "view_size",
    "vit_layer_features",
]
