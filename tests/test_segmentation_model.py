"""CastForSemanticSegmentation: parity with the authors' cast_seg.py, loss, fusion, bad input, Auto classes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSemanticSegmentation

from hf_hierseg import CastConfig
from hf_hierseg.convert import convert_state, load_original_checkpoint, parse_overrides
from hf_hierseg.hierarchy import paint_segments
from hf_hierseg.modeling_cast import CastForSemanticSegmentation, segment_cross_entropy

from cast_testing import CastModelTester, assert_hierarchy_nests, grid_superpixels


TINY_OVERRIDES = ["num_attention_heads=4", "num_clusters=16,8,4,2"]


# Graph pooling with 4 heads; the segmentation variant's 4th pooling trainable.
TESTER = CastModelTester(graph_pooling_num_heads=4, freeze_last_pooling=False)


def ten_pixel_grid(batch=2):
    """Rectangular superpixels, consecutive labels; 7 x 7 = 49 segments for 64 px / cell 10."""
    return grid_superpixels(batch, 64, cell=10)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models; fixtures made with one thread


@pytest.fixture(scope="module")
def seg_fixture(shared_dir):
    fixture = shared_dir / "fixtures" / "original_cast" / "tiny_seg_moco"
    checkpoint = load_original_checkpoint(fixture / "checkpoint_0000.pth.tar")
    return checkpoint, load_file(fixture / "inputs.safetensors"), load_file(fixture / "expected.safetensors")


def collect_outputs(model, inputs):
    """Our outputs under the original's names (`features` is the head's input, caught by a hook)."""
    captured = {}
    hook = model.classifier.register_forward_pre_hook(lambda module, args: captured.__setitem__("features", args[0]))
    with torch.no_grad():
        out = model(inputs["pixel_values"], inputs["superpixels"], output_hidden_states=True)
        patch_embed = model.cast.embeddings.patch_embeddings(inputs["pixel_values"])
    hook.remove()
    batch = inputs["pixel_values"].shape[0]
    got = {
        "patch_embed": patch_embed,
        "embeddings": out.hidden_states[0],
        "features": captured["features"].unflatten(0, (batch, -1)),
        "fused_cls": out.fused_hidden_states[:, :1],
        "fused_tokens": out.fused_hidden_states[:, 1:],
        "head": out.segment_logits,
    }
    for level in range(4):
        name = level + 1
        got[f"block_out{name}"] = out.level_hidden_states[level]
        got[f"block{name}"] = out.level_hidden_states[level][:, 1:]
        got[f"logit{name}"] = out.assignment_logits[level]
        got[f"sampled_inds{name}"] = out.sampled_indices[level]
        got[f"padding_mask{name}"] = out.padding_masks[level]
        got[f"centroid{name}"] = out.pooled_hidden_states[level][:, 1:]
        got[f"cls_token{name}"] = out.pooled_hidden_states[level][:, :1]
    return got, out


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_every_tensor_matches_cast_seg(seg_fixture, attn_implementation):
    checkpoint, inputs, expected = seg_fixture
    model, report = convert_state(checkpoint, None, parse_overrides(TINY_OVERRIDES))
    assert isinstance(model, CastForSemanticSegmentation)
    assert model.config.segmentation_head_type == "mlp_projector" and model.config.num_labels == 16
    assert model.config.freeze_last_pooling is False
    assert not model.training
    model.set_attn_implementation(attn_implementation)
    got, out = collect_outputs(model, inputs)
    for key, value in expected.items():
        assert key in got, f"{key} is not produced by the port"
        assert got[key].shape == value.shape, key
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")
        else:
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert set(got) == set(expected)
    # Pixel logits are the per-segment head painted through the superpixel map.
    superpixels = inputs["superpixels"]
    assert out.logits.shape == (2, 16, 64, 64)
    b, y, x = 1, 40, 17
    torch.testing.assert_close(out.logits[b, :, y, x], expected["head"][b, superpixels[b, y, x]], atol=1e-4, rtol=1e-4)


def test_conversion_report_maps_fusion_and_projector(seg_fixture):
    checkpoint, _, _ = seg_fixture
    model, report = convert_state(checkpoint, None, parse_overrides(TINY_OVERRIDES))
    kept = report.kept
    assert kept["module.base_encoder.block_fusion.proj_blocks.0.norm.running_var"] == "fusion.batch_norm.running_var"
    assert kept["module.base_encoder.block_fusion.proj_blocks.2.weight"] == "fusion.projection.weight"
    assert kept["module.base_encoder.head.6.weight"] == "classifier.6.weight"
    assert kept["module.base_encoder.blocks4.0.mlp.fc2.bias"] == "cast.levels.3.blocks.0.mlp.fc2.bias"
    assert "module.predictor.0.weight" in report.dropped
    state = checkpoint["state_dict"]
    torch.testing.assert_close(
        model.fusion.batch_norm.running_mean, state["module.base_encoder.block_fusion.proj_blocks.0.norm.running_mean"]
    )
    # The 4th pooling is trainable in the segmentation variant.
    assert all(p.requires_grad for p in model.cast.levels[3].pooling.parameters())


def test_local_block_indices_with_uneven_depths():
    """cast_seg numbers blocks from 0 in every level: blocks2.1 with depths (1, 2, 1, 1) is level 2's 2nd block."""
    from hf_hierseg.convert import backbone_key

    depths = (1, 2, 1, 1)
    assert backbone_key("blocks2.1.norm1.weight", depths, local_block_indices=True) == "levels.1.blocks.1.norm1.weight"
    assert backbone_key("blocks2.2.norm1.weight", depths) == "levels.1.blocks.1.norm1.weight"  # global numbering


def test_fusion_gathers_levels_to_segments():
    """Independent loop implementation of BlockFusion's gather + concat against the module (eval mode)."""
    model = TESTER.create_model(CastForSemanticSegmentation)
    fusion = model.fusion
    with torch.no_grad():
        fusion.batch_norm.running_mean.uniform_(-1, 1)
        fusion.batch_norm.running_var.uniform_(0.5, 2)
    B, C, sizes = 2, 24, (20, 16, 8, 4)
    tokens = [torch.randn(B, n, C) for n in sizes]
    cls = [torch.randn(B, 1, C) for _ in sizes]
    parents = [torch.randint(0, k, (B, n)) for n, k in zip(sizes[:3], sizes[1:])]
    groups = [parents[0], parents[1].gather(1, parents[0]), parents[2].gather(1, parents[1].gather(1, parents[0]))]
    with torch.no_grad():
        fused = fusion(tokens, cls, groups)
    bn = fusion.batch_norm
    for b in range(B):
        for s in [0, 7, 19]:
            level2 = parents[0][b, s]
            level3 = parents[1][b, level2]
            level4 = parents[2][b, level3]
            row = torch.cat([tokens[0][b, s], tokens[1][b, level2], tokens[2][b, level3], tokens[3][b, level4]])
            normed = (row - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            torch.testing.assert_close(fused[b, 1 + s], fusion.projection(normed), atol=1e-5, rtol=1e-5)
        cls_row = torch.cat([c[b, 0] for c in cls])
        normed = (cls_row - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        torch.testing.assert_close(fused[b, 0], fusion.projection(normed), atol=1e-5, rtol=1e-5)


def test_segment_loss_equals_pixel_cross_entropy():
    torch.manual_seed(0)
    segment_logits = torch.randn(2, 12, 5, requires_grad=True)
    superpixels = torch.randint(0, 12, (2, 9, 7))
    labels = torch.randint(0, 5, (2, 9, 7))
    labels[0, :3] = 255
    loss = segment_cross_entropy(segment_logits, superpixels, labels, 255)
    painted = paint_segments(segment_logits, superpixels).permute(0, 3, 1, 2)
    reference = F.cross_entropy(painted, labels, ignore_index=255)
    torch.testing.assert_close(loss, reference)
    (grad,) = torch.autograd.grad(loss, segment_logits)
    (reference_grad,) = torch.autograd.grad(reference, segment_logits)
    torch.testing.assert_close(grad, reference_grad)
    # All pixels ignored: a zero loss, not NaN.
    all_ignored = segment_cross_entropy(segment_logits, superpixels, torch.full_like(labels, 255), 255)
    assert all_ignored.item() == 0.0


def test_forward_loss_backward_reaches_every_trainable_parameter():
    model = TESTER.create_model(CastForSemanticSegmentation, train=True)
    pixel_values = torch.randn(2, 3, 64, 64)
    superpixels = ten_pixel_grid()
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[:, :5] = 255
    out = model(pixel_values, superpixels, labels=labels)
    assert out.logits.shape == (2, 3, 64, 64) and out.segment_logits.shape == (2, 49, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels, ignore_index=255))
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # In training mode the fusion's BatchNorm statistics couple the fused CLS (pool4's CLS output) to the tokens,
    # so even the 4th pooling, trainable in this variant, receives gradients.
    assert not no_grad, no_grad
    assert all(p.requires_grad for p in model.cast.levels[3].pooling.parameters())
    assert model.cast.layernorm is None


def test_hierarchy_maps_nest_at_full_resolution():
    model = TESTER.create_model(CastForSemanticSegmentation)
    superpixels = ten_pixel_grid()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), superpixels)
    maps = out.hierarchy_maps(superpixels)
    assert torch.equal(maps[0], superpixels)  # no superpixel is lost at full resolution
    assert_hierarchy_nests(maps)  # each fine region has one parent


def test_tester_checks_on_the_ten_pixel_grid():
    """The shared checks of CastForSemanticSegmentation (shapes, composed argmax, nesting, full resolution) with
    more segments (49) than level-1 clusters (16)."""
    config, pixel_values, _ = TESTER.prepare_config_and_inputs()
    TESTER.create_and_check_for_semantic_segmentation(config, pixel_values, ten_pixel_grid())


def test_linear_head_and_custom_ignore_index():
    model = TESTER.create_model(CastForSemanticSegmentation, semantic_loss_ignore_index=-100)
    assert isinstance(model.classifier, torch.nn.Linear)
    labels = torch.full((2, 64, 64), -100)
    labels[:, 10:20, 10:20] = 2
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), ten_pixel_grid(), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels, ignore_index=-100))
    with pytest.raises(ValueError, match="segmentation_head_type"):
        CastForSemanticSegmentation(TESTER.get_config(segmentation_head_type="conv"))


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.full((2, 64, 64), 3), "class ids in \\[3, 3\\].*3 labels"),
        (torch.full((2, 64, 64), -1), "class ids in \\[-1, -1\\]"),
        (torch.zeros(2, 32, 32, dtype=torch.long), "does not match"),
        (torch.zeros(2, 64, 64, 3, dtype=torch.long), "RGB"),
        (torch.zeros(2, 64, 64), "integer"),
    ],
)
def test_bad_labels_are_rejected(labels, message):
    model = TESTER.create_model(CastForSemanticSegmentation)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, 64, 64), ten_pixel_grid(), labels=labels)


def test_ignore_index_labels_are_accepted():
    model = TESTER.create_model(CastForSemanticSegmentation)
    labels = torch.full((2, 64, 64), 255)
    labels[0, 0, 0] = 2
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), ten_pixel_grid(), labels=labels)
    assert torch.isfinite(out.loss)


def test_auto_class_round_trip(tmp_path):
    import hf_hierseg  # noqa: F401  (registers the config)

    AutoModelForSemanticSegmentation.register(CastConfig, CastForSemanticSegmentation, exist_ok=True)
    model = TESTER.create_model(
        CastForSemanticSegmentation, segmentation_head_type="mlp_projector", projection_hidden_dim=8
    )
    model.eval().save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).segmentation_head_type == "mlp_projector"
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CastForSemanticSegmentation)
    inputs = (torch.randn(2, 3, 64, 64), ten_pixel_grid())
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).logits, model(*inputs).logits)


def test_image_processor_post_processing_and_pipeline():
    """CastImageProcessor -> CastForSemanticSegmentation -> post_process_semantic_segmentation / image-segmentation."""
    from PIL import Image

    from hf_hierseg.image_processing_cast import CastImageProcessor
    from hf_hierseg.pipelines import CastImageSegmentationPipeline

    model = TESTER.create_model(CastForSemanticSegmentation, id2label={0: "sky", 1: "grass", 2: "cow"})
    processor = CastImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, num_superpixels=600
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    inputs = processor(images=[image, image], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(90, 120), (45, 60)])
    assert [tuple(m.shape) for m in maps] == [(90, 120), (45, 60)]
    native = processor.post_process_semantic_segmentation(outputs)[0]
    assert torch.equal(native, outputs.logits[0].argmax(0))
    # Per-segment logits painted by the processor give the same map.
    per_segment = processor.post_process_semantic_segmentation(
        type("Out", (), {"logits": outputs.segment_logits})(), superpixels=inputs["superpixels"]
    )[0]
    assert torch.equal(per_segment, native)

    segmenter = CastImageSegmentationPipeline(model=model, image_processor=processor)
    results = segmenter(image)
    assert {r["label"] for r in results} <= {"sky", "grass", "cow"}
    assert all(r["mask"].size == (120, 90) for r in results)


def test_converted_directory_loads_with_its_processor(shared_dir, tmp_path):
    """convert_checkpoint on cast_seg: a save_pretrained folder whose processor resizes without centre crop."""
    from hf_hierseg.convert import convert_checkpoint
    from hf_hierseg.image_processing_cast import CastImageProcessor

    fixture = shared_dir / "fixtures" / "original_cast" / "tiny_seg_moco"
    model, _ = convert_checkpoint(fixture / "checkpoint_0000.pth.tar", tmp_path, None, parse_overrides(TINY_OVERRIDES))
    processor = CastImageProcessor.from_pretrained(tmp_path)
    assert processor.do_center_crop is False and processor.size["height"] == processor.size["width"] == 64
    AutoModelForSemanticSegmentation.register(CastConfig, CastForSemanticSegmentation, exist_ok=True)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    inputs = load_file(fixture / "inputs.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).segment_logits, model(**inputs).segment_logits)


def test_segmentation_encoder_is_a_cast_model_built_by_switches():
    """No module is replaced after construction: the encoder is a CastModel built without the final norm and with
    full-resolution segment pooling; the same CastModel on its own computes the same tokens and hierarchy."""
    from hf_hierseg import CastModel
    from hf_hierseg.modeling_cast import CastEmbeddings

    torch.manual_seed(0)
    config = TESTER.get_config()
    model = CastForSemanticSegmentation(config).eval()
    assert type(model.cast) is CastModel and type(model.cast.embeddings) is CastEmbeddings
    assert model.cast.embeddings.pool_at_full_resolution and model.cast.layernorm is None
    encoder = CastModel(config, add_final_norm=False, pool_segments_at_full_resolution=True).eval()
    encoder.load_state_dict(model.cast.state_dict())  # strict: the same modules
    pixel_values, superpixels = torch.randn(2, 3, 64, 64), ten_pixel_grid()
    with torch.no_grad():
        out = model(pixel_values, superpixels)
        alone = encoder(pixel_values, superpixels)
    for got, expected in zip(out.level_hidden_states, alone.level_hidden_states):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(alone.last_hidden_state, alone.level_hidden_states[-1], atol=0, rtol=0)  # no norm
    assert alone.hierarchy[0].shape == (2, 49)  # one token per superpixel


def test_full_resolution_hierarchy_maps_keep_every_superpixel():
    """On the stride-8 grid the superpixels of the last 4 pixel rows/columns (row and column 6 of the 10 px cells)
    are never sampled; pooled at full resolution they keep their tokens, and hierarchy_maps knows it."""
    from hf_hierseg import CastModel

    torch.manual_seed(0)
    config = TESTER.get_config()
    pixel_values, superpixels = torch.randn(2, 3, 64, 64), ten_pixel_grid()
    with torch.no_grad():
        full = CastModel(config, pool_segments_at_full_resolution=True).eval()(pixel_values, superpixels)
        grid = CastModel(config).eval()(pixel_values, superpixels)
    assert torch.equal(full.hierarchy_maps(superpixels)[0], superpixels)
    assert not torch.equal(grid.hierarchy_maps(superpixels)[0], superpixels)
    assert torch.equal(full.hierarchy_maps(superpixels, patch_size=8)[0], grid.hierarchy_maps(superpixels)[0])
    assert not full.padding_masks[0][:, :49].any() and grid.padding_masks[0][:, 42:49].all()
