"""CAST as a transformers backbone: the segment tokens of every level painted back onto the stride-8 pixel grid."""

import torch
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from .configuration_cast import NUM_LEVELS, CastConfig
from .modeling_cast import CastModel, CastPreTrainedModel
from .segment_ops import resize_labels_nearest
from .superpixels import grid_superpixels, scaled_num_superpixels


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
    if getattr(config, "model_type", None) != "cast":
        raise ValueError(f"CastBackbone needs a CAST configuration (model_type 'cast'), got {type(config).__name__}.")
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


def default_superpixels(pixel_values):
    """Grid superpixels [B, H, W] for images [B, C, H, W], on their device."""
    batch, _, height, width = pixel_values.shape
    grid = grid_superpixels(height, width, scaled_num_superpixels(height, width))
    return torch.from_numpy(grid).to(pixel_values.device).expand(batch, -1, -1)


class CastBackbone(BackboneMixin, CastPreTrainedModel):
    """CAST feature maps for dense heads: `feature_maps` holds, for each of `out_features`, a map [B, C, H/8, W/8].

    "stem" is the convolutional stem; "level<l>" paints every level-l segment token onto the grid cells of the
    superpixels it groups (level 1: one token per superpixel; level l > 1: the clusters of level l - 1), after the
    final LayerNorm. Superpixels are sampled on the stride-8 grid exactly as the model's tokens are.

    Dense heads that pass only `pixel_values` (UperNet, DPT, ...) get a regular grid of superpixels (196 per
    224x224 pixels); pass `superpixels` (e.g. SEEDS from `CastImageProcessor`) for CAST's own segments.
    """

    _keys_to_ignore_on_load_unexpected = [r"^classifier\.", r"^projector\.", r"^predictor\."]

    def __init__(self, config, out_features=None, out_indices=None):
        super().__init__(backbone_config(config, out_features, out_indices))
        self.num_features = [self.config.hidden_size] * len(STAGE_NAMES)
        self.cast = CastModel(self.config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        superpixels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        if superpixels is None and torch.is_tensor(pixel_values) and pixel_values.dim() == 4:
            superpixels = default_superpixels(pixel_values)
        self.cast._validate_inputs(pixel_values, superpixels)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict

        embeddings, padding_mask, stem = self.cast.embeddings(pixel_values, superpixels)
        encoded = self.cast.encode(embeddings, padding_mask, output_attentions, output_hidden_states)
        grid_labels = resize_labels_nearest(superpixels, stem.shape[1:3])  # [B, h, w], level-1 token of each cell

        stage_maps = {"stem": stem}
        cell_token = grid_labels.flatten(1)  # [B, h * w]
        for level, (name, tokens) in enumerate(zip(LEVEL_NAMES, encoded["level_hidden_states"])):
            if level > 0:  # level-l tokens are the groups of level l - 1
                cell_token = torch.gather(encoded["hierarchy"][level - 1], 1, grid_labels.flatten(1))
            if name in self.out_features:
                tokens = self.cast.layernorm(tokens[:, 1:]) if self.cast.layernorm is not None else tokens[:, 1:]
                index = cell_token.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
                stage_maps[name] = torch.gather(tokens, 1, index).reshape(stem.shape)
        feature_maps = tuple(stage_maps[name].permute(0, 3, 1, 2).contiguous() for name in self.out_features)

        output = BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=encoded["hidden_states"],
            attentions=encoded["attentions"],
        )
        return output if return_dict else output.to_tuple()


__all__ = ["CastBackbone", "CastBackboneConfig", "backbone_config", "default_superpixels", "STAGE_NAMES"]
