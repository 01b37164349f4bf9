"""The cost guard at native resolution: the processor (`max_superpixels`) and the model
(`config.max_attention_memory`) refuse, with an error that gives the estimate and the options, inputs whose
superpixel count or attention memory is too large, before any large allocation."""

import time

import numpy as np
import PIL.Image
import pytest
import torch

from hf_hierseg import CastForSemanticSegmentation, CastImageProcessor, CastModel, load_default
from hf_hierseg.modeling_cast import CastBackbone


def test_a_6000x4000_photo_at_native_resolution_is_refused_by_the_processor():
    photo = PIL.Image.new("RGB", (6000, 4000), (90, 120, 30))
    processor = CastImageProcessor()
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        processor(photo, do_resize=False, do_center_crop=False)
    message = str(error.value)
    assert time.perf_counter() - start < 5  # before SEEDS on 24 megapixels
    assert "4000x6000 pixels" in message and "about 93,750 superpixels" in message
    assert "max_superpixels=16,384" in message and "32.7 GiB per head" in message
    assert "do_resize=True" in message and "num_superpixels" in message and "raise max_superpixels" in message
    # The default resize keeps it cheap; a lower limit, or none, is the user's choice.
    assert processor(photo, return_tensors="pt")["superpixels"].shape == (1, 224, 224)
    with pytest.raises(ValueError, match="about 196 superpixels, more than max_superpixels=100"):
        CastImageProcessor(max_superpixels=100)(photo)
    unlimited = CastImageProcessor(max_superpixels=None, superpixel_method="grid", do_center_crop=False,
                                   size={"height": 448, "width": 448})  # fmt: skip
    assert unlimited(photo, return_tensors="pt")["superpixels"].max() + 1 == 784  # 4 x 196, no error
    assert CastImageProcessor(max_superpixels=123).to_dict()["max_superpixels"] == 123


def test_precomputed_superpixels_are_counted_exactly():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    labels = np.arange(64 * 64).reshape(64, 64)
    processor = CastImageProcessor(do_resize=False, do_center_crop=False, max_superpixels=4095)
    with pytest.raises(ValueError, match=r"superpixels\[0\] would have 4,096 superpixels"):
        processor(image, superpixels=labels)
    assert processor(image, superpixels=labels // 2)["superpixels"][0].max() == 2047


def native_inputs(height, width, cell=16):
    """`pixel_values` [1, 3, H, W] without memory behind it (expanded) and square `cell` superpixels (int32)."""
    pixel_values = torch.zeros(1, 3, 1, 1).expand(1, 3, height, width)
    rows = torch.arange(height, dtype=torch.int32)[:, None] // cell * (width // cell)
    superpixels = (rows + torch.arange(width, dtype=torch.int32)[None, :] // cell)[None]
    return pixel_values, superpixels


def test_a_6000x4000_input_is_refused_by_the_model_before_any_allocation():
    model, _ = load_default()
    pixel_values, superpixels = native_inputs(4000, 6000)
    with pytest.raises(ValueError) as error:
        model(pixel_values=pixel_values, superpixels=superpixels)
    message = str(error.value)
    assert "131.0 GiB per attention map (batch 1 x 4 heads x 93,751^2 tokens x 4 bytes)" in message
    assert "config.max_attention_memory = 16.0 GiB" in message and "93,750 here, for 4000x6000-pixel images" in message
    assert "do_resize=True" in message and "fewer images per batch" in message


def test_the_model_limit_is_configurable_and_counts_batch_heads_and_tokens(cast_tester):
    pixel_values, superpixels = native_inputs(64, 64, cell=8)  # 64 tokens (one per stride-8 cell)
    pixel_values = pixel_values.contiguous()
    batch = (pixel_values.expand(2, -1, -1, -1), superpixels.expand(2, -1, -1))
    exact = 2 * 4 * 65**2 * 4  # bytes of one attention map for the batch (CLS + 64 tokens)
    model = cast_tester.create_model(CastModel, max_attention_memory=exact)
    with torch.no_grad():
        model(*batch)  # at the limit: runs
        model.config.max_attention_memory = exact - 1
        with pytest.raises(ValueError, match=r"batch 2 x 4 heads x 65\^2 tokens x 4 bytes"):
            model(*batch)
        model(pixel_values, superpixels)  # one image fits
        model.config.max_attention_memory = None
        model(*batch)
        for other in (
            CastBackbone(cast_tester.get_config(max_attention_memory=1000)),
            CastModel(cast_tester.get_config(max_attention_memory=1000)),
        ):
            with pytest.raises(ValueError, match="max_attention_memory"):
                other.eval()(pixel_values, superpixels)


def test_full_resolution_pooling_counts_its_features(cast_tester):
    config = cast_tester.get_config(num_labels=3, max_attention_memory=3 * 2**20 - 1)
    model = CastForSemanticSegmentation(config).eval()
    pixel_values, superpixels = native_inputs(128, 256, cell=64)  # 8 tokens, features 1 x 128 x 256 x 24 x 4 bytes
    with pytest.raises(ValueError, match=r"3.0 MiB for the features pooled at full resolution \(batch 1 x 128x256"):
        model(pixel_values.contiguous(), superpixels)
    model.config.max_attention_memory = 4 * 2**20
    with torch.no_grad():
        assert model(pixel_values.contiguous(), superpixels).logits.shape == (1, 3, 128, 256)


def test_the_saved_limit_is_loaded(cast_tester, tmp_path):
    CastModel(cast_tester.get_config(max_attention_memory=12345)).save_pretrained(tmp_path)
    assert CastModel.from_pretrained(tmp_path).config.max_attention_memory == 12345
