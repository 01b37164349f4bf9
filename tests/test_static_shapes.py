"""Static token budget (`CastConfig(num_segment_tokens=N)`): N level-1 tokens whatever the labels, results equal to the
dynamic model with masked padding, clear errors, and a processor that never returns N or more labels."""

import numpy as np
import pytest
import torch

from hf_hierseg import (
    CastConfig,
    CastForImageClassification,
    CastForSemanticSegmentation,
    CastImageProcessor,
    CastModel,
)
from hf_hierseg.image_processing_cast import budgeted_request, limit_segment_count
from hf_hierseg.loading import align_processor_with_model, static_model_and_processor
from hf_hierseg.superpixels import seeds_num_superpixels

from cast_testing import CastModelTester


BUDGET = 24
# The tiny CAST these tests were written with: 8 -> 4 -> 3 -> 2 clusters, 5 labels, 12 graph-pooling heads.
TESTER = CastModelTester(num_clusters=(8, 4, 3, 2), num_labels=5, graph_pooling_num_heads=12)


def uneven_superpixels(batch=3, size=64, seed=0):
    """Random rectangles per image with different label counts (16, 12, 9, ...), so every image but the largest has
    padding tokens and the batch's largest label stays below BUDGET."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for index in range(batch):
        side = 4 - index % 3  # 4x4, 3x3, 2x2 blocks ... of the image
        rows = torch.arange(size)[:, None] * side // size
        cols = torch.arange(size)[None, :] * side // size
        labels = rows * side + cols
        # shuffle ids so that they are not in raster order
        labels = torch.randperm(side * side, generator=generator)[labels]
        maps.append(labels)
    return torch.stack(maps)


def inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 64, 64, generator=generator), uneven_superpixels(batch, seed=seed)


def paired_models(model_class, **overrides):
    """The dynamic masked model and the same weights with a static budget."""
    dynamic = TESTER.create_model(model_class, mask_padding_tokens=True, **overrides)
    static = model_class(TESTER.get_config(num_segment_tokens=BUDGET, **overrides)).eval()
    static.load_state_dict(dynamic.state_dict())
    return dynamic, static


def assert_same_hierarchy(dynamic, static, num_tokens):
    """Equal outputs, the static ones cut to the dynamic model's `num_tokens` level-1 tokens."""
    for name in ("level_hidden_states", "pooled_hidden_states", "assignment_logits"):
        for level, (a, b) in enumerate(zip(getattr(dynamic, name), getattr(static, name))):
            if level == 0 and name != "pooled_hidden_states":
                extra = 1 if name == "level_hidden_states" else 0  # CLS first
                b = b[:, : num_tokens + extra]
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"{name}[{level}]")
    for a, b in zip(dynamic.sampled_indices, static.sampled_indices):
        assert torch.equal(a, b)
    for a, b in zip(dynamic.hierarchy, static.hierarchy):
        assert torch.equal(a, b[:, :num_tokens])
    assert torch.equal(dynamic.padding_masks[0], static.padding_masks[0][:, :num_tokens])
    assert bool(static.padding_masks[0][:, num_tokens:].all())


def test_config_defaults_and_validation(tmp_path):
    config = CastConfig()
    assert config.num_segment_tokens is None and not config.has_static_segment_tokens
    assert config.mask_padding_tokens is False  # converted checkpoints keep the original's behaviour
    static = TESTER.get_config(num_segment_tokens=BUDGET)
    assert static.mask_padding_tokens is True and static.has_static_segment_tokens
    with pytest.raises(ValueError, match="num_segment_tokens.*num_clusters"):
        TESTER.get_config(num_segment_tokens=7)
    CastModel(static).save_pretrained(tmp_path)
    loaded = CastModel.from_pretrained(tmp_path)
    assert loaded.config.num_segment_tokens == BUDGET and loaded.config.mask_padding_tokens is True
    assert TESTER.get_config(max_attention_memory=None).max_attention_memory is None


@pytest.mark.parametrize("model_class", [CastModel, CastForImageClassification])
def test_static_equals_dynamic_masked(model_class):
    dynamic_model, static_model = paired_models(model_class)
    pixel_values, superpixels = inputs()
    num_tokens = max(int(superpixels.max()) + 1, TESTER.config_kwargs["num_clusters"][0])
    with torch.no_grad():
        dynamic, static = dynamic_model(pixel_values, superpixels), static_model(pixel_values, superpixels)
    assert static.level_hidden_states[0].shape[1] == 1 + BUDGET
    assert dynamic.level_hidden_states[0].shape[1] == 1 + num_tokens < 1 + BUDGET
    assert_same_hierarchy(dynamic, static, num_tokens)
    if model_class is CastModel:
        torch.testing.assert_close(static.pooler_output, dynamic.pooler_output, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(static.logits, dynamic.logits, atol=1e-5, rtol=1e-5)


def test_static_segmentation_equals_dynamic_masked():
    dynamic_model, static_model = paired_models(CastForSemanticSegmentation)
    pixel_values, superpixels = inputs(batch=2)
    labels = torch.randint(
        0, TESTER.config_kwargs["num_labels"], superpixels.shape, generator=torch.Generator().manual_seed(1)
    )
    num_tokens = max(int(superpixels.max()) + 1, TESTER.config_kwargs["num_clusters"][0])
    with torch.no_grad():
        dynamic = dynamic_model(pixel_values, superpixels, labels=labels)
        static = static_model(pixel_values, superpixels, labels=labels)
    assert_same_hierarchy(dynamic, static, num_tokens)
    torch.testing.assert_close(static.logits, dynamic.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.loss, dynamic.loss, atol=1e-5, rtol=1e-5)


def test_static_shapes_do_not_follow_the_labels():
    model = TESTER.create_model(CastModel, num_segment_tokens=BUDGET)
    pixel_values = torch.randn(1, 3, 64, 64)
    for labels in (torch.zeros(1, 64, 64, dtype=torch.long), uneven_superpixels(1), torch.full((1, 64, 64), 23)):
        with torch.no_grad():
            output = model(pixel_values, labels)
        assert output.level_hidden_states[0].shape == (1, 1 + BUDGET, 24)
        assert output.hierarchy[0].shape == (1, BUDGET)
        present = torch.zeros(BUDGET, dtype=torch.bool)
        present[labels.unique()] = True
        assert torch.equal(output.padding_masks[0][0], ~present)


def test_labels_outside_the_budget_are_refused():
    model = CastModel(TESTER.get_config(num_segment_tokens=BUDGET)).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"labels in \[24, 24\].*num_segment_tokens = 24.*0\.\.23"):
        model(pixel_values, torch.full((1, 64, 64), BUDGET))
    with pytest.raises(ValueError, match="num_segment_tokens = 24"):
        model(pixel_values, torch.full((1, 64, 64), -1))


def test_set_num_segment_tokens_switches_a_dynamic_model():
    dynamic_model, reference = paired_models(CastModel)
    switched = CastModel(TESTER.get_config()).eval()  # unmasked, dynamic
    switched.load_state_dict(dynamic_model.state_dict())
    switched.set_num_segment_tokens(BUDGET)
    pixel_values, superpixels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            switched(pixel_values, superpixels).pooler_output, reference(pixel_values, superpixels).pooler_output
        )
    with pytest.raises(ValueError, match="at least `num_clusters"):
        switched.set_num_segment_tokens(3)


def test_limit_segment_count_merges_into_neighbours():
    labels = np.arange(36).reshape(6, 6) // 2  # 18 segments of 2 pixels, in rows of 3
    labels[0, :] = 0  # segment 0 takes the first row (6 px); 1 and 2 vanish, the map is not consecutive
    consecutive = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    limited = limit_segment_count(consecutive, 5)
    assert limited.max() + 1 == 5 and set(np.unique(limited)) == set(range(5))
    for segment in np.unique(consecutive):  # every input segment lies inside one output segment
        assert len(np.unique(limited[consecutive == segment])) == 1
    assert limit_segment_count(consecutive, 100) is consecutive


def test_budgeted_request_fits_seeds_grid():
    for height, width, request, budget in ((224, 224, 196, 100), (224, 224, 196, 196), (64, 96, 80, 20)):
        fitted = budgeted_request("seeds", height, width, request, budget)
        assert seeds_num_superpixels(height, width, fitted) <= budget
        assert fitted <= request


def test_processor_caps_labels_and_is_saved(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
    image[:48] //= 3  # some structure
    processor = CastImageProcessor(do_resize=False, do_center_crop=False, num_superpixels=196, num_segment_tokens=30)
    for method in ("seeds", "slic", "grid"):
        superpixels = processor(image, superpixel_method=method, return_tensors="pt")["superpixels"]
        assert int(superpixels.max()) < 30, method
    uncapped = CastImageProcessor(do_resize=False, do_center_crop=False, num_superpixels=196)
    assert int(uncapped(image, return_tensors="pt")["superpixels"].max()) >= 30
    precomputed = np.arange(96 * 96).reshape(96, 96) // 96  # 96 rows
    capped = processor(image, superpixels=[precomputed], return_tensors="pt")["superpixels"]
    assert int(capped.max()) == 29
    processor.save_pretrained(tmp_path)
    assert CastImageProcessor.from_pretrained(tmp_path).num_segment_tokens == 30
    with pytest.raises(ValueError, match="num_segment_tokens"):
        CastImageProcessor(num_segment_tokens=0)


def test_static_model_and_processor(tmp_path):
    model = CastModel(TESTER.get_config()).eval()
    processor = CastImageProcessor(do_resize=False, do_center_crop=False, num_superpixels=49)
    model, static_processor = static_model_and_processor(model, processor, BUDGET)
    assert processor.num_segment_tokens is None and static_processor.num_segment_tokens == BUDGET
    assert model.config.num_segment_tokens == BUDGET
    image = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    batch = static_processor([image, image[::-1]], return_tensors="pt")
    assert int(batch["superpixels"].max()) < BUDGET
    with torch.no_grad():
        output = model(**batch)
    assert output.level_hidden_states[0].shape == (2, 1 + BUDGET, 24)
    assert align_processor_with_model(model, processor).num_segment_tokens == BUDGET
