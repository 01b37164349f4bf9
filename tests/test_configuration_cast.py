import pytest
from transformers import AutoConfig

from hf_hierseg import CastConfig


@pytest.mark.parametrize(
    "name,width,depths",
    [
        ("cast-small", 384, (3, 3, 3, 2)),
        ("cast-small-deep", 384, (6, 3, 3, 3)),
        ("cast-base", 768, (3, 3, 3, 2)),
        ("cast-base-deep", 768, (6, 3, 3, 3)),
    ],
)
def test_presets_match_the_authors_factories(name, width, depths):
    config = CastConfig.from_preset(name)
    assert (config.hidden_size, config.depths, config.num_attention_heads) == (width, depths, 12)
    assert config.num_clusters == (64, 32, 16, 8) and config.patch_size == 8 and config.qkv_bias
    assert config.graph_pooling_num_heads == 12 and config.mlp_ratio == 4


def test_round_trip_through_auto_config(tmp_path):
    config = CastConfig.from_preset("cast-small", num_clusters=(32, 16, 8, 4), position_embedding_type="learned")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is CastConfig
    assert loaded.num_clusters == (32, 16, 8, 4) and loaded.depths == (3, 3, 3, 2)
    assert loaded.position_embedding_type == "learned"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hidden_size=100, num_attention_heads=10, graph_pooling_num_heads=10), "multiple of 8"),
        (dict(hidden_size=96, num_attention_heads=5), "divisible by `num_attention_heads`"),
        (dict(hidden_size=40, num_attention_heads=4), "divisible by `graph_pooling_num_heads`"),
        (dict(num_clusters=(64, 64, 16, 8)), "strictly decreasing"),
        (dict(num_clusters=(64, 32, 16)), "4 entries"),
        (dict(depths=(3, 3, 3)), "4 entries"),
        (dict(patch_size=16), "patch_size"),
        (dict(position_embedding_type="rope"), "position_embedding_type"),
        (dict(image_size=100), "multiple of `patch_size`"),
    ],
)
def test_invalid_configs_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CastConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="cast-small"):
        CastConfig.from_preset("cast-huge")
