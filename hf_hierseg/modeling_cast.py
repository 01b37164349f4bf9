"""PyTorch CAST: a ViT over superpixel segments with graph pooling between levels (Ke, Mo & Yu, ICLR 2024)."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .attention import CastSelfAttention, padding_attention_mask
from .configuration_cast import CastConfig
from .graph_pooling import GraphPooling
from .hierarchy import compose_hierarchy, paint_hierarchy, parents_from_logits
from .segment_ops import resize_labels_nearest, segment_mean


@dataclass
class CastModelOutput(ModelOutput):
    """
    Outputs of [`CastModel`]. N_l is the number of tokens entering level l (N_1 = superpixel label count, then
    N_{l+1} = K_l); C the width.

    Args:
        last_hidden_state (`[B, 1 + N_4, C]`): final-normed tokens of the last level (CLS first).
        pooler_output (`[B, C]`): final-normed CLS token, the image embedding (the original `out4`).
        level_hidden_states (4 x `[B, 1 + N_l, C]`): tokens after each level's blocks, CLS first.
        pooled_hidden_states (4 x `[B, 1 + K_l, C]`): pooled CLS and cluster tokens after each graph pooling.
        assignment_logits (4 x `[B, N_l, K_l]`): token-to-cluster logits of each graph pooling.
        sampled_indices (4 x int64 `[B, K_l]`): the tokens farthest point sampling picked as cluster seeds.
        padding_masks (4 x bool `[B, N_l]`): True where a level-1 token is a label absent from that image.
        hierarchy (4 x int64 `[B, N_1]`): the group, at levels 1..4, of every level-1 segment (superpixel id).
        hidden_states, attentions: per block, on request, as in transformers.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    level_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooled_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    assignment_logits: tuple[torch.FloatTensor, ...] | None = None
    sampled_indices: tuple[torch.LongTensor, ...] | None = None
    padding_masks: tuple[torch.BoolTensor, ...] | None = None
    hierarchy: tuple[torch.LongTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None

    def hierarchy_maps(self, superpixels, patch_size=8):
        """Pixel label maps [B, H, W] for levels 0 (superpixels) to 4; see `hierarchy.paint_hierarchy`."""
        return paint_hierarchy(self.hierarchy, superpixels, patch_size=patch_size)


@dataclass
class CastImageClassifierOutput(ImageClassifierOutput):
    """[`ImageClassifierOutput`] plus the hierarchy fields of [`CastModelOutput`]."""

    pooler_output: torch.FloatTensor | None = None
    assignment_logits: tuple[torch.FloatTensor, ...] | None = None
    padding_masks: tuple[torch.BoolTensor, ...] | None = None
    hierarchy: tuple[torch.LongTensor, ...] | None = None

    def hierarchy_maps(self, superpixels, patch_size=8):
        return paint_hierarchy(self.hierarchy, superpixels, patch_size=patch_size)


def sincos_position_grid(height, width, channels):
    """Fixed 2D sin-cos embedding [1, height * width, C] in row-major order: [sin(r w), cos(r w), sin(c w), cos(c w)]
    with w_d = 1 / 10000^(d / (C/4)). The row comes first, as in the original (exact on square grids)."""
    quarter = channels // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    # The original builds meshgrid(grid_w, grid_h) and views the flattened result as (H, W).
    first, second = torch.meshgrid(
        torch.arange(width, dtype=torch.float32), torch.arange(height, dtype=torch.float32), indexing="ij"
    )
    out_first = torch.einsum("m,d->md", first.flatten(), omega)
    out_second = torch.einsum("m,d->md", second.flatten(), omega)
    table = torch.cat([out_first.sin(), out_first.cos(), out_second.sin(), out_second.cos()], dim=1)
    return table[None]


class CastConvStem(nn.Module):
    """4 x (3x3 conv without bias, BatchNorm, ReLU) with strides 2, 2, 2, 1 and widths C/8..C, then a 1x1 conv.
    Output channels-last [B, H/8, W/8, C]."""

    def __init__(self, config):
        super().__init__()
        layers, in_channels, out_channels = [], config.num_channels, config.hidden_size // 8
        for stride in (2, 2, 2, 1):
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels, out_channels = out_channels, out_channels * 2
        layers.append(nn.Conv2d(in_channels, config.hidden_size, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def forward(self, pixel_values):
        """`self.proj` computed faster (1.5x on CPU at batch 32): channels-last activations, each eval-mode
        BatchNorm folded into its convolution, and the final 1x1 convolution as a Linear over channels."""
        layers = list(self.proj)
        hidden = pixel_values.contiguous(memory_format=torch.channels_last)
        for conv, norm, activation in zip(layers[0:-1:3], layers[1:-1:3], layers[2:-1:3]):
            if norm.training:
                hidden = activation(norm(conv(hidden)))
                continue
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            weight, bias = conv.weight * scale.view(-1, 1, 1, 1), norm.bias - norm.running_mean * scale
            hidden = activation(F.conv2d(hidden, weight, bias, conv.stride, conv.padding))
        final = layers[-1]
        return F.linear(hidden.permute(0, 2, 3, 1), final.weight.flatten(1), final.bias)


class CastEmbeddings(nn.Module):
    """ConvStem features and position embeddings averaged per superpixel, plus a CLS token."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grid_size = config.image_size // config.patch_size
        num_cells = self.grid_size**2
        self.patch_embeddings = CastConvStem(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.position_embedding_type == "learned":
            # Slot 0 is the CLS position.
            self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + num_cells, config.hidden_size))
        else:
            self.register_buffer(
                "position_embeddings",
                sincos_position_grid(self.grid_size, self.grid_size, config.hidden_size),
                persistent=False,
            )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_grid(self, height, width):
        """Position embedding per grid cell [1, height, width, C], bicubically interpolated off the training grid."""
        table = self.position_embeddings
        if self.config.position_embedding_type == "learned":
            table = table[:, 1:]
        grid = table.reshape(1, self.grid_size, self.grid_size, -1)
        if (height, width) == (self.grid_size, self.grid_size):
            return grid
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)

    def cls_position(self):
        if self.config.position_embedding_type == "learned":
            return self.position_embeddings[:, :1]
        return torch.zeros_like(self.cls_token)

    def segment_tokens(self, features, positions, labels, num_segments):
        """Average features [B, h, w, C] and positions [1, h, w, C] over the cells of each label in [B, h, w].

        Returns tokens [B, S, C] and the padding mask [B, S] (True for labels absent from an image)."""
        batch, height, width, channels = features.shape
        # mean(features) + mean(positions) == mean(features + positions): one segment mean over C channels.
        cells = (features + positions).reshape(batch, height * width, channels)
        tokens, counts = segment_mean(cells, labels.reshape(batch, height * width), num_segments)
        return tokens, counts <= 0.5

    def forward(self, pixel_values, superpixels):
        """Returns embeddings [B, 1 + S, C] (CLS first), the padding mask [B, S] and the ConvStem grid."""
        stem = self.patch_embeddings(pixel_values)  # [B, h, w, C]
        batch, height, width, _ = stem.shape
        grid_labels = resize_labels_nearest(superpixels, (height, width))
        num_segments = max(int(grid_labels.max()) + 1, self.config.num_clusters[0])
        tokens, padding_mask = self.segment_tokens(stem, self.position_grid(height, width), grid_labels, num_segments)
        cls_token = (self.cls_token + self.cls_position()).expand(batch, -1, -1)
        embeddings = self.dropout(torch.cat([cls_token, tokens], dim=1))
        return embeddings, padding_mask, stem


class CastDropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states):
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep)
        return hidden_states * mask / keep


class CastMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        intermediate = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, intermediate)
        self.fc2 = nn.Linear(intermediate, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(hidden_states)))))


class CastLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block (timm `Block`)."""

    def __init__(self, config, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CastSelfAttention(config, num_heads=config.num_attention_heads)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CastMLP(config)
        self.drop_path = CastDropPath(drop_path)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attn_output, attn_weights = self.attn(self.norm1(hidden_states), attention_mask, output_attentions)
        hidden_states = hidden_states + self.drop_path(attn_output)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, attn_weights


class CastLevel(nn.Module):
    """One level: transformer blocks over [CLS, segment tokens], then graph pooling of the segment tokens."""

    def __init__(self, config, level, drop_path_rates):
        super().__init__()
        self.blocks = nn.ModuleList([CastLayer(config, rate) for rate in drop_path_rates])
        self.pooling = GraphPooling(config, config.num_clusters[level])


class CastPreTrainedModel(PreTrainedModel):
    config_class = CastConfig
    config: CastConfig
    base_model_prefix = "cast"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CastEmbeddings", "CastLayer", "GraphPooling"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module):
        """The original MoCo-v3 / CAST initialisation (xavier-uniform Linear, Q/K/V treated separately)."""
        if isinstance(module, nn.Linear):
            if getattr(module, "is_fused_qkv", False):
                bound = math.sqrt(6.0 / float(module.weight.shape[0] // 3 + module.weight.shape[1]))
                init.uniform_(module.weight, -bound, bound)
            else:
                init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, CastEmbeddings):
            init.normal_(module.cls_token, std=1e-6)
            if self.config.position_embedding_type == "learned":
                init.trunc_normal_(module.position_embeddings, std=self.config.initializer_range)
            else:
                init.copy_(
                    module.position_embeddings,
                    sincos_position_grid(module.grid_size, module.grid_size, self.config.hidden_size),
                )
        elif isinstance(module, GraphPooling):
            init.normal_(module.centroid_fc.bias, std=1e-2)
        else:
            super()._init_weights(module)

    def _validate_inputs(self, pixel_values, superpixels):
        if pixel_values is None or superpixels is None:
            raise ValueError("CAST needs both `pixel_values` [B, 3, H, W] and `superpixels` [B, H, W].")
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"`pixel_values` must be a 4-D tensor [B, C, H, W], got {shape}.")
        if not pixel_values.is_floating_point():
            raise ValueError(f"`pixel_values` must be a float tensor, got {pixel_values.dtype}.")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` has {pixel_values.shape[1]} channels at dim 1, the model expects "
                f"{self.config.num_channels} (channels-first [B, C, H, W])."
            )
        height, width = pixel_values.shape[-2:]
        patch = self.config.patch_size
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(f"Image size {height}x{width} must be a positive multiple of the patch size {patch}.")
        if not torch.is_tensor(superpixels):
            raise ValueError(f"`superpixels` must be an integer tensor [B, H, W], got {type(superpixels).__name__}.")
        if superpixels.is_floating_point() or superpixels.dtype == torch.bool or superpixels.is_complex():
            raise ValueError(f"`superpixels` must hold integer labels, got dtype {superpixels.dtype}.")
        if tuple(superpixels.shape) != (pixel_values.shape[0], height, width):
            raise ValueError(
                f"`superpixels` shape {tuple(superpixels.shape)} does not match the images: expected "
                f"{(pixel_values.shape[0], height, width)} (one label map per image, same height and width)."
            )
        if superpixels.numel() and int(superpixels.min()) < 0:
            raise ValueError("`superpixels` labels must be non-negative (0..S-1).")
        if superpixels.numel() and int(superpixels.max()) >= height * width:
            raise ValueError(
                f"`superpixels` has label {int(superpixels.max())} but only {height * width} pixels: label ids are "
                "token indices; make them consecutive with `hf_hierseg.segment_ops.relabel_consecutive`."
            )


class CastModel(CastPreTrainedModel):
    # Heads saved beside the backbone (classifier, MoCo projector / predictor) are not part of it.
    _keys_to_ignore_on_load_unexpected = [r"^classifier\.", r"^projector\.", r"^predictor\.", r"^fusion\."]

    def __init__(self, config: CastConfig, add_final_norm: bool = True):
        super().__init__(config)
        self.config = config
        self.embeddings = CastEmbeddings(config)
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        bounds = [sum(config.depths[:level]) for level in range(len(config.depths) + 1)]
        self.levels = nn.ModuleList(
            [CastLevel(config, level, rates[bounds[level] : bounds[level + 1]]) for level in range(len(config.depths))]
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if add_final_norm else None
        self.post_init()
        if config.freeze_last_pooling:
            self.levels[-1].pooling.requires_grad_(False)

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        superpixels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        self._validate_inputs(pixel_values, superpixels)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict

        hidden_states, padding_mask, _ = self.embeddings(pixel_values, superpixels)
        encoded = self.encode(hidden_states, padding_mask, output_attentions, output_hidden_states)

        final = encoded["level_hidden_states"][-1]
        if self.layernorm is not None:
            final = self.layernorm(final)
        output = CastModelOutput(last_hidden_state=final, pooler_output=final[:, 0], **encoded)
        return output if return_dict else output.to_tuple()

    def encode(self, hidden_states, padding_mask, output_attentions=False, output_hidden_states=False):
        """Run the 4 levels on embeddings [B, 1 + N_1, C]; returns the CastModelOutput fields as a dict."""
        mask_padding = self.config.mask_padding_tokens
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        level_hidden_states, pooled_hidden_states, logits, sampled, masks = [], [], [], [], []
        for level in self.levels:
            attention_mask = padding_attention_mask(padding_mask, hidden_states.dtype, 1) if mask_padding else None
            for block in level.blocks:
                hidden_states, attn_weights = block(hidden_states, attention_mask, output_attentions)
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
                if output_attentions:
                    all_attentions += (attn_weights,)
            pooled = level.pooling(hidden_states[:, :1], hidden_states[:, 1:], padding_mask)
            level_hidden_states.append(hidden_states)
            masks.append(padding_mask)
            logits.append(pooled.assignment_logits)
            sampled.append(pooled.sampled_indices)
            hidden_states = torch.cat([pooled.cls_token, pooled.pooled_tokens], dim=1)
            pooled_hidden_states.append(hidden_states)
            padding_mask = torch.zeros(hidden_states.shape[0], hidden_states.shape[1] - 1, dtype=torch.bool,
                                       device=hidden_states.device)
        return dict(
            level_hidden_states=tuple(level_hidden_states),
            pooled_hidden_states=tuple(pooled_hidden_states),
            assignment_logits=tuple(logits),
            sampled_indices=tuple(sampled),
            padding_masks=tuple(masks),
            hierarchy=compose_hierarchy(parents_from_logits(logits)),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class CastForImageClassification(CastPreTrainedModel):
    def __init__(self, config: CastConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cast = CastModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        superpixels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.cast(
            pixel_values,
            superpixels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = CastImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            pooler_output=outputs.pooler_output,
            assignment_logits=outputs.assignment_logits,
            padding_masks=outputs.padding_masks,
            hierarchy=outputs.hierarchy,
        )
        return output if return_dict else output.to_tuple()


def moco_mlp(num_layers, input_dim, hidden_dim, output_dim):
    """MoCo-v3 MLP: (Linear without bias, BatchNorm, ReLU) x (num_layers - 1), Linear, BatchNorm(affine=False)."""
    layers = []
    for index in range(num_layers):
        in_dim = input_dim if index == 0 else hidden_dim
        out_dim = output_dim if index == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(in_dim, out_dim, bias=False))
        if index < num_layers - 1:
            layers += [nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True)]
        else:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


@dataclass
class CastSelfSupervisedOutput(ModelOutput):
    """Outputs of [`CastForSelfSupervisedPretraining`]: projector output `projections` [B, D], predictor output
    `predictions` [B, D] and the backbone's `pooler_output` and hierarchy."""

    loss: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    assignment_logits: tuple[torch.FloatTensor, ...] | None = None
    hierarchy: tuple[torch.LongTensor, ...] | None = None


class CastForSelfSupervisedPretraining(CastPreTrainedModel):
    """CAST backbone with the MoCo-v3 projector (3-layer MLP) and predictor (2-layer MLP) of the base branch.

    The momentum branch and the contrastive loss live in `hf_hierseg.training.moco`."""

    def __init__(self, config: CastConfig):
        super().__init__(config)
        self.cast = CastModel(config)
        hidden, dim = config.projection_hidden_dim, config.projection_dim
        self.projector = moco_mlp(3, config.hidden_size, hidden, dim)
        self.predictor = moco_mlp(2, dim, hidden, dim)
        self.post_init()

    def forward(self, pixel_values=None, superpixels=None, return_dict=None, **kwargs):
        outputs = self.cast(pixel_values, superpixels, return_dict=True)
        projections = self.projector(outputs.pooler_output)
        predictions = self.predictor(projections)
        output = CastSelfSupervisedOutput(
            projections=projections,
            predictions=predictions,
            pooler_output=outputs.pooler_output,
            assignment_logits=outputs.assignment_logits,
            hierarchy=outputs.hierarchy,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "CastPreTrainedModel",
    "CastModel",
    "CastForImageClassification",
    "CastForSelfSupervisedPretraining",
    "CastModelOutput",
]
