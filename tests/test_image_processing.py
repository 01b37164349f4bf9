"""CastImageProcessor: the original pipelines exactly, input conversion, bad input, saving, post-processing."""

import io
import json
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from hf_hierseg.configuration_cast import CastConfig
from hf_hierseg.hierarchy import compose_hierarchy
from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.segment_ops import resize_label_maps
from hf_hierseg.superpixels import IMAGENET_MEAN, IMAGENET_STD, denormalize_to_uint8, grid_superpixels

from cast_testing import assert_hierarchy_nests


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "original_cast"


def synthetic_image(seed, height=224, width=224):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.integers(-8, 9, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def original_moco_inputs(image_uint8, num_superpixels=196):
    """What moco-v3's SEEDS dataset + Normalize give for an 8-bit crop (ToTensor, SEEDS, Normalize; torch)."""
    tensor = torch.from_numpy(image_uint8).permute(2, 0, 1).float().div(255)  # ToTensor
    sample = (tensor.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    lab = cv2.cvtColor(sample, cv2.COLOR_RGB2LAB)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(lab.shape[1], lab.shape[0], 3, num_superpixels, 1, 2, 15, False)
    seeds.iterate(lab, 20)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    normalised = (tensor - mean[:, None, None]) / std[:, None, None]  # torchvision Normalize (sub_, div_)
    return normalised, torch.from_numpy(seeds.getLabels().astype(np.int64))


# ------------------------------------------------------------------------------------------------------------------
# The original pipelines
# ------------------------------------------------------------------------------------------------------------------


def test_contract_224_without_resize_is_the_original_moco_pipeline():
    images = [synthetic_image(0), synthetic_image(1)]
    processor = CastImageProcessor(do_resize=False, do_center_crop=False)
    outputs = processor(images, return_tensors="pt")
    for index, image in enumerate(images):
        pixel_values, superpixels = original_moco_inputs(image)
        assert torch.equal(outputs["pixel_values"][index], pixel_values)
        assert torch.equal(outputs["superpixels"][index], superpixels)
    assert outputs["superpixels"].max() == 195


@pytest.mark.parametrize("name", ["tiny_moco", "tiny_deit", "tiny_seg_moco"])
def test_processor_reproduces_the_fixture_inputs(name):
    if not FIXTURES.is_dir():
        pytest.skip(f"Shared fixtures not found at {FIXTURES} (the repository expects ../shared beside it).")
    from safetensors.numpy import load_file

    inputs = load_file(str(FIXTURES / name / "inputs.safetensors"))
    images = list(denormalize_to_uint8(inputs["pixel_values"]))
    # The fixtures requested 49 superpixels at 64x64.
    processor = CastImageProcessor(
        do_resize=False, do_center_crop=False, num_superpixels=49, superpixel_reference_size=64
    )
    outputs = processor(images, return_tensors="np")
    np.testing.assert_array_equal(outputs["pixel_values"], inputs["pixel_values"])
    np.testing.assert_array_equal(outputs["superpixels"], inputs["superpixels"])


def test_supervised_recipe_runs_seeds_on_the_truncated_normalised_crop():
    image = synthetic_image(4)
    outputs = CastImageProcessor(do_resize=False, do_center_crop=False, superpixel_recipe="supervised")(
        [image], return_tensors="pt"
    )
    # deit/datasets_seeds.py, from the normalised float32 tensor.
    pixel_values = outputs["pixel_values"][0].numpy()
    sample = ((pixel_values.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(np.uint8)
    lab = cv2.cvtColor(sample, cv2.COLOR_RGB2LAB)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(224, 224, 3, 196, 1, 2, 5, False)
    seeds.iterate(lab, 15)
    np.testing.assert_array_equal(outputs["superpixels"][0].numpy(), seeds.getLabels())


def test_default_resize_and_centre_crop_follow_torchvision():
    image = synthetic_image(5, 300, 402)
    outputs = CastImageProcessor()(image, return_tensors="np")
    # Resize(256): shortest edge 256, long edge int(256 * 402 / 300) = 343, PIL bilinear.
    resized = np.asarray(PIL.Image.fromarray(image).resize((343, 256), PIL.Image.BILINEAR))
    # CenterCrop(224): top = round(32 / 2) = 16, left = round(119 / 2) = 60 (transformers' centre_crop takes 59).
    crop = resized[16:240, 60:284]
    np.testing.assert_array_equal(denormalize_to_uint8(outputs["pixel_values"][0]), crop)
    assert outputs["pixel_values"].shape == (1, 3, 224, 224) and outputs["superpixels"].shape == (1, 224, 224)


def test_return_types():
    image = synthetic_image(6, 64, 64)
    processor = CastImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})
    pt = processor([image, image], return_tensors="pt")
    assert pt["pixel_values"].dtype == torch.float32 and pt["superpixels"].dtype == torch.int64
    assert tuple(pt["pixel_values"].shape) == (2, 3, 64, 64) and tuple(pt["superpixels"].shape) == (2, 64, 64)
    np_outputs = processor([image, image], return_tensors="np")
    assert np_outputs["pixel_values"].dtype == np.float32 and np_outputs["superpixels"].dtype == np.int64
    lists = processor([image, image])
    assert isinstance(lists["pixel_values"], list) and lists["superpixels"][0].shape == (64, 64)
    assert torch.equal(pt["superpixels"], torch.from_numpy(np_outputs["superpixels"]))


@pytest.mark.parametrize("method", ["seeds", "slic", "grid"])
def test_methods_and_worker_counts_give_the_same_batches(method):
    images = [synthetic_image(seed, 120, 160) for seed in range(4)]
    results = [
        CastImageProcessor(superpixel_method=method, num_workers=workers)(images, return_tensors="pt")["superpixels"]
        for workers in (1, 4)
    ]
    assert torch.equal(results[0], results[1])
    for labels in results[0]:
        assert torch.equal(labels.unique(), torch.arange(int(labels.max()) + 1))


# ------------------------------------------------------------------------------------------------------------------
# Input conversion
# ------------------------------------------------------------------------------------------------------------------


def process_whole(image, **kwargs):
    processor = CastImageProcessor(do_resize=False, do_center_crop=False, superpixel_method="grid", **kwargs)
    return denormalize_to_uint8(processor(image, return_tensors="np")["pixel_values"][0])


def test_grayscale_palette_cmyk_and_rgb_arrays_agree_with_pil():
    rgb = synthetic_image(7, 32, 48)
    gray = PIL.Image.fromarray(rgb).convert("L")
    np.testing.assert_array_equal(process_whole(gray), np.repeat(np.asarray(gray)[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(process_whole(np.asarray(gray)), process_whole(gray))
    palette = PIL.Image.fromarray(rgb).convert("P")
    np.testing.assert_array_equal(process_whole(palette), np.asarray(palette.convert("RGB")))
    cmyk = PIL.Image.fromarray(rgb).convert("CMYK")
    np.testing.assert_array_equal(process_whole(cmyk), np.asarray(cmyk.convert("RGB")))
    channels_first = torch.from_numpy(rgb).permute(2, 0, 1)
    np.testing.assert_array_equal(process_whole(channels_first), rgb)
    np.testing.assert_array_equal(process_whole(rgb / 255.0), rgb)  # floats in [0, 1] round to the same bytes


def test_transparency_is_composited_onto_white():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 8:, 3] = 255  # left half transparent
    rgba[:8, :8, 3] = 128
    result = process_whole(PIL.Image.fromarray(rgba, mode="RGBA"))
    np.testing.assert_array_equal(result[:, 8:], np.broadcast_to([200, 0, 0], (16, 8, 3)))
    np.testing.assert_array_equal(result[8:, :8], np.full((8, 8, 3), 255))
    assert np.all(np.abs(result[:8, :8].astype(int) - [227, 127, 127]) <= 1)  # half way to white
    np.testing.assert_array_equal(process_whole(rgba), result)  # 4-channel arrays are RGBA too


def test_16bit_images_are_scaled_to_8bit():
    values = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257  # 0..255 * 257
    values[0, 0] = 65535
    image = PIL.Image.fromarray(values)
    assert image.mode == "I;16"
    result = process_whole(image)
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(result, np.repeat(expected[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(process_whole(values), result)


def test_exif_orientation_is_applied():
    image = PIL.Image.fromarray(synthetic_image(8, 40, 60))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    loaded = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    result = process_whole(loaded)
    assert result.shape == (60, 40, 3)
    np.testing.assert_array_equal(result, np.asarray(loaded.transpose(PIL.Image.Transpose.ROTATE_270)))


def test_file_paths_are_loaded(tmp_path):
    path = tmp_path / "image.png"
    image = synthetic_image(9, 32, 32)
    PIL.Image.fromarray(image).save(path)
    np.testing.assert_array_equal(process_whole(str(path)), image)


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one test per case
# ------------------------------------------------------------------------------------------------------------------


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        CastImageProcessor()([])


def test_zero_pixel_images():
    with pytest.raises(ValueError, match="empty"):
        CastImageProcessor()(np.zeros((0, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        CastImageProcessor()(PIL.Image.new("RGB", (0, 10)))


def test_one_pixel_images():
    pixel = PIL.Image.new("RGB", (1, 1), (10, 200, 30))
    outputs = CastImageProcessor()(pixel, return_tensors="pt")  # upsampled to 256, cropped to 224
    assert tuple(outputs["pixel_values"].shape) == (1, 3, 224, 224)
    expected = np.full((224, 224, 3), [10, 200, 30])
    np.testing.assert_array_equal(denormalize_to_uint8(outputs["pixel_values"][0]), expected)
    with pytest.raises(ValueError, match="SEEDS cannot place"):
        CastImageProcessor(do_resize=False, do_center_crop=False)(pixel)
    grid_processor = CastImageProcessor(do_resize=False, do_center_crop=False, superpixel_method="grid")
    grid = grid_processor(pixel, return_tensors="pt")
    assert grid["superpixels"].tolist() == [[[0]]]


def test_images_smaller_than_the_crop_are_zero_padded_like_torchvision():
    image = synthetic_image(10, 100, 150)
    outputs = CastImageProcessor(do_resize=False)(image, return_tensors="np")
    assert outputs["pixel_values"].shape == (1, 3, 224, 224)
    crop = denormalize_to_uint8(outputs["pixel_values"][0])
    np.testing.assert_array_equal(crop[62:162, 37:187], image)  # padding (124 // 2, 74 // 2) before
    assert crop[:62].max() == 0 and crop[:, :37].max() == 0 and crop[162:].max() == 0 and crop[:, 187:].max() == 0


def test_very_large_images_fail_before_allocation():
    huge = np.broadcast_to(np.zeros(3, dtype=np.uint8), (20000, 20000, 3))  # a view: no memory behind it
    with pytest.raises(ValueError, match="max_image_pixels"):
        CastImageProcessor()(huge)
    thin = PIL.Image.new("RGB", (5000, 1))  # resizing to shortest edge 256 would make 256 x 1280000
    with pytest.raises(ValueError, match="resized image"):
        CastImageProcessor()(thin)
    with pytest.raises(ValueError, match="max_image_pixels=1000"):
        CastImageProcessor(max_image_pixels=1000)(PIL.Image.new("RGB", (50, 50)))


@pytest.mark.parametrize("bad", [{"a": 1}, 42, None, [synthetic_image(0, 32, 32), b"not an image"]])
def test_non_image_objects(bad):
    with pytest.raises(TypeError, match="image"):
        CastImageProcessor()(bad)


def test_nan_and_out_of_range_float_arrays():
    image = np.full((32, 32, 3), 0.5)
    image[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        CastImageProcessor()(image)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CastImageProcessor()(np.full((32, 32, 3), 255.0))
    with pytest.raises(ValueError, match="0..255"):
        CastImageProcessor()(np.full((32, 32, 3), -3, dtype=np.int64))
    with pytest.raises(TypeError, match="dtype"):
        CastImageProcessor()(np.ones((32, 32, 3), dtype=bool))


def normalised(image_0_1):
    """ImageNet normalisation of a float `[H, W, 3]` image in [0, 1], channels first (float32, as torchvision)."""
    values = torch.from_numpy(np.ascontiguousarray(image_0_1, dtype=np.float32)).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (values - mean[:, None, None]) / std[:, None, None]


def test_do_rescale_false_means_the_pixels_are_already_in_0_1():
    """transformers' convention: `do_rescale=False` says "my pixels are already in [0, 1]"; never 255 times off."""
    settings = dict(do_resize=False, do_center_crop=False, return_tensors="pt")
    uint8 = synthetic_image(3, 48, 64)
    as_float = uint8.astype(np.float32) / 255  # the same picture, already rescaled
    reference = CastImageProcessor()(uint8, **settings)
    torch.testing.assert_close(reference["pixel_values"][0], normalised(as_float), rtol=0, atol=1e-6)
    grey = np.repeat(uint8[:, :, :1], 3, axis=-1)
    cases = [(as_float, uint8), (torch.from_numpy(as_float), uint8), (PIL.Image.fromarray(as_float[:, :, 0]), grey)]
    for image, same_in_8bit in cases:
        expected = CastImageProcessor()(same_in_8bit, **settings)
        for do_rescale in (False, True):  # floats are read as [0, 1] either way, never rescaled twice
            for outputs in (
                CastImageProcessor(do_rescale=do_rescale)(image, **settings),
                CastImageProcessor()(image, do_rescale=do_rescale, **settings),
            ):
                assert torch.equal(outputs["pixel_values"], expected["pixel_values"]), (type(image), do_rescale)
                assert torch.equal(outputs["superpixels"], expected["superpixels"])

    # Any float in [0, 1]: the 8-bit reading is within half a grey level of the exact normalisation.
    floats = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    outputs = CastImageProcessor(do_rescale=False)(floats, **settings)["pixel_values"][0]
    torch.testing.assert_close(outputs, normalised(floats), rtol=0, atol=0.5 / 255 / min(IMAGENET_STD) + 1e-6)


@pytest.mark.parametrize(
    "image",
    [synthetic_image(4, 32, 32), PIL.Image.fromarray(synthetic_image(4, 32, 32)), torch.zeros(3, 32, 32).byte()],
    ids=["numpy-uint8", "pil-rgb", "torch-uint8"],
)
def test_do_rescale_false_refuses_8bit_images(image, tmp_path):
    with pytest.raises(ValueError, match="do_rescale=False"):
        CastImageProcessor(do_rescale=False)(image)
    with pytest.raises(ValueError, match="do_rescale=False"):
        CastImageProcessor()(image, do_rescale=False)
    CastImageProcessor(do_rescale=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do_rescale=False"):
        CastImageProcessor.from_pretrained(tmp_path)(image)
    assert CastImageProcessor.from_pretrained(tmp_path)(image, do_rescale=True)["pixel_values"][0].shape[0] == 3


def test_channels_first_or_last_ambiguity():
    image = synthetic_image(11, 3, 8)  # [3, 8, 3]: 3 rows of RGB, or RGB planes of 8x3?
    with pytest.raises(ValueError, match="input_data_format"):
        CastImageProcessor()(image)
    last = CastImageProcessor()(image, input_data_format="channels_last", return_tensors="pt")
    first = CastImageProcessor()(image, input_data_format="channels_first", return_tensors="pt")
    assert last["pixel_values"].shape == first["pixel_values"].shape == (1, 3, 224, 224)
    assert not torch.equal(last["pixel_values"], first["pixel_values"])
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        CastImageProcessor()(np.zeros((8, 8, 5), dtype=np.uint8))


def test_mixed_sizes_in_one_batch():
    images = [synthetic_image(12, 64, 64), synthetic_image(13, 64, 96)]
    assert CastImageProcessor()(images, return_tensors="pt")["pixel_values"].shape == (2, 3, 224, 224)
    processor = CastImageProcessor(do_resize=False, do_center_crop=False, superpixel_method="grid")
    with pytest.raises(ValueError, match="different sizes"):
        processor(images, return_tensors="pt")
    lists = processor(images)
    assert [labels.shape for labels in lists["superpixels"]] == [(64, 64), (64, 96)]


def test_precomputed_superpixels_are_validated():
    images = [synthetic_image(14, 64, 64), synthetic_image(15, 64, 64)]
    processor = CastImageProcessor(do_resize=False, do_center_crop=False)
    with pytest.raises(ValueError, match=r"superpixels\[1\] has shape \(32, 64\)"):
        processor(images, superpixels=[np.zeros((64, 64), dtype=np.int64), np.zeros((32, 64), dtype=np.int64)])
    with pytest.raises(ValueError, match="1 superpixel maps for 2 images"):
        processor(images, superpixels=[np.zeros((64, 64), dtype=np.int64)])
    with pytest.raises(TypeError, match="integer labels"):
        processor(images, superpixels=np.zeros((2, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="negative"):
        processor(images, superpixels=np.full((2, 64, 64), -1))


def test_precomputed_superpixels_follow_resize_and_crop():
    image = synthetic_image(16, 100, 200)
    labels = grid_superpixels(100, 200, 8) * 7 + 3  # 2 x 4 cells of 50x50, non-consecutive ids
    outputs = CastImageProcessor(size={"height": 50, "width": 100}, crop_size={"height": 50, "width": 50})(
        image, superpixels=labels, return_tensors="pt"
    )
    # Resized to 50x100 (cells of 25x25), then the centre 50x50 crop keeps columns 25..75: 2 x 2 cells (ids 1,2,5,6).
    expected = torch.zeros(50, 50, dtype=torch.int64)
    expected[:, 25:] = 1
    expected[25:] += 2
    assert torch.equal(outputs["superpixels"][0], expected)


# ------------------------------------------------------------------------------------------------------------------
# Saving, loading, Auto classes
# ------------------------------------------------------------------------------------------------------------------


def test_save_and_load_keep_the_superpixel_settings(tmp_path):
    processor = CastImageProcessor(
        superpixel_method="slic", superpixel_recipe="supervised", num_superpixels=100, num_workers=2,
        crop_size={"height": 64, "width": 64}, size={"shortest_edge": 72},
    )  # fmt: skip
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CastImageProcessor"
    assert (saved["superpixel_method"], saved["superpixel_recipe"], saved["num_superpixels"], saved["num_workers"]) == (
        "slic", "supervised", 100, 2,
    )  # fmt: skip
    loaded = CastImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = synthetic_image(17, 80, 90)
    expected = processor(image, return_tensors="pt")["superpixels"]
    assert torch.equal(loaded(image, return_tensors="pt")["superpixels"], expected)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()).get("num_workers") == 2
    assert "num_workers" in CastImageProcessor().to_dict()  # saved even when None (= all cores)


def test_auto_image_processor_registration(tmp_path):
    AutoImageProcessor.register(CastConfig, image_processor_classes={"pil": CastImageProcessor}, exist_ok=True)
    CastImageProcessor(num_superpixels=64).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CastImageProcessor and loaded.num_superpixels == 64


def test_bad_settings():
    with pytest.raises(ValueError, match="superpixel_method"):
        CastImageProcessor(superpixel_method="watershed")
    with pytest.raises(ValueError, match="Unknown SEEDS recipe"):
        CastImageProcessor(superpixel_recipe="deit")
    with pytest.raises(ValueError, match="superpixel_method"):
        CastImageProcessor()(synthetic_image(0, 32, 32), superpixel_method="watershed")


# ------------------------------------------------------------------------------------------------------------------
# Post-processing
# ------------------------------------------------------------------------------------------------------------------


class Outputs:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def hand_built_hierarchy(batch=2, num_segments=(64, 16, 8, 4, 2), seed=0):
    generator = torch.Generator().manual_seed(seed)
    parent_of = [
        torch.randint(0, coarse, (batch, fine), generator=generator)
        for fine, coarse in zip(num_segments[:-1], num_segments[1:])
    ]
    return compose_hierarchy(parent_of)


def test_hierarchical_post_processing_on_a_hand_built_hierarchy():
    hierarchy = hand_built_hierarchy()
    superpixels = torch.from_numpy(np.stack([grid_superpixels(64, 64, 64)] * 2))
    results = CastImageProcessor().post_process_hierarchical_segmentation(
        Outputs(hierarchy=hierarchy), superpixels, target_sizes=[(64, 64), (100, 30)]
    )
    assert len(results) == 2 and all(len(maps) == 5 for maps in results)
    assert torch.equal(results[0][0], superpixels[0])
    for level in range(1, 5):  # level l of pixel p is the level-l group of its superpixel
        assert torch.equal(results[0][level], hierarchy[level - 1][0][superpixels[0]])
    assert all(tuple(level_map.shape) == (100, 30) for level_map in results[1])
    assert all(level_map.dtype == torch.int64 for level_map in results[1])
    for maps in results:
        assert_hierarchy_nests(maps)


def test_hierarchical_post_processing_bad_input():
    processor = CastImageProcessor()
    superpixels = torch.zeros(2, 8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="no `hierarchy`"):
        processor.post_process_hierarchical_segmentation(Outputs(logits=torch.zeros(2, 3)), superpixels)
    hierarchy = hand_built_hierarchy()
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        processor.post_process_hierarchical_segmentation(Outputs(hierarchy=hierarchy), superpixels[0])
    with pytest.raises(ValueError, match="0..63"):
        processor.post_process_hierarchical_segmentation(Outputs(hierarchy=hierarchy), superpixels + 64)
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_hierarchical_segmentation(Outputs(hierarchy=hierarchy), superpixels, [(8, 8)])


def test_semantic_post_processing():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 2, :2] = 1.0  # class 2 on top, class 0 below
    logits[0, 0, 2:] = 1.0
    logits[1, 1] = 1.0
    processor = CastImageProcessor()
    maps = processor.post_process_semantic_segmentation(Outputs(logits=logits))
    assert maps[0][:2].eq(2).all() and maps[0][2:].eq(0).all() and maps[1].eq(1).all()
    resized = processor.post_process_semantic_segmentation(Outputs(logits=logits), target_sizes=[(8, 8), (2, 6)])
    assert tuple(resized[0].shape) == (8, 8) and tuple(resized[1].shape) == (2, 6)
    assert resized[0][:4].eq(2).all() and resized[0][4:].eq(0).all()  # bilinear: the boundary stays in the middle
    # Per-superpixel logits [B, N, num_labels] are painted with the superpixels.
    segment_logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    superpixels = torch.tensor([[[0, 1], [1, 1]]])
    painted = processor.post_process_semantic_segmentation(Outputs(logits=segment_logits), superpixels=superpixels)
    assert painted[0].tolist() == [[1, 0], [0, 0]]
    with pytest.raises(ValueError, match="superpixels"):
        processor.post_process_semantic_segmentation(Outputs(logits=segment_logits))


def test_hierarchical_post_processing_on_real_model_outputs(cast_tester):
    from hf_hierseg import modeling_cast as modeling

    model = cast_tester.create_model(modeling.CastModel)
    processor = cast_tester.get_image_processor(num_superpixels=49, superpixel_reference_size=64)
    images = [synthetic_image(seed, 80, 100) for seed in (20, 21)]
    inputs = processor(images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_hierarchical_segmentation(outputs, inputs["superpixels"],
                                                               target_sizes=[(80, 100), (80, 100)])  # fmt: skip
    for index, maps in enumerate(results):
        assert len(maps) == 1 + len(outputs.hierarchy)
        assert all(tuple(level_map.shape) == (80, 100) for level_map in maps)
        assert_hierarchy_nests(maps)
        counts = [len(level_map.unique()) for level_map in maps]
        assert counts == sorted(counts, reverse=True) and counts[-1] <= 2 and counts[1] <= 16
    unresized = processor.post_process_hierarchical_segmentation(outputs, inputs["superpixels"])
    for index, maps in enumerate(unresized):
        assert_hierarchy_nests(maps)
        # Level 0 keeps every superpixel that has a token (sampled at a top-left pixel of the stride-8 grid).
        superpixels = inputs["superpixels"][index]
        has_token = torch.isin(superpixels, superpixels[::8, ::8].unique())
        assert torch.equal(maps[0][has_token], superpixels[has_token])


def previous_hierarchical_post_processing(outputs, superpixels, target_sizes):
    """`post_process_hierarchical_segmentation` before it resized a batch at once (kept here as the reference):
    each level of each image resized on its own."""
    level_maps = outputs.hierarchy_maps(torch.as_tensor(superpixels))
    return [
        [resize_label_maps(level_map[index], size) for level_map in level_maps]
        for index, size in enumerate(target_sizes)
    ]


def test_hierarchical_post_processing_equals_the_previous_one_on_real_photos():
    from hf_hierseg import load_default
    from hf_hierseg.evaluation import real_photos

    try:
        photos = [photo["image"] for photo in real_photos.load_imagenet_photos()[:3]]
        photos.append(real_photos.load_voc_photo()["image"])
    except real_photos.RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable: {error}")
    model, processor = load_default()
    inputs = processor(photos, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    for target_sizes in ([(p.height, p.width) for p in photos], [(375, 500)] * 4, [(100, 61), (160, 160)] * 2):
        results = processor.post_process_hierarchical_segmentation(outputs, inputs["superpixels"], target_sizes)
        expected = previous_hierarchical_post_processing(outputs, inputs["superpixels"], target_sizes)
        for maps, reference in zip(results, expected, strict=True):
            assert len(maps) == len(reference) == 5
            for level_map, reference_map in zip(maps, reference):
                assert level_map.dtype == torch.int64 and torch.equal(level_map, reference_map)


def brute_force_statistics(label_maps, size):
    """Areas, boxes and parents of every level of one image's maps resized to `size`, straight from the pixels."""
    resized = resize_label_maps(label_maps, size).numpy()
    statistics = []
    for level, segmentation in enumerate(resized):
        segments = {}
        for i in np.unique(segmentation):
            rows, cols = np.nonzero(segmentation == i)
            parent = None
            if level + 1 < len(resized):
                (parent,) = set(resized[level + 1][segmentation == i].tolist())
            box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            segments[int(i)] = (len(rows), box, parent)
        statistics.append(segments)
    return statistics


@pytest.mark.parametrize("sizes", [[(40, 30), (40, 30)], [(97, 61), (13, 9)], [(40, 30), (200, 7)]])
def test_segment_statistics_equal_counting_the_resized_pixels(sizes):
    from hf_hierseg.image_processing_cast import segment_statistics

    generator = torch.Generator().manual_seed(len(sizes[1]) + sizes[1][0])
    fine = torch.randint(0, 30, (2, 40, 30), generator=generator)
    fine[1, :, 10:] = 7  # image 1 misses most labels
    maps = [fine]
    for count in (12, 5, 2):  # nested: each level a function of the previous
        maps.append(torch.gather(torch.randint(0, count, (2, 30), generator=generator), 1, maps[-1].flatten(1)))
        maps[-1] = maps[-1].reshape(fine.shape)
    label_maps = torch.stack(maps, dim=1)  # [2, 4, 40, 30]
    statistics = segment_statistics(label_maps, sizes)
    num_labels = statistics["areas"].shape[-1]
    assert num_labels == 30 and statistics["boxes"].shape == (2, 4, 30, 4)
    for image, size in enumerate(sizes):
        expected = brute_force_statistics(label_maps[image], size)
        for level, segments in enumerate(expected):
            areas = statistics["areas"][image, level]
            assert sorted(torch.nonzero(areas)[:, 0].tolist()) == sorted(segments)
            for i, (area, box, parent) in segments.items():
                assert areas[i] == area
                assert statistics["boxes"][image, level, i].tolist() == box
                assert statistics["parents"][image, level, i] == (-1 if parent is None else parent)
            absent = [i for i in range(num_labels) if i not in segments]
            assert (statistics["parents"][image, level, absent] == -1).all()
    assert "parents" not in segment_statistics(label_maps[:, :1], with_parents=False)
