"""The ViT + k-means baseline: configuration, spherical / hierarchical k-means, hierarchy maps, evaluation."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTModel
from transformers.modeling_outputs import BaseModelOutput

from hf_hierseg.configuration_cast import CastConfig
from hf_hierseg.evaluation.baselines import (
    evaluate_vit_baseline,
    hierarchical_kmeans,
    make_vit_like,
    spherical_kmeans,
    vit_kmeans_hierarchy,
    vit_patch_features,
)

from cast_testing import assert_hierarchy_nests


def same_partition(a, b):
    """True when two label arrays define the same partition (equal up to renaming the labels)."""
    pairs = set(zip(np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()))
    return len(pairs) == len(set(np.asarray(a).ravel().tolist())) == len(set(np.asarray(b).ravel().tolist()))


# --------------------------------------------------------------------------------------------------------------
# make_vit_like
# --------------------------------------------------------------------------------------------------------------


def test_make_vit_like_matches_cast_size(cast_tester):
    config = make_vit_like(CastConfig.from_preset("cast-small"), num_labels=10)
    assert isinstance(config, ViTConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 11, 12)
    assert config.intermediate_size == 4 * 384
    assert (config.patch_size, config.image_size) == (16, 224)
    assert config._attn_implementation == "sdpa"
    assert config.num_labels == 10
    model = ViTModel(make_vit_like(cast_tester.get_config()), add_pooling_layer=False)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.num_hidden_layers == 4


def test_make_vit_like_rejects_bad_input():
    with pytest.raises(TypeError, match="CastConfig"):
        make_vit_like({"hidden_size": 24})
    with pytest.raises(ValueError, match="multiple of the ViT patch size"):
        make_vit_like(CastConfig(hidden_size=24, num_attention_heads=4, image_size=72))


# --------------------------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------------------------


def clustered_points(directions, points_per_cluster=20, noise=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(directions, dim=-1)
    labels = torch.arange(len(directions)).repeat_interleave(points_per_cluster)
    points = directions[labels] + noise * torch.randn(len(labels), directions.shape[1], generator=generator)
    return points, labels


def test_spherical_kmeans_recovers_separated_directions_and_is_deterministic():
    points, labels = clustered_points(torch.eye(6)[:3])
    assignments, centroids = spherical_kmeans(points, 3, seed=1)
    assert same_partition(assignments, labels)
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(3))
    # Cosine k-means ignores the length of each point.
    scaled = points * torch.linspace(0.1, 10, len(points))[:, None]
    assert torch.equal(spherical_kmeans(scaled, 3, seed=1)[0], assignments)
    assert torch.equal(spherical_kmeans(points, 3, seed=1)[0], assignments)
    # More clusters than points: one cluster per point.
    assert len(spherical_kmeans(points[:4], 10)[0].unique()) == 4
    with pytest.raises(ValueError, match="non-empty"):
        spherical_kmeans(torch.zeros(0, 3), 2)


def test_hierarchical_kmeans_groups_nearby_clusters():
    # Four tight directions in two pairs: (e0, e0 + 0.3 e1) and (e2, e2 + 0.3 e3).
    directions = torch.tensor([[1, 0, 0, 0], [1, 0.3, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0.3]], dtype=torch.float32)
    points, labels = clustered_points(directions, noise=0.01)
    centroids, hierarchy = hierarchical_kmeans(points, num_clusters=(4, 2))
    finest = (torch.nn.functional.normalize(points, dim=-1) @ centroids.T).argmax(1)
    assert same_partition(finest, labels)
    assert torch.equal(hierarchy[0], torch.arange(4))
    assert same_partition(hierarchy[1][finest], labels // 2)
    with pytest.raises(ValueError, match="decreasing"):
        hierarchical_kmeans(points, num_clusters=(2, 4))


# --------------------------------------------------------------------------------------------------------------
# ViT hierarchy
# --------------------------------------------------------------------------------------------------------------


class PatchColourModel(torch.nn.Module):
    """A stand-in for ViTModel whose patch tokens are the mean colour of each 16 x 16 patch (plus a CLS token)."""

    def __init__(self, image_size=64):
        super().__init__()
        self.config = ViTConfig(hidden_size=3, patch_size=16, image_size=image_size)

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        patches = torch.nn.functional.avg_pool2d(pixel_values, 16).flatten(2).transpose(1, 2)  # [B, h*w, 3]
        cls = torch.zeros(pixel_values.shape[0], 1, 3)
        return BaseModelOutput(last_hidden_state=torch.cat([cls, patches], dim=1))


def test_vit_patch_features_keeps_the_patch_grid_layout(cast_tester):
    model = ViTModel(make_vit_like(cast_tester.get_config()), add_pooling_layer=False).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    features = vit_patch_features(model, pixel_values)
    tokens = model(pixel_values).last_hidden_state
    assert features.shape == (2, 24, 4, 4)
    # Patch (row 1, column 2) is token 1 + 1 * 4 + 2 (token 0 is CLS).
    torch.testing.assert_close(features[:, :, 1, 2], tokens[:, 1 + 4 + 2])


def test_vit_kmeans_hierarchy_follows_the_features():
    # Left half red, right half blue: the 2-group level must split the image into its left and right halves
    # (a row/column mix-up in the patch grid would split it into top and bottom).
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, :, :32] = 1.0
    image[:, 2, :, 32:] = 1.0
    label_maps = vit_kmeans_hierarchy(PatchColourModel(), image, num_clusters=(4, 2))
    coarse = label_maps[1][0]
    assert len(coarse[:, :30].unique()) == 1 and len(coarse[:, 34:].unique()) == 1
    assert coarse[0, 0] != coarse[0, -1]


def test_vit_kmeans_hierarchy_shapes_nesting_and_batch_independence(cast_tester):
    model = ViTModel(make_vit_like(cast_tester.get_config()), add_pooling_layer=False).eval()
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    label_maps = vit_kmeans_hierarchy(model, pixel_values, num_clusters=(16, 8, 4), output_size=(48, 40))
    assert [tuple(m.shape) for m in label_maps] == [(2, 48, 40)] * 3
    assert all(m.dtype == torch.int64 for m in label_maps)
    for image in range(2):
        levels = [m[image] for m in label_maps]
        assert_hierarchy_nests(levels)
        assert [len(m.unique()) <= k for m, k in zip(levels, (16, 8, 4))] == [True] * 3
        assert len(levels[0].unique()) > len(levels[-1].unique()) > 1
    alone = vit_kmeans_hierarchy(model, pixel_values[1:], num_clusters=(16, 8, 4), output_size=(48, 40))
    assert all(torch.equal(a[0], b[1]) for a, b in zip(alone, label_maps))


def test_evaluate_vit_baseline_on_a_two_colour_dataset():
    # Objects are red squares aligned to the 16-px patch grid on a blue background; with colour features the
    # 2-group level reproduces the object mask except near its edges (features are blended bilinearly between
    # patch centres, which rounds the corners and moves edges by a few pixels).
    examples = []
    for offset in (0, 16):
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[..., 2] = 255
        mask = np.zeros((64, 64), dtype=np.uint8)
        pixels[offset : offset + 32, 16:48] = (255, 0, 0)
        mask[offset : offset + 32, 16:48] = 1
        examples.append({"image": Image.fromarray(pixels), "object_mask": Image.fromarray(mask)})
    results = evaluate_vit_baseline(
        PatchColourModel(), examples, num_labels=2, num_clusters=(4, 2), batch_size=1, tolerance=4
    )
    assert [r["level"] for r in results] == [0, 1]
    assert results[1]["num_segments"] == 2
    assert results[1]["majority_mean_iou"] > 0.8
    assert results[1]["boundary_fscore"] > 0.8
    assert results[0]["mean_best_overlap"] <= results[1]["mean_best_overlap"] + 1e-9
    with pytest.raises(ValueError, match="empty"):
        evaluate_vit_baseline(PatchColourModel(), [], num_labels=2)
