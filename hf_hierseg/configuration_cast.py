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
# Largest estimated attention memory of a forward accepted by default, in bytes (`CastConfig.max_attention_memory`).
DEFAULT_MAX_ATTENTION_MEMORY = 16 * 2**30


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
            partners. `False` reproduces the original, where padding tokens take part. Implied by
            `num_segment_tokens`.
        num_segment_tokens (`int`, *optional*): a static token budget. `None` (the default, and the original's
            behaviour) makes one level-1 token per superpixel id up to the largest id in the batch (at least
            `num_clusters[0]`), a count read from the data. With N set, level 1 always has N tokens: superpixel ids
            must be < N and ids absent from an image are padding tokens, masked as with `mask_padding_tokens=True`
            (which it implies), so results equal those of the dynamic masked model. The forward then has no shape
            read from the data and no host synchronisation, so it compiles (`torch.compile(fullgraph=True)`) and
            exports. N must be at least `num_clusters[0]`; pair the model with a processor that never returns N or
            more labels (`hf_hierseg.image_processing_cast.static_model_and_processor`).
        max_attention_memory (`int`, *optional*, defaults to 16 GiB): the largest estimated attention memory of a
            forward, in bytes; larger batches are refused before anything is allocated (see
            `modeling_cast.check_attention_memory`). `None` disables the check.
        freeze_last_pooling (`bool`, defaults to `True`): the original freezes the 4th graph pooling (it does
            not affect the embedding).
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal initialiser.
        projection_dim, projection_hidden_dim (`int`, default 256 / 4096): MoCo-v3 projector and predictor sizes
            (used by `CastForSelfSupervisedPretraining`).
        segmentation_head_type (`"linear"` | `"mlp_projector"`), semantic_loss_ignore_index (`int`, 255): head and
            ignored label of `CastForSemanticSegmentation`.
        hierarchy_num_labels (`tuple[int]`, defaults to `()`): the taxonomy of
            `CastForHierarchicalImageClassification` (H-CAST): classes per label level, finest first (e.g. CUB's
            `(200, 38, 13)` species, family, order). Empty for every other model. 2 to 4 levels.
        hierarchy_parents (`tuple[tuple[int]]`, defaults to `()`): for each level but the coarsest, the parent of
            each class at the next coarser level (`hierarchy_parents[k][i]` is a class of level k + 1). Every class
            has one parent and every class of a coarser level at least one child.
        hierarchy_id2label (`tuple[dict[int, str]]`, *optional*): class names per level, finest first (default
            `LABEL_<i>`, the finest level's from `id2label` when given). `id2label` is the finest level's.
        hierarchy_level_names (`tuple[str]`, *optional*): names of the label levels (default `rank0`, `rank1`, ...).
        hierarchy_cast_levels (`tuple[int]`, *optional*): the CAST level (1..4) whose CLS token each label level is
            read from: the CLS token after that level's blocks, level 4's after the final LayerNorm. Default: the
            authors' mapping, the coarsest level on level 4 and each finer one a level earlier (3 levels: `(2, 3,
            4)`; 2 levels: `(3, 4)`). `(4, 4)` reads every level from the final CLS token (the flat baseline).
        tree_path_kl_weight (`float`, defaults to 0.5): weight of the tree-path KL term of the H-CAST loss.
        hierarchy_label_smoothing (`float`, defaults to 0.0): label smoothing of each level's one-hot target.
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
        num_segment_tokens=None,
        max_attention_memory=DEFAULT_MAX_ATTENTION_MEMORY,
        freeze_last_pooling=True,
        initializer_range=0.02,
        projection_dim=256,
        projection_hidden_dim=4096,
        segmentation_head_type="linear",
        semantic_loss_ignore_index=255,
        hierarchy_num_labels=(),
        hierarchy_parents=(),
        hierarchy_id2label=None,
        hierarchy_level_names=None,
        hierarchy_cast_levels=None,
        tree_path_kl_weight=0.5,
        hierarchy_label_smoothing=0.0,
        **kwargs,
    ):
        labels_given = kwargs.get("id2label") is not None or kwargs.get("num_labels") is not None
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
        self.num_segment_tokens = None if num_segment_tokens is None else int(num_segment_tokens)
        # A static budget pads every image to N tokens: padding is always masked.
        self.mask_padding_tokens = bool(mask_padding_tokens) or self.num_segment_tokens is not None
        self.max_attention_memory = None if max_attention_memory is None else int(max_attention_memory)
        self.freeze_last_pooling = freeze_last_pooling
        self.initializer_range = initializer_range
        self.projection_dim = projection_dim
        self.projection_hidden_dim = projection_hidden_dim
        self.segmentation_head_type = segmentation_head_type
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.tree_path_kl_weight = tree_path_kl_weight
        self.hierarchy_label_smoothing = hierarchy_label_smoothing
        self.set_taxonomy(
            hierarchy_num_labels,
            hierarchy_parents,
            hierarchy_id2label,
            hierarchy_level_names,
            hierarchy_cast_levels,
            finest_id2label=self.id2label if labels_given else None,
        )
        # transformers' `_get_model_class` iterates `config.architectures` (None until saved) to pick between the
        # classes registered for one Auto class (CastForImageClassification, CastForHierarchicalImageClassification).
        if self.architectures is None:
            self.architectures = []
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
        if self.num_segment_tokens is not None and self.num_segment_tokens < self.num_clusters[0]:
            raise ValueError(
                f"`num_segment_tokens` ({self.num_segment_tokens}) must be at least `num_clusters[0]` "
                f"({self.num_clusters[0]}): the first graph pooling keeps that many of the level-1 tokens."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})."
            )

    def set_taxonomy(
        self, num_labels, parents=(), id2label=None, level_names=None, cast_levels=None, finest_id2label=None
    ):
        """Store a taxonomy (the `hierarchy_*` fields of the class docstring, in that order) with its defaults filled
        in: class names `LABEL_<i>` (the finest level's from `finest_id2label` when it has the right size), level
        names `rank<k>`, the authors' CAST levels. `id2label` / `label2id` become the finest level's. Lists become
        tuples and JSON's string keys ints; `validate_taxonomy` checks the result.

        Use it to give a loaded config a taxonomy: `from_pretrained(..., hierarchy_num_labels=...)` sets keyword
        arguments as plain attributes after `__init__`, without defaults or checks."""
        for name, value in (("hierarchy_num_labels", num_labels), ("hierarchy_parents", parents)):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"`{name}` must be a list (one entry per level), got {type(value).__name__}.")
        if not all(isinstance(level, (list, tuple)) for level in parents):
            raise ValueError("`hierarchy_parents` must hold one list of parent ids per level.")
        self.hierarchy_num_labels = tuple(int(n) for n in num_labels)
        self.hierarchy_parents = tuple(tuple(int(parent) for parent in level) for level in parents)
        num_levels = len(self.hierarchy_num_labels)
        if not num_levels:
            if parents or id2label or level_names or cast_levels:
                raise ValueError(
                    "`hierarchy_parents`, `hierarchy_id2label`, `hierarchy_level_names` and `hierarchy_cast_levels` "
                    "describe a taxonomy: give `hierarchy_num_labels` (classes per level, finest first) too."
                )
            self.hierarchy_id2label, self.hierarchy_level_names, self.hierarchy_cast_levels = (), (), ()
            return
        if id2label is None:
            id2label = [{index: f"LABEL_{index}" for index in range(count)} for count in self.hierarchy_num_labels]
            if finest_id2label is not None:
                if len(finest_id2label) != self.hierarchy_num_labels[0]:
                    raise ValueError(
                        f"`id2label` / `num_labels` give {len(finest_id2label)} classes, but the finest level of "
                        f"`hierarchy_num_labels` {self.hierarchy_num_labels} has {self.hierarchy_num_labels[0]}."
                    )
                id2label[0] = finest_id2label
        if not isinstance(id2label, (list, tuple)) or not all(isinstance(names, dict) for names in id2label):
            raise ValueError("`hierarchy_id2label` must be a list with one {class id: name} dict per level.")
        self.hierarchy_id2label = tuple({int(key): str(name) for key, name in names.items()} for names in id2label)
        self.hierarchy_level_names = tuple(
            str(name) for name in (level_names or [f"rank{level}" for level in range(num_levels)])
        )
        if cast_levels is None:
            cast_levels = range(NUM_LEVELS - num_levels + 1, NUM_LEVELS + 1)
        self.hierarchy_cast_levels = tuple(int(level) for level in cast_levels)
        self.validate_taxonomy()
        self.id2label = dict(self.hierarchy_id2label[0])
        self.label2id = {name: index for index, name in self.id2label.items()}

    def validate_taxonomy(self):
        """Raise a `ValueError` naming the problem when the taxonomy fields (`hierarchy_*`) are not a tree."""
        counts = self.hierarchy_num_labels
        if not counts:
            return
        num_levels = len(counts)
        if not 2 <= num_levels <= NUM_LEVELS:
            raise ValueError(
                f"`hierarchy_num_labels` needs 2 to {NUM_LEVELS} label levels (finest first), got {counts}; for one "
                "level use CastForImageClassification."
            )
        if any(count < 1 for count in counts):
            raise ValueError(f"`hierarchy_num_labels` must be positive class counts, got {counts}.")
        for name in ("hierarchy_id2label", "hierarchy_level_names", "hierarchy_cast_levels"):
            if len(getattr(self, name)) != num_levels:
                raise ValueError(
                    f"`{name}` needs one entry per level of `hierarchy_num_labels` {counts}, got "
                    f"{len(getattr(self, name))}."
                )
        for level, (names, count) in enumerate(zip(self.hierarchy_id2label, counts)):
            if sorted(names) != list(range(count)):
                raise ValueError(
                    f"`hierarchy_id2label[{level}]` must name the classes 0..{count - 1} of level {level}, got ids "
                    f"{sorted(names)[:10]}."
                )
        if len(set(self.hierarchy_level_names)) != num_levels:
            raise ValueError(f"`hierarchy_level_names` must be distinct, got {self.hierarchy_level_names}.")
        if any(not 1 <= level <= NUM_LEVELS for level in self.hierarchy_cast_levels):
            raise ValueError(
                f"`hierarchy_cast_levels` are CAST levels 1..{NUM_LEVELS}, got {self.hierarchy_cast_levels}."
            )
        if len(self.hierarchy_parents) != num_levels - 1:
            raise ValueError(
                f"`hierarchy_parents` needs one list per level but the coarsest ({num_levels - 1} for "
                f"`hierarchy_num_labels` {counts}), got {len(self.hierarchy_parents)}: the parent, at the next "
                "coarser level, of every class."
            )
        for level, parents in enumerate(self.hierarchy_parents):
            if len(parents) != counts[level]:
                raise ValueError(
                    f"`hierarchy_parents[{level}]` must give the parent of each of the {counts[level]} classes of "
                    f"level {level} (every class has exactly one parent), got {len(parents)} entries."
                )
            outside = [(child, parent) for child, parent in enumerate(parents) if not 0 <= parent < counts[level + 1]]
            if outside:
                child, parent = outside[0]
                raise ValueError(
                    f"`hierarchy_parents[{level}][{child}]` = {parent} is not a class of level {level + 1} "
                    f"(0..{counts[level + 1] - 1})."
                )
            childless = sorted(set(range(counts[level + 1])) - set(parents))
            if childless:
                raise ValueError(
                    f"Classes {childless[:10]} of level {level + 1} are no class's parent in `hierarchy_parents[{level}]`"
                    ": every class of a coarser level needs at least one child."
                )
        if not 0.0 <= self.hierarchy_label_smoothing < 1.0:
            raise ValueError(f"`hierarchy_label_smoothing` must be in [0, 1), got {self.hierarchy_label_smoothing}.")
        if self.tree_path_kl_weight < 0:
            raise ValueError(f"`tree_path_kl_weight` must be non-negative, got {self.tree_path_kl_weight}.")

    @property
    def has_static_segment_tokens(self):
        """Whether level 1 has the fixed token count `num_segment_tokens` (a static budget) rather than one read from
        the superpixel ids."""
        return getattr(self, "num_segment_tokens", None) is not None

    def hierarchy_paths(self):
        """The taxonomy's root-to-leaf paths (`hierarchy_paths(self)`): one row `(i, parent of i, ...)` per finest
        class, the rows of H-CAST's `data/*_tree.json`. Empty without a taxonomy."""
        return hierarchy_paths(self)

    @classmethod
    def from_preset(cls, name, **kwargs):
        """Build the configuration of one of the authors' models: `cast-small`, `cast-small-deep`, `cast-base`,
        `cast-base-deep`. Keyword arguments override preset values."""
        if name not in CAST_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(CAST_PRESETS)}.")
        return cls(**{**CAST_PRESETS[name], **kwargs})


def hierarchy_paths(config):
    """The root-to-leaf paths of the taxonomy of `config` (any config with `hierarchy_num_labels` and
    `hierarchy_parents`), finest first: `paths[i] = (i, parent of i, grandparent of i, ...)`; empty without one."""
    num_labels = getattr(config, "hierarchy_num_labels", None) or ()
    paths = []
    for leaf in range(num_labels[0] if num_labels else 0):
        path = [leaf]
        for parents in config.hierarchy_parents:
            path.append(parents[path[-1]])
        paths.append(tuple(path))
    return tuple(paths)


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
    "DEFAULT_MAX_ATTENTION_MEMORY",
    "STAGE_NAMES",
    "CastBackboneConfig",
    "CastConfig",
    "backbone_config",
    "check_is_cast",
    "hierarchy_paths",
    "is_cast",
]
