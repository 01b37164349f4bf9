"""Superpixels: exactness against the original code's fixtures, recipes, SLIC, grid, batching and bad input."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from hf_hierseg.segment_ops import relabel_consecutive
from hf_hierseg.superpixels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEEDS_RECIPES,
    batch_superpixels,
    compute_superpixels,
    denormalize_to_uint8,
    grid_superpixels,
    scaled_num_superpixels,
    seeds_num_superpixels,
    seeds_superpixels,
    slic_superpixels,
)


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "original_cast"
FIXTURE_NAMES = ["tiny_moco", "tiny_deit", "tiny_seg_moco"]


def load_fixture_inputs(name):
    if not FIXTURES.is_dir():
        pytest.skip(f"Shared fixtures not found at {FIXTURES} (the repository expects ../shared beside it).")
    from safetensors.numpy import load_file

    return load_file(str(FIXTURES / name / "inputs.safetensors"))


def synthetic_image(seed, height=224, width=224):
    """Smooth random colour blobs with a few sharp edges: SEEDS has real boundaries to follow."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image[: height // 3, : width // 2] += 60
    image += rng.integers(-8, 9, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def original_seeds(image_uint8, num_superpixels, histogram_bins, iterations):
    """The original code's SEEDS call (moco-v3/suppix_utils/datasets_seeds.py), with its raw labels."""
    lab = cv2.cvtColor(image_uint8, cv2.COLOR_RGB2LAB)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(
        lab.shape[1], lab.shape[0], 3, num_superpixels=num_superpixels, num_levels=1, prior=2,
        histogram_bins=histogram_bins, double_step=False,
    )  # fmt: skip
    seeds.iterate(lab, num_iterations=iterations)
    return seeds.getLabels()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_seeds_reproduces_the_fixture_superpixels_exactly(name):
    inputs = load_fixture_inputs(name)
    images = denormalize_to_uint8(inputs["pixel_values"])  # [2, 64, 64, 3]
    # The fixtures' pixel values are ToTensor + Normalize of exactly these 8-bit images (float32, torchvision order).
    renormalised = (images.astype(np.float32) / np.float32(255) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    np.testing.assert_array_equal(renormalised.transpose(0, 3, 1, 2), inputs["pixel_values"])
    for image, expected in zip(images, inputs["superpixels"]):
        # 49 requested at 64x64 (the fixtures' config.json), self-supervised recipe: 36 superpixels.
        labels = seeds_superpixels(image, 49, "self_supervised")
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, expected)


def test_truncating_the_fixture_pixels_loses_a_level_and_changes_superpixels():
    """Why the exactness test rounds: the DeiT-style truncation of float32 pixel values gives other 8-bit images."""
    inputs = load_fixture_inputs("tiny_moco")
    rounded = denormalize_to_uint8(inputs["pixel_values"], rounding="round")
    truncated = denormalize_to_uint8(inputs["pixel_values"], rounding="truncate")
    difference = rounded.astype(np.int16) - truncated.astype(np.int16)
    assert set(np.unique(difference)) <= {0, 1} and difference.any()
    assert not np.array_equal(seeds_superpixels(truncated[0], 49), inputs["superpixels"][0])


def test_truncation_is_the_deit_expression_bit_for_bit():
    inputs = load_fixture_inputs("tiny_deit")
    pixel_values = inputs["pixel_values"][0]  # [3, H, W] float32
    # deit/datasets_seeds.py: numpy float32 array times the timm mean/std tuples, then * 255 and a uint8 cast.
    expected = ((pixel_values.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(np.uint8)
    np.testing.assert_array_equal(denormalize_to_uint8(pixel_values, rounding="truncate"), expected)


def test_rounding_recovers_every_8bit_value_from_float32_normalisation():
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([*np.meshgrid(values, values, indexing="ij"), values[::-1, None].repeat(256, 1)], axis=-1)
    normalised = (image.astype(np.float32) / np.float32(255) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    recovered = denormalize_to_uint8(normalised.transpose(2, 0, 1))
    np.testing.assert_array_equal(recovered, image)


@pytest.mark.parametrize("recipe", ["self_supervised", "supervised"])
def test_recipes_are_the_original_opencv_calls(recipe):
    image = synthetic_image(3)
    bins, iterations = {"self_supervised": (15, 20), "supervised": (5, 15)}[recipe]
    expected = original_seeds(image, 196, bins, iterations)
    labels = seeds_superpixels(image, 196, recipe)
    np.testing.assert_array_equal(labels, relabel_consecutive(expected))
    assert (SEEDS_RECIPES[recipe].histogram_bins, SEEDS_RECIPES[recipe].num_iterations) == (bins, iterations)


def test_seeds_gives_196_consecutive_labels_at_224():
    labels = seeds_superpixels(synthetic_image(0), 196)
    assert labels.shape == (224, 224)
    np.testing.assert_array_equal(np.unique(labels), np.arange(196))


def test_seeds_num_superpixels_predicts_opencv():
    for height, width, requested in [(64, 64, 49), (224, 224, 196), (100, 300, 196), (37, 53, 30), (224, 224, 5)]:
        labels = seeds_superpixels(synthetic_image(1, height, width), requested)
        assert seeds_num_superpixels(height, width, requested) == len(np.unique(labels))


def test_relabel_consecutive_keeps_the_partition_and_order():
    labels = np.array([[5, 5, 9], [2, 9, 9]])
    np.testing.assert_array_equal(relabel_consecutive(labels), [[1, 1, 2], [0, 2, 2]])


def test_scaled_num_superpixels_keeps_superpixel_area():
    assert scaled_num_superpixels(224, 224) == 196
    assert scaled_num_superpixels(112, 112) == 49
    assert scaled_num_superpixels(448, 224) == 392
    assert scaled_num_superpixels(64, 64, 49, reference_size=64) == 49
    assert scaled_num_superpixels(10, 10, 196, reference_size=None) == 196
    assert scaled_num_superpixels(2, 2) == 1


def test_grid_is_square_patches():
    labels = grid_superpixels(224, 224, 196)
    rows, cols = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    np.testing.assert_array_equal(labels, (rows // 16) * 14 + cols // 16)
    wide = grid_superpixels(100, 300, 48)  # 4 x 12 cells of 25x25 pixels
    np.testing.assert_array_equal(np.unique(wide), np.arange(48))
    assert np.array_equal(np.bincount(wide.ravel()), np.full(48, 625))


def test_slic_gives_about_the_requested_number_of_consecutive_labels():
    labels = slic_superpixels(synthetic_image(2), 196)
    count = len(np.unique(labels))
    np.testing.assert_array_equal(np.unique(labels), np.arange(count))
    assert 98 <= count <= 300


@pytest.mark.parametrize("method", ["seeds", "slic", "grid"])
def test_batches_are_deterministic_and_independent_of_the_worker_count(method):
    images = [synthetic_image(seed, 96, 128) for seed in range(5)]
    one_by_one = [compute_superpixels(image, method, 60) for image in images]
    for workers in (1, 3, None):
        batch = batch_superpixels(images, method, 60, num_workers=workers)
        assert len(batch) == len(images)
        for labels, expected in zip(batch, one_by_one):
            np.testing.assert_array_equal(labels, expected)


def test_per_image_counts_in_a_batch():
    images = [synthetic_image(0, 64, 64), synthetic_image(1, 64, 64)]
    batch = batch_superpixels(images, "grid", [4, 16])
    assert [len(np.unique(labels)) for labels in batch] == [4, 16]
    with pytest.raises(ValueError, match="counts for 2 images"):
        batch_superpixels(images, "grid", [4])


@pytest.mark.parametrize("height, width, requested", [(1, 1, 196), (4, 4, 1), (5, 5, 196), (3, 224, 1), (2, 64, 196)])
def test_seeds_refuses_images_where_opencv_would_hang_or_crash(height, width, requested):
    image = np.zeros((height, width, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="SEEDS cannot place"):
        seeds_superpixels(image, requested)
    # The grid always works.
    assert compute_superpixels(image, "grid", requested).shape == (height, width)


@pytest.mark.parametrize(
    "image, error",
    [
        (np.zeros((8, 8, 3), dtype=np.float32), ValueError),
        (np.zeros((8, 8), dtype=np.uint8), ValueError),
        (np.zeros((8, 8, 4), dtype=np.uint8), ValueError),
        (np.zeros((0, 8, 3), dtype=np.uint8), ValueError),
        ([[1, 2, 3]], TypeError),
    ],
)
def test_superpixels_need_8bit_rgb(image, error):
    with pytest.raises(error):
        compute_superpixels(image, "seeds", 10)


def test_unknown_method_and_recipe():
    image = synthetic_image(0, 32, 32)
    with pytest.raises(ValueError, match="Unknown superpixel method"):
        compute_superpixels(image, "quickshift", 10)
    with pytest.raises(ValueError, match="Unknown SEEDS recipe"):
        seeds_superpixels(image, 10, "imagenet")
    with pytest.raises(ValueError, match="num_workers"):
        batch_superpixels([image], "grid", 4, num_workers=0)
