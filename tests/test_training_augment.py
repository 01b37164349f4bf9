"""Training augmentations: crops, MoCo's two views, DeiT's RandAugment / erasing, superpixels on the augmented view."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.superpixels import compute_superpixels, denormalize_to_uint8, scaled_num_superpixels
from hf_hierseg.training.augment import (
    MOCO_VIEW_1,
    MOCO_VIEW_2,
    DeitTransform,
    MocoTransform,
    ProcessorTransform,
    RandAugment,
    encode_view,
    random_erasing,
    random_resized_crop,
)


def gradient_image(width=96, height=80):
    """An image whose pixel (x, y) encodes its coordinates: R = x, G = y (so crops can be located)."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8), "RGB")


def blocks_image(size=64):
    """Four flat coloured quadrants: SEEDS boundaries follow them."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    half = size // 2
    array[:half, :half] = (220, 30, 30)
    array[:half, half:] = (30, 220, 30)
    array[half:, :half] = (30, 30, 220)
    array[half:, half:] = (220, 220, 30)
    return Image.fromarray(array, "RGB")


def test_random_resized_crop_takes_a_region_of_the_requested_area_and_is_reproducible():
    image = gradient_image(200, 100)
    areas = []
    for seed in range(30):
        crop = np.asarray(
            random_resized_crop(image, 32, np.random.default_rng(seed), scale=(0.2, 0.5), resample=Image.NEAREST)
        )
        assert crop.shape == (32, 32, 3)
        # Nearest resampling keeps source coordinates: the crop spans this many source columns / rows.
        width = int(crop[0, :, 0].max()) - int(crop[0, :, 0].min()) + 1
        height = int(crop[:, 0, 1].max()) - int(crop[:, 0, 1].min()) + 1
        areas.append(width * height / (200 * 100))
        again = np.asarray(
            random_resized_crop(image, 32, np.random.default_rng(seed), scale=(0.2, 0.5), resample=Image.NEAREST)
        )
        np.testing.assert_array_equal(crop, again)
    # Area fractions drawn in [0.2, 0.5] (up to rounding of the box and the 32-pixel sampling of its extent).
    assert 0.15 < min(areas) and max(areas) < 0.55


def processor(method="seeds", recipe="self_supervised", num_superpixels=196, **kwargs):
    return CastImageProcessor(
        superpixel_method=method, superpixel_recipe=recipe, num_superpixels=num_superpixels, **kwargs
    )


def test_encoded_view_computes_superpixels_on_the_uint8_view_then_normalises():
    array = np.asarray(blocks_image())
    pixel_values, superpixels = encode_view(processor(num_superpixels=49, superpixel_reference_size=None), array)
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (3, 64, 64)
    assert superpixels.dtype == torch.int64 and superpixels.shape == (64, 64)
    np.testing.assert_array_equal(superpixels.numpy(), compute_superpixels(array, "seeds", 49, "self_supervised"))
    # Normalisation with ImageNet statistics; the 8-bit image is recovered exactly.
    np.testing.assert_array_equal(denormalize_to_uint8(pixel_values), array)
    red = (220 / 255 - 0.485) / 0.229
    assert pixel_values[0, 0, 0].item() == pytest.approx(red, abs=1e-5)
    # Quadrant boundaries are superpixel boundaries.
    assert set(superpixels[:32, :32].unique().tolist()).isdisjoint(superpixels[32:, 32:].unique().tolist())


def test_encoded_view_of_the_supervised_recipe_runs_seeds_on_the_truncated_normalised_view():
    array = np.asarray(gradient_image(64, 64))
    view_processor = processor(recipe="supervised", num_superpixels=49, superpixel_reference_size=None)
    pixel_values, superpixels = encode_view(view_processor, array)
    source = denormalize_to_uint8(pixel_values.numpy(), rounding="truncate")
    np.testing.assert_array_equal(superpixels.numpy(), compute_superpixels(source, "seeds", 49, "supervised"))


@pytest.mark.parametrize(
    "method, recipe",
    [("seeds", "self_supervised"), ("seeds", "supervised"), ("slic", "self_supervised"), ("grid", "supervised")],
)
def test_encoded_view_is_what_the_processor_computes_without_resize_and_crop(method, recipe):
    """Training views and inference share one implementation: `encode_view` gives, on the same array, what a
    processor configured with do_resize=False, do_center_crop=False returns, and what the original pipelines
    compute (superpixels of the 8-bit view, or of the truncated normalised view for DeiT's SEEDS; then
    `(x / 255 - mean) / std` in float32)."""
    rng = np.random.default_rng(0)
    array = np.asarray(
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((56, 40), Image.BICUBIC)
    )
    mean, std = (0.5, 0.45, 0.4), (0.2, 0.25, 0.3)
    run_processor = processor(method, recipe, num_superpixels=300, image_mean=mean, image_std=std)
    pixel_values, superpixels = encode_view(run_processor, array)

    configured = processor(
        method, recipe, num_superpixels=300, image_mean=mean, image_std=std, do_resize=False, do_center_crop=False
    )
    expected = configured(images=array, return_tensors="pt")
    assert torch.equal(pixel_values, expected["pixel_values"][0])
    assert torch.equal(superpixels, expected["superpixels"][0])

    normalised = (array.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(pixel_values.numpy(), normalised.transpose(2, 0, 1))
    source = array
    if method == "seeds" and recipe == "supervised":
        source = denormalize_to_uint8(normalised.transpose(2, 0, 1), mean, std, rounding="truncate")
    count = scaled_num_superpixels(40, 56, 300)
    np.testing.assert_array_equal(superpixels.numpy(), compute_superpixels(source, method, count, recipe))


def test_moco_views_are_two_different_augmentations_each_with_its_own_superpixels():
    transform = MocoTransform(processor(), 32)
    sample = transform(gradient_image(), np.random.default_rng(0))
    assert sample["pixel_values"].shape == (2, 3, 32, 32)
    assert sample["superpixels"].shape == (2, 32, 32)
    assert not torch.equal(sample["pixel_values"][0], sample["pixel_values"][1])
    for view in range(2):  # superpixels of each view = superpixels of that view's own 8-bit image
        view_uint8 = denormalize_to_uint8(sample["pixel_values"][view])
        np.testing.assert_array_equal(
            sample["superpixels"][view].numpy(),
            compute_superpixels(view_uint8, "seeds", scaled_num_superpixels(32, 32, 196)),
        )
    again = transform(gradient_image(), np.random.default_rng(0))
    assert torch.equal(sample["pixel_values"], again["pixel_values"])


def test_moco_view_recipes_are_asymmetric_as_in_the_paper():
    assert MOCO_VIEW_1.blur_probability == 1.0 and MOCO_VIEW_1.solarize_probability == 0.0
    assert MOCO_VIEW_2.blur_probability == 0.1 and MOCO_VIEW_2.solarize_probability == 0.2
    # A solarized view: with solarize forced on and everything else off, bright pixels are inverted.
    recipe = MOCO_VIEW_2.__class__(
        crop_scale=(1.0, 1.0),
        flip_probability=0,
        jitter_probability=0,
        grayscale_probability=0,
        blur_probability=0,
        solarize_probability=1.0,
    )
    image = gradient_image(64, 64)
    view = np.asarray(recipe(image, 64, np.random.default_rng(0)))  # a crop of scale 1 is the whole image
    np.testing.assert_array_equal(view[..., :2], np.asarray(image)[..., :2])  # values < 128 are kept
    assert (view[..., 2] == 255 - 128).all()  # the constant 128 is inverted


@pytest.mark.parametrize("name", RandAugment.OPERATIONS)
def test_every_rand_augment_operation_keeps_size_and_mode(name):
    noise = np.random.default_rng(0).integers(60, 190, size=(40, 48, 3), dtype=np.uint8)  # texture, mid-range
    image = Image.fromarray(noise, "RGB")
    out = RandAugment().apply(image, name, 0.9, np.random.default_rng(1))
    assert out.size == image.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), noise), f"{name} left the image unchanged"


def test_rand_augment_is_reproducible_and_can_be_a_no_op():
    image = gradient_image()
    augment = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    first = np.asarray(augment(image, np.random.default_rng(3)))
    np.testing.assert_array_equal(first, np.asarray(augment(image, np.random.default_rng(3))))
    never = RandAugment(probability=0.0)
    np.testing.assert_array_equal(np.asarray(never(image, np.random.default_rng(3))), np.asarray(image))


def test_random_erasing_fills_one_box_with_noise():
    array = np.full((40, 40, 3), 100, dtype=np.uint8)
    erased = random_erasing(array, np.random.default_rng(0), probability=1.0)
    changed = np.any(erased != array, axis=-1)
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 0.02 * 40 * 40 * 0.5
    # The changed pixels lie in one rectangle (noise may equal 100 by chance at a few pixels).
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.mean() > 0.9
    np.testing.assert_array_equal(random_erasing(array, np.random.default_rng(0), probability=0.0), array)


def test_deit_transform_and_processor_transform_shapes_and_superpixels():
    run_processor = processor(recipe="supervised", size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    train = DeitTransform(run_processor, 32, RandAugment(), erasing_probability=0.5)
    sample = train(gradient_image(), np.random.default_rng(0))
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["superpixels"].shape == (32, 32)
    source = denormalize_to_uint8(sample["pixel_values"], rounding="truncate")
    count = scaled_num_superpixels(32, 32, 196)
    np.testing.assert_array_equal(
        sample["superpixels"].numpy(), compute_superpixels(source, "seeds", count, "supervised")
    )
    # The evaluation view is the processor's own (resize, centre crop), as at inference.
    evaluation = ProcessorTransform(run_processor)
    first, second = evaluation(gradient_image()), evaluation(gradient_image())
    assert first["pixel_values"].shape == (3, 32, 32)
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert torch.equal(first["superpixels"], second["superpixels"])
    inference = run_processor(images=gradient_image(), return_tensors="pt")
    assert torch.equal(first["pixel_values"], inference["pixel_values"][0])
