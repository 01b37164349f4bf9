"""CAST model configuration."""

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


# The authors' factories (cast_models/cast.py, cast_deit.py): width, heads, depths, clusters.
CAST_PRESETS = {
    "cast-small": dict(hidden_size=384, num_attention_heads=12, depths=(3, 3, 3, 2)),
    "cast-small-deep": dict(hidden_size=384, num_attention_heads=12, depths=(6, 3, 3, 3)),
    "cast-base": dict(hidden_size=768, num_attention_heads=12, depths=(3, 3, 3, 2)),
    "cast-base-deep": dict(hidden_size=768, num_attention_heads=12, depths=(6, 3, 3, 3)),
}

NUM_LEVELS = 4


class CastConfig(PretrainedConfig):
    r"""
    Configuration of a CAST model: a ViT whose tokens are superpixel segments, merged level by level by
    graph pooling into a part-to-whole hierarchy.

    Args:
        hidden_size (`int`, defaults to 384): token width C.
        num_attention_heads (`int`, defaults to 12): heads of the ViT blocks.
        depths (`tuple[int]`, defaults to `(3, 3, 3, 2)`): ViT blocks before each of the 4 graph poolings.
        num_clusters (`tuple[int]`, defaults to `(64, 32, 16, 8)`): segments kept by each graph pooling.
        mlp_ratio (`float`, defaults to 4.0): MLP width / token width.
        qkv_bias (`bool`, defaults to `True`): bias in the attention projections.
        image_size (`int`, defaults to 224): training resolution (sets the position-embedding grid).
        patch_size (`int`, defaults to 8): total stride of the convolutional stem.
        num_channels (`int`, defaults to 3): image channels.
        layer_norm_eps (`float`, defaults to 1e-6): eps of the ViT LayerNorms.
        position_embedding_type (`str`, defaults to `"sincos"`): `"sincos"` (fixed, MoCo / plain CAST) or
            `"learned"` (DeiT-style, with a CLS slot).
        hidden_dropout_prob, attention_probs_dropout_prob, drop_path_rate: regularisation (no-ops in eval).
        pooling_dropout_prob (`float`, defaults to 0.1): dropout inside graph pooling's MLP (as the original).
        graph_pooling_num_heads (`int`, defaults to 12): heads of graph pooling's attention (12 in the original).
        assignment_scale (`float`, defaults to 5.0): scale of the cosine assignment logits.
        mask_padding_tokens (`bool`, defaults to `False`): when `True`, segments absent from an image are
            masked in attention, mean-centring and pooling, so an image's output does not depend on its batch
            partners. `False` reproduces the original, where padding tokens take part.
        freeze_last_pooling (`bool`, defaults to `True`): the original freezes the 4th graph pooling (it does
            not affect the embedding).
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal initialiser.
        projection_dim, projection_hidden_dim (`int`, default 256 / 4096): MoCo-v3 projector and predictor sizes
            (used by `CastForSelfSupervisedPretraining`).
        segmentation_head_type (`"linear"` | `"mlp_projector"`), semantic_loss_ignore_index (`int`, 255): head and
            ignored label of `CastForSemanticSegmentation`.
    """

    model_type = "cast"

    def __init__(
        self,
        hidden_size=384,
        num_attention_heads=12,
        depths=(3, 3, 3, 2),
        num_clusters=(64, 32, 16, 8),
        mlp_ratio=4.0,
        qkv_bias=True,
        image_size=224,
        patch_size=8,
        num_channels=3,
        layer_norm_eps=1e-6,
        position_embedding_type="sincos",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        pooling_dropout_prob=0.1,
        graph_pooling_num_heads=12,
        assignment_scale=5.0,
        mask_padding_tokens=False,
        freeze_last_pooling=True,
        initializer_range=0.02,
        projection_dim=256,
        projection_hidden_dim=4096,
        segmentation_head_type="linear",
        semantic_loss_ignore_index=255,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.depths = tuple(int(d) for d in depths)
        self.num_clusters = tuple(int(k) for k in num_clusters)
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.layer_norm_eps = layer_norm_eps
        self.position_embedding_type = position_embedding_type
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.pooling_dropout_prob = pooling_dropout_prob
        self.graph_pooling_num_heads = graph_pooling_num_heads
        self.assignment_scale = assignment_scale
        self.mask_padding_tokens = mask_padding_tokens
        self.freeze_last_pooling = freeze_last_pooling
        self.initializer_range = initializer_range
        self.projection_dim = projection_dim
        self.projection_hidden_dim = projection_hidden_dim
        self.segmentation_head_type = segmentation_head_type
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.validate_cast()

    @property
    def num_hidden_layers(self):
        return sum(self.depths)

    def validate_cast(self):
        """Raise a `ValueError` that says what to change when the settings cannot build a CAST model."""
        if len(self.depths) != NUM_LEVELS or len(self.num_clusters) != NUM_LEVELS:
            raise ValueError(
                f"`depths` and `num_clusters` need {NUM_LEVELS} entries (one per level), got depths={self.depths} "
                f"and num_clusters={self.num_clusters}."
            )
        if any(d < 0 for d in self.depths):
            raise ValueError(f"`depths` must be non-negative, got {self.depths}.")
        if any(k < 1 for k in self.num_clusters):
            raise ValueError(f"`num_clusters` must be positive, got {self.num_clusters}.")
        if any(a <= b for a, b in zip(self.num_clusters, self.num_clusters[1:])):
            raise ValueError(
                f"`num_clusters` must be strictly decreasing (each level merges segments), got {self.num_clusters}."
            )
        for name in ("num_attention_heads", "graph_pooling_num_heads"):
            heads = getattr(self, name)
            if heads < 1 or self.hidden_size % heads != 0:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `{name}` ({heads}); "
                    f"pick a width that is a multiple of {heads}, or change `{name}`."
                )
        if self.patch_size != 8:
            raise ValueError(f"The ConvStem has a fixed stride of 8: `patch_size` must be 8, got {self.patch_size}.")
        if self.hidden_size % 8 != 0:
            raise ValueError(
                f"`hidden_size` must be a multiple of 8 (ConvStem widths C/8..C), got {self.hidden_size}."
            )
        if self.position_embedding_type not in ("sincos", "learned"):
            raise ValueError(
                f"`position_embedding_type` must be 'sincos' or 'learned', got {self.position_embedding_type!r}."
            )
        if self.position_embedding_type == "sincos" and self.hidden_size % 4 != 0:
            raise ValueError(f"Sin-cos position embeddings need `hidden_size` divisible by 4, got {self.hidden_size}.")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})."
            )

    @classmethod
    def from_preset(cls, name, **kwargs):
        """Build the configuration of one of the authors' models: `cast-small`, `cast-small-deep`, `cast-base`,
        `cast-base-deep`. Keyword arguments override preset values."""
        if name not in CAST_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(CAST_PRESETS)}.")
        return cls(**{**CAST_PRESETS[name], **kwargs})


def is_cast(obj):
    """Whether `obj` (a model, a config or a pipeline's model) is CAST: compares `config.model_type`, so classes
    loaded as remote code (which fail `isinstance` with the package's classes) count too."""
    config = getattr(obj, "config", obj)
    return getattr(config, "model_type", None) == CastConfig.model_type


def check_is_cast(obj, user, error=ValueError):
    """Raise `error` naming `user` unless `obj` is a CAST model or config (see `is_cast`)."""
    if not is_cast(obj):
        raise error(
            f"{user} needs a CAST model or a CAST configuration (config.model_type 'cast'), got {type(obj).__name__}."
        )


LEVEL_NAMES = [f"level{level}" for level in range(1, NUM_LEVELS + 1)]
STAGE_NAMES = ["stem"] + LEVEL_NAMES


class CastBackboneConfig(BackboneConfigMixin, CastConfig):
    """[`CastConfig`] with the backbone fields: `stage_names` ("stem", "level1".."level4"), `out_features` and
    `out_indices` (defaults to the four levels)."""

    def __init__(self, out_features=None, out_indices=None, **kwargs):
        kwargs.pop("stage_names", None)
        super().__init__(**kwargs)
        self.stage_names = STAGE_NAMES
        if out_features is None and out_indices is None:
            out_features = LEVEL_NAMES
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    def to_dict(self):
        """Saves `out_features` only: a plain `CastConfig` reloads it as an attribute, and the indices and stage names
        follow from it (so `from_pretrained(..., out_features=...)` or `out_indices=...` cannot disagree with it)."""
        output = super().to_dict()
        output.pop("out_indices", None)
        output.pop("stage_names", None)
        return output


def backbone_config(config, out_features=None, out_indices=None):
    """A backbone configuration for `config` (a CAST config, package or remote code): `config` itself when it already
    is one, else a [`CastBackboneConfig`] with its values. Explicit `out_features` / `out_indices` win over saved
    ones."""
    check_is_cast(config, "CastBackbone")
    if isinstance(config, BackboneConfigMixin):
        if out_features is not None or out_indices is not None:
            config.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        return config
    values = config.to_dict()
    saved_features = values.pop("out_features", None)
    if out_features is None and out_indices is None:
        out_features = saved_features
    for key in ("model_type", "transformers_version", "stage_names", "_out_features", "_out_indices"):
        values.pop(key, None)
    return CastBackboneConfig(out_features=out_features, out_indices=out_indices, **values)


__all__ = [
    "CAST_PRESETS",
    "STAGE_NAMES",
    "CastBackboneConfig",
    "CastConfig",
    "backbone_config",
    "check_is_cast",
    "is_cast",
]
