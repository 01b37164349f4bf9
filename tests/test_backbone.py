"""CastBackbone: per-level feature maps on the stride-8 grid, out_features handling, AutoBackbone, weight loading."""

import pytest
import torch
from transformers import AutoBackbone, AutoConfig

from hf_hierseg import CastConfig, CastModel
from hf_hierseg.configuration_cast import STAGE_NAMES
from hf_hierseg.modeling_cast import CastBackbone

from cast_testing import random_superpixels


AutoBackbone.register(CastConfig, CastBackbone, exist_ok=True)  # until hf_hierseg/__init__.py registers it


@pytest.fixture(scope="module")
def backbone(cast_tester):
    return cast_tester.create_model(CastBackbone)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=generator), random_superpixels(2)


def test_default_out_features_are_the_four_levels(backbone, inputs):
    assert backbone.stage_names == STAGE_NAMES == ["stem", "level1", "level2", "level3", "level4"]
    assert backbone.out_features == ["level1", "level2", "level3", "level4"]
    assert backbone.channels == [24] * 4
    with torch.no_grad():
        maps = backbone(*inputs).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 24, 8, 8)] * 4


def test_feature_maps_paint_each_level_token_on_its_grid_cells(cast_tester, backbone, inputs):
    """Reference computed cell by cell from the outputs of a CastModel with the backbone's weights: the cell (i, j)
    samples the superpixel at pixel (8i, 8j), which is its level-1 token; the level-(l+1) token is the argmax of the
    level-l token's assignment logits; the feature is the final LayerNorm of that token."""
    pixel_values, superpixels = inputs
    model = CastModel(cast_tester.get_config()).eval()
    model.load_state_dict(backbone.state_dict())  # strict: the backbone's modules have CastModel's names
    with torch.no_grad():
        maps = backbone(pixel_values, superpixels).feature_maps
        outputs = model(pixel_values, superpixels)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                token = int(superpixels[b, 8 * i, 8 * j])
                for level in range(4):
                    tokens = outputs.level_hidden_states[level][b, 1:]
                    expected = model.layernorm(tokens[token])
                    torch.testing.assert_close(maps[level][b, :, i, j], expected)
                    token = int(
                        outputs.assignment_logits[level][b, token].argmax()
                    )  # its cluster = next level's token


def test_maps_are_constant_on_groups_and_levels_get_coarser(backbone, inputs):
    with torch.no_grad():
        maps = backbone(*inputs).feature_maps
    distinct = [len(torch.unique(m[0].flatten(1).T, dim=0)) for m in maps]
    assert distinct[1] <= 16 and distinct[2] <= 8 and distinct[3] <= 4
    assert distinct[0] >= distinct[1] >= distinct[2] >= distinct[3] >= 1


def test_out_features_selection_and_stem(cast_tester, inputs):
    torch.manual_seed(0)
    backbone = CastBackbone(cast_tester.get_config(), out_features=["stem", "level3"]).eval()
    assert backbone.out_indices == [0, 3]
    pixel_values, superpixels = inputs
    with torch.no_grad():
        stem_map, level3 = backbone(pixel_values, superpixels).feature_maps
        stem = backbone.embeddings.patch_embeddings(pixel_values)
    torch.testing.assert_close(stem_map, stem.permute(0, 3, 1, 2))
    assert level3.shape == (2, 24, 8, 8)
    with pytest.raises(ValueError, match="stage_names"):
        CastBackbone(cast_tester.get_config(), out_features=["level5"])


def test_save_reload_and_auto_backbone(tmp_path, backbone, inputs):
    backbone.save_pretrained(tmp_path / "backbone")
    reloaded = CastBackbone.from_pretrained(tmp_path / "backbone", out_indices=[2, 4]).eval()
    assert reloaded.out_features == ["level2", "level4"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*inputs).feature_maps[1], backbone(*inputs).feature_maps[3])
    # AutoBackbone.from_pretrained checks the Hub for the name before loading; for a local folder go through the config.
    auto = AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path / "backbone"))
    assert type(auto) is CastBackbone and auto.out_features == backbone.out_features


def test_backbone_loads_the_weights_of_a_cast_model(cast_tester, tmp_path, inputs):
    model = cast_tester.create_model(CastModel, seed=3)
    model.save_pretrained(tmp_path / "model")
    backbone = CastBackbone.from_pretrained(tmp_path / "model", out_features=["level4"]).eval()
    with torch.no_grad():
        (level4,) = backbone(*inputs).feature_maps
        outputs = model(*inputs)
    # Every level-4 token that some cell shows is the model's (final-normed) last_hidden_state token.
    shown = torch.unique(level4[0].flatten(1).T, dim=0)
    expected = outputs.last_hidden_state[0, 1:]
    assert all(torch.isclose(expected, row, atol=1e-6).all(-1).any() for row in shown)


def test_rejects_a_config_of_another_model():
    from transformers import ViTConfig

    with pytest.raises(ValueError, match="CAST configuration"):
        CastBackbone(ViTConfig())


def test_dense_head_uses_the_backbone_with_pixel_values_only(cast_tester):
    """UperNet builds the backbone through AutoBackbone and passes only `pixel_values`: grid superpixels."""
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    config = UperNetConfig(
        backbone_config=cast_tester.get_config(), hidden_size=16, auxiliary_channels=8, num_labels=5
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config).eval()
    assert type(model.backbone) is CastBackbone and model.backbone.channels == [24] * 4
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))
    outputs = model(pixel_values, labels=labels)
    assert outputs.logits.shape == (2, 5, 64, 64) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.backbone.levels[0].blocks[0].attn.qkv.weight.grad is not None


def test_backbone_owns_the_modules_of_a_cast_model(cast_tester):
    """Like Dinov2Backbone: its own embeddings, levels and final norm, under CastModel's names (no wrapped model)."""
    from hf_hierseg.modeling_cast import CastEmbeddings, CastEncoder

    backbone = CastBackbone(cast_tester.get_config())
    assert not hasattr(backbone, "cast")
    assert isinstance(backbone.embeddings, CastEmbeddings) and not backbone.embeddings.pool_at_full_resolution
    assert isinstance(backbone.levels, CastEncoder) and isinstance(backbone.layernorm, torch.nn.LayerNorm)
    assert list(backbone.state_dict()) == list(CastModel(cast_tester.get_config()).state_dict())
    assert not any(p.requires_grad for p in backbone.levels[3].pooling.parameters())  # frozen as in CastModel


@pytest.mark.parametrize("head", ["CastForImageClassification", "CastForSelfSupervisedPretraining"])
def test_backbone_loads_head_checkpoints_without_their_prefix(cast_tester, tmp_path, inputs, head):
    """Head checkpoints store the backbone under `cast.`; the backbone has no `cast` attribute, so transformers
    strips the base_model_prefix, and the heads' own weights are ignored."""
    import hf_hierseg.modeling_cast as modeling

    model = cast_tester.create_model(getattr(modeling, head), seed=5, projection_dim=8, projection_hidden_dim=16)
    model.save_pretrained(tmp_path / "head")
    backbone, info = CastBackbone.from_pretrained(tmp_path / "head", out_features=["level4"], output_loading_info=True)
    assert not any(info.values()), info
    for name, tensor in model.cast.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name
    with torch.no_grad():
        (level4,) = backbone.eval()(*inputs).feature_maps
        expected = model.cast(*inputs).last_hidden_state[0, 1:]
    shown = torch.unique(level4[0].flatten(1).T, dim=0)
    assert all(torch.isclose(expected, row, atol=1e-6).all(-1).any() for row in shown)


def test_heads_load_a_saved_backbone_with_the_prefix_added(cast_tester, tmp_path, inputs):
    from hf_hierseg import CastForImageClassification

    backbone = cast_tester.create_model(CastBackbone, seed=6)
    backbone.save_pretrained(tmp_path / "backbone")
    classifier, info = CastForImageClassification.from_pretrained(tmp_path / "backbone", output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and not info["unexpected_keys"]
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(classifier.cast.state_dict()[name], tensor), name


def test_backbone_records_hidden_states_and_block_attentions(cast_tester, backbone, inputs):
    model = CastModel(cast_tester.get_config()).eval()
    model.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        out = backbone(*inputs, output_hidden_states=True, output_attentions=True)
        reference = model(*inputs, output_hidden_states=True, output_attentions=True)
        plain = backbone(*inputs)
    assert plain.hidden_states is None and plain.attentions is None
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    for got, expected in zip(out.hidden_states + out.attentions, reference.hidden_states + reference.attentions):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    as_tuple = backbone(*inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple[0]) == 4
