"""The paper's ViT baseline for part-whole segmentation: k-means of ViT patch tokens.

Patch tokens of a transformers `ViTModel` are upsampled to pixels and clustered per image with spherical
(cosine) k-means into K=64 segments; the 64 centroids are clustered again into 32, then 16, then 8, which gives
nested segmentations in the format of CAST's hierarchy: a list of int64 `[B, H, W]` label maps, finest first.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .metrics import as_label_maps, evaluate_hierarchy


VIT_PATCH_SIZE = 16
DEFAULT_NUM_CLUSTERS = (64, 32, 16, 8)


def make_vit_like(cast_config, patch_size=VIT_PATCH_SIZE, **kwargs):
    """A `ViTConfig` with the width, depth (sum of CAST's depths), heads and MLP ratio of `cast_config`.

    Patches are 16 px and attention uses sdpa; keyword arguments override any field (e.g. `num_labels`).
    """
    for name in ("hidden_size", "num_attention_heads", "depths", "mlp_ratio", "image_size"):
        if not hasattr(cast_config, name):
            raise TypeError(
                f"`cast_config` must be a CastConfig (missing `{name}`), got {type(cast_config).__name__}."
            )
    if cast_config.image_size % patch_size != 0:
        raise ValueError(
            f"`image_size` ({cast_config.image_size}) must be a multiple of the ViT patch size ({patch_size})."
        )
    settings = dict(
        hidden_size=cast_config.hidden_size,
        num_hidden_layers=sum(cast_config.depths),
        num_attention_heads=cast_config.num_attention_heads,
        intermediate_size=int(cast_config.hidden_size * cast_config.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=getattr(cast_config, "hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=getattr(cast_config, "attention_probs_dropout_prob", 0.0),
        initializer_range=getattr(cast_config, "initializer_range", 0.02),
        layer_norm_eps=getattr(cast_config, "layer_norm_eps", 1e-6),
        image_size=cast_config.image_size,
        patch_size=patch_size,
        num_channels=getattr(cast_config, "num_channels", 3),
        qkv_bias=getattr(cast_config, "qkv_bias", True),
        attn_implementation="sdpa",
    )
    if getattr(cast_config, "id2label", None) and "id2label" not in kwargs and "num_labels" not in kwargs:
        settings["id2label"] = dict(cast_config.id2label)
        settings["label2id"] = dict(cast_config.label2id)
    settings.update(kwargs)
    return ViTConfig(**settings)


# --------------------------------------------------------------------------------------------------------------
# Spherical k-means
# --------------------------------------------------------------------------------------------------------------


def _init_centroids(features, weights, num_clusters, generator):
    """k-means++ seeding with cosine distance (1 - similarity), weighted by `weights`."""
    first = torch.multinomial(weights, 1, generator=generator)
    centroids = [features[first[0]]]
    distance = (1 - features @ centroids[0]).clamp_min(0)
    for _ in range(1, num_clusters):
        probabilities = weights * distance
        if probabilities.sum() <= 0:  # all remaining points coincide with a centroid
            probabilities = weights
        index = torch.multinomial(probabilities, 1, generator=generator)[0]
        centroids.append(features[index])
        distance = torch.minimum(distance, (1 - features @ features[index]).clamp_min(0))
    return torch.stack(centroids)


def spherical_kmeans(features, num_clusters, weights=None, num_iterations=50, seed=0):
    """Cluster rows of `features` by cosine similarity (pure torch, deterministic for a given seed).

    Args:
        features: `[N, D]` float tensor (normalised internally).
        num_clusters (`int`): K; at most N clusters are formed.
        weights: optional `[N]` positive weights (e.g. the sizes of clusters being clustered again).
        num_iterations (`int`): maximum Lloyd iterations (stops earlier when assignments no longer change).
        seed (`int`): seed of the k-means++ initialisation.

    Returns:
        `(assignments, centroids)`: int64 `[N]` in `0..K-1` and unit-norm `[K, D]`.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"`features` must be a non-empty [N, D] tensor, got shape {tuple(features.shape)}.")
    if num_clusters < 1:
        raise ValueError(f"`num_clusters` must be >= 1, got {num_clusters}.")
    features = F.normalize(features.float(), dim=-1)
    device = features.device
    weights = torch.ones(features.shape[0], device=device) if weights is None else weights.float().to(device)
    num_clusters = min(int(num_clusters), features.shape[0])
    generator = torch.Generator().manual_seed(int(seed))
    centroids = _init_centroids(features.cpu(), weights.cpu(), num_clusters, generator).to(device)
    assignments = None
    for _ in range(num_iterations):
        similarity = features @ centroids.T  # [N, K]
        new_assignments = similarity.argmax(dim=1)
        if assignments is not None and torch.equal(new_assignments, assignments):
            break
        assignments = new_assignments
        membership = F.one_hot(assignments, num_clusters).float() * weights[:, None]  # [N, K]
        sums, counts = membership.T @ features, membership.sum(0)
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # move empty clusters to the points worst served by their centroid
            fit = similarity.gather(1, assignments[:, None]).squeeze(1)
            centroids[empty] = features[fit.argsort()[: len(empty)]]
    return assignments, centroids


def hierarchical_kmeans(features, num_clusters=DEFAULT_NUM_CLUSTERS, num_iterations=50, seed=0):
    """Spherical k-means into `num_clusters[0]` clusters, then k-means of the centroids (weighted by cluster size)
    into each following number of groups.

    Returns:
        `(centroids, hierarchy)`: the finest centroids `[K_1, D]`, and one int64 `[K_1]` per level (finest first)
        giving the group of every finest cluster at that level (level 0 is the identity), as CAST's `hierarchy`
        gives the group of every level-1 segment.
    """
    if any(a <= b for a, b in zip(num_clusters, num_clusters[1:])):
        raise ValueError(f"`num_clusters` must be strictly decreasing, got {tuple(num_clusters)}.")
    assignments, finest_centroids = spherical_kmeans(
        features, num_clusters[0], num_iterations=num_iterations, seed=seed
    )
    num_finest = finest_centroids.shape[0]
    group_of = torch.arange(num_finest, device=finest_centroids.device)
    hierarchy = [group_of]
    centroids, sizes = finest_centroids, torch.bincount(assignments, minlength=num_finest).float()
    for k in num_clusters[1:]:
        used = sizes > 0  # clusters that hold points
        parents, parent_centroids = spherical_kmeans(
            centroids[used], k, weights=sizes[used], num_iterations=num_iterations, seed=seed
        )
        parent_of = torch.zeros(len(sizes), dtype=torch.long, device=parents.device)
        parent_of[used] = parents
        group_of = parent_of[group_of]
        hierarchy.append(group_of)
        sizes = torch.zeros(parent_centroids.shape[0], device=sizes.device).index_add_(0, parent_of, sizes)
        centroids = parent_centroids
    return finest_centroids, hierarchy


# --------------------------------------------------------------------------------------------------------------
# ViT features -> hierarchy
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def vit_patch_features(model, pixel_values):
    """Patch tokens of the last layer as a feature map `[B, C, H/16, W/16]` (CLS and other prefix tokens dropped).

    `model` is a `ViTModel` or a model holding one as `.vit` (e.g. `ViTForImageClassification`).
    """
    vit = getattr(model, "vit", model)
    patch_size = vit.config.patch_size
    if pixel_values.dim() != 4:
        raise ValueError(f"`pixel_values` must be [B, C, H, W], got shape {tuple(pixel_values.shape)}.")
    height, width = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
    image_size = vit.config.image_size
    image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    interpolate = tuple(pixel_values.shape[-2:]) != image_size
    tokens = vit(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
    patch_tokens = tokens[:, tokens.shape[1] - height * width :]  # [B, h*w, C]
    return patch_tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def _fit_size(output_size, max_fit_pixels):
    height, width = output_size
    scale = min(1.0, (max_fit_pixels / (height * width)) ** 0.5)
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.no_grad()
def vit_kmeans_hierarchy(
    model,
    pixel_values,
    num_clusters=DEFAULT_NUM_CLUSTERS,
    output_size=None,
    max_fit_pixels=4096,
    num_iterations=50,
    seed=0,
):
    """The ViT baseline's segmentation hierarchy.

    Patch tokens are bilinearly upsampled to pixels; per image, `hierarchical_kmeans` is fitted on the features
    upsampled to at most `max_fit_pixels` pixels (the features are smooth between patch centres), then every pixel
    of `output_size` (default: the input size) takes its nearest finest centroid. The same seed is used for every
    image, so results do not depend on batching.

    Returns:
        list of int64 `[B, H, W]` label maps, one per entry of `num_clusters` (finest first); every region of a level
        lies inside one region of the next.
    """
    features = vit_patch_features(model, pixel_values).float()
    output_size = tuple(output_size or pixel_values.shape[-2:])
    fit_features = F.interpolate(features, size=_fit_size(output_size, max_fit_pixels), mode="bilinear")
    pixel_features = F.normalize(F.interpolate(features, size=output_size, mode="bilinear"), dim=1)
    label_maps = [[] for _ in num_clusters]
    for image_fit_features, image_features in zip(fit_features, pixel_features):
        centroids, hierarchy = hierarchical_kmeans(
            image_fit_features.flatten(1).T, num_clusters, num_iterations=num_iterations, seed=seed
        )
        finest = torch.einsum("chw,kc->khw", image_features, centroids).argmax(0)  # [H, W]
        for level, group_of in enumerate(hierarchy):
            label_maps[level].append(group_of[finest])
    return [torch.stack(maps) for maps in label_maps]


# --------------------------------------------------------------------------------------------------------------
# Evaluation on an image + mask dataset
# --------------------------------------------------------------------------------------------------------------


def images_to_pixel_values(images, image_size, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD):
    """Resize PIL images (bilinear) to `image_size` x `image_size` and normalise: float `[B, 3, S, S]`."""
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Expected PIL images, got {type(image).__name__}.")
        resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(resized, dtype=np.float32) / 255.0)
    pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(image_std, dtype=torch.float32)[None, :, None, None]
    return (pixel_values - mean) / std


def resize_label_maps(label_maps, size):
    """Nearest-neighbour resize of int `[B, h, w]` label maps to `size` = (H, W)."""
    if tuple(label_maps.shape[-2:]) == tuple(size):
        return label_maps
    return F.interpolate(label_maps[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def evaluate_vit_baseline(
    model,
    examples,
    num_labels,
    image_key="image",
    mask_key="object_mask",
    image_size=None,
    num_clusters=DEFAULT_NUM_CLUSTERS,
    batch_size=8,
    ignore_index=None,
    tolerance=1,
    exclude_labels=(),
    seed=0,
):
    """Per-level scores (see `evaluate_hierarchy`) of the ViT + k-means baseline on an image + mask dataset.

    Args:
        model: a `ViTModel` (or a model holding one as `.vit`), e.g. `ViTModel(make_vit_like(cast_config))`.
        examples: iterable of dicts (a `datasets.Dataset`/`IterableDataset` works) with a PIL image under
            `image_key` and a ground-truth label map (PIL or array) under `mask_key`.
        num_labels (`int`): number of ground-truth classes in the masks.
        image_size (`int`, *optional*): model input size, default `model.config.image_size`. The hierarchy is
            computed at this size, then resized (nearest) to each mask's size.
        Other arguments: as in `vit_kmeans_hierarchy` and `evaluate_hierarchy`.
    """
    model.eval()
    image_size = image_size or getattr(model, "vit", model).config.image_size
    levels = [[] for _ in num_clusters]
    references = []

    def flush(batch):
        pixel_values = images_to_pixel_values([example[image_key] for example in batch], image_size)
        hierarchy = vit_kmeans_hierarchy(model, pixel_values, num_clusters=num_clusters, seed=seed)
        for index, example in enumerate(batch):
            reference = as_label_maps(np.asarray(example[mask_key]), mask_key)[0]
            references.append(reference)
            for level, label_maps in enumerate(hierarchy):
                levels[level].append(resize_label_maps(label_maps[index : index + 1], reference.shape)[0].numpy())

    batch = []
    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not references:
        raise ValueError("`examples` is empty.")
    return evaluate_hierarchy(
        levels, references, num_labels, ignore_index=ignore_index, tolerance=tolerance, exclude_labels=exclude_labels
    )


__all__ = [
    "make_vit_like",
    "spherical_kmeans",
    "hierarchical_kmeans",
    "vit_patch_features",
    "vit_kmeans_hierarchy",
    "images_to_pixel_values",
    "resize_label_maps",
    "evaluate_vit_baseline",
]
