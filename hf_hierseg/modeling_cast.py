"""PyTorch CAST: a ViT over superpixel segments with graph pooling between levels (Ke, Mo & Yu, ICLR 2024).

Read top to bottom: the outputs (one shared base for the hierarchy), the embeddings (ConvStem, segment pooling), the
levels (ViT blocks, then graph pooling) and the encoder over them, then the models built from these modules by
constructor switches: `CastModel`, the classification, self-supervised and segmentation heads, and `CastBackbone`.
"""

import contextlib
import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import CastSelfAttention, padding_attention_mask
from .configuration_cast import (
    DEFAULT_MAX_ATTENTION_MEMORY,
    LEVEL_NAMES,
    NUM_LEVELS,
    STAGE_NAMES,
    CastConfig,
    backbone_config,
)
from .graph_pooling import GraphPooling
from .hierarchy import compose_hierarchy, paint_hierarchy, paint_segments, parents_from_logits
from .segment_ops import is_capturing_graph, resize_labels_nearest, segment_mean, unused_label_counts
from .superpixels import grid_superpixels, scaled_num_superpixels


logger = logging.get_logger(__name__)

# Dropout between the fused BatchNorm and the projection (hard-coded in the original BlockFusion).
FUSION_DROPOUT = 0.2
SEGMENTATION_HEAD_TYPES = ("linear", "mlp_projector")


# --- outputs ------------------------------------------------------------------------------------------------------


@dataclass
class CastHierarchyOutput(ModelOutput):
    """
    The part-to-whole hierarchy every CAST model returns. N_l is the number of tokens entering level l (N_1 = the
    superpixel label count, at least `num_clusters[0]`, then N_{l+1} = K_l); C the width.

    Args:
        level_hidden_states (4 x `[B, 1 + N_l, C]`): tokens after each level's blocks, CLS first.
        pooled_hidden_states (4 x `[B, 1 + K_l, C]`): pooled CLS and cluster tokens after each graph pooling.
        assignment_logits (4 x `[B, N_l, K_l]`): token-to-cluster logits of each graph pooling.
        sampled_indices (4 x int64 `[B, K_l]`): the tokens farthest point sampling picked as cluster seeds.
        padding_masks (4 x bool `[B, N_l]`): True where a level-1 token is a label absent from that image.
        hierarchy (4 x int64 `[B, N_1]`): the group, at levels 1..4, of every level-1 segment (superpixel id).
    """

    level_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooled_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    assignment_logits: tuple[torch.FloatTensor, ...] | None = None
    sampled_indices: tuple[torch.LongTensor, ...] | None = None
    padding_masks: tuple[torch.BoolTensor, ...] | None = None
    hierarchy: tuple[torch.LongTensor, ...] | None = None

    # Stride at which the model sampled the superpixel map into level-1 tokens: the ConvStem's 8, or 1 where the
    # segments are pooled at full resolution (the segmentation stage). Not a field: it never enters `to_tuple()`.
    segment_stride: ClassVar[int] = 8

    def hierarchy_maps(self, superpixels, patch_size=None):
        """Pixel label maps [B, H, W] for levels 0 (superpixels, as the model saw them) to 4; see
        `hierarchy.paint_hierarchy`. `patch_size` defaults to the stride the model sampled the superpixels at (8, or
        1 for segments pooled at full resolution, where level 0 is the superpixel map itself)."""
        stride = self.segment_stride if patch_size is None else patch_size
        return paint_hierarchy(self.hierarchy, superpixels, patch_size=stride)

    def hierarchy_fields(self):
        """The fields declared here, by name: what every head copies from its backbone's output."""
        return {name: getattr(self, name) for name in HIERARCHY_FIELDS}


# The field names of `CastHierarchyOutput`, read once (torch.compile cannot trace `dataclasses.fields`).
HIERARCHY_FIELDS = tuple(field.name for field in fields(CastHierarchyOutput))


@dataclass
class CastModelOutput(CastHierarchyOutput, BaseModelOutputWithPooling):
    """
    Outputs of [`CastModel`]: [`BaseModelOutputWithPooling`] plus the hierarchy of [`CastHierarchyOutput`].

    Args:
        last_hidden_state (`[B, 1 + N_4, C]`): final-normed tokens of the last level (CLS first); without the final
            norm (segmentation stage) the last level's tokens as they are.
        pooler_output (`[B, C]`): the CLS token of `last_hidden_state`, the image embedding (the original `out4`).
        hidden_states, attentions: per ViT block, on request, as in transformers (`hidden_states[0]` is the
            embedding output; graph pooling's centroid attention is not among `attentions`).
    """


@dataclass
class CastImageClassifierOutput(CastHierarchyOutput, ImageClassifierOutput):
    """[`ImageClassifierOutput`] plus the backbone's `pooler_output` and hierarchy ([`CastHierarchyOutput`])."""

    pooler_output: torch.FloatTensor | None = None


@dataclass
class CastSelfSupervisedOutput(CastHierarchyOutput):
    """Outputs of [`CastForSelfSupervisedPretraining`]: projector output `projections` [B, D], predictor output
    `predictions` [B, D], the backbone's `pooler_output`, hierarchy ([`CastHierarchyOutput`]) and, on request,
    `hidden_states` / `attentions`."""

    loss: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CastSemanticSegmenterOutput(CastHierarchyOutput, SemanticSegmenterOutput):
    """
    Outputs of [`CastForSemanticSegmentation`]. N_1 is the number of superpixel tokens (max label + 1, at least
    `num_clusters[0]`); segments are pooled at full resolution, so every superpixel has its own token.

    Args:
        loss (`[]`, *optional*): pixel-wise cross-entropy (`ignore_index` pixels left out) when `labels` are given.
        logits (`[B, num_labels, H, W]`): `segment_logits` painted to the pixels of each superpixel.
        segment_logits (`[B, N_1, num_labels]`): one prediction per superpixel (the original per-token `head`).
        fused_hidden_states (`[B, 1 + N_1, C]`): BlockFusion output, fused CLS first; its tokens feed the head.
        level_hidden_states, pooled_hidden_states, assignment_logits, sampled_indices, padding_masks, hierarchy:
            as in [`CastHierarchyOutput`].
    """

    segment_logits: torch.FloatTensor | None = None
    fused_hidden_states: torch.FloatTensor | None = None

    segment_stride: ClassVar[int] = 1


# --- embeddings ---------------------------------------------------------------------------------------------------


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


@dataclass
class FoldedConvolutions:
    """Conv weights with their eval-mode BatchNorm folded in, and what they were computed from."""

    signature: tuple  # (data_ptr, _version, dtype, device) of every source tensor
    sources: tuple  # aliases of the source tensors: they keep the storage alive, so no data_ptr is reused
    weights: tuple  # per 3x3 conv: [out, in, 3, 3]
    biases: tuple  # per 3x3 conv: [out]


class CastConvStem(nn.Module):
    """4 x (3x3 conv without bias, BatchNorm, ReLU) with strides 2, 2, 2, 1 and widths C/8..C, then a 1x1 conv.
    Output channels-last [B, H/8, W/8, C].

    `forward` is `project(convolutions(pixel_values))`: the 3x3 stages, then the final 1x1 convolution as a Linear over
    channels (1.5x faster on CPU at batch 32). Being linear, the projection commutes with any average over grid
    cells, so `CastEmbeddings` projects the segment means instead of every cell.

    Two paths compute the 3x3 stages, both on channels-last activations:
    - while any BatchNorm is in training mode, the Sequential's conv, BatchNorm and ReLU modules run as they are;
    - in eval mode each BatchNorm is folded into its convolution. Without gradients the folded weights are computed
      once and cached; the cache is dropped by `train()` / `eval()` and rebuilt whenever a weight or BatchNorm
      statistic changed (in-place updates such as optimizer steps and `load_state_dict` bump the tensors'
      `_version`, `.to()` / `load_state_dict(assign=True)` change their storage). With gradients (or while
      compiling / tracing) the folding is computed in the graph each call, so gradients reach the conv and BatchNorm
      parameters. Writes through `.data` are invisible to autograd's version counters: call `train()` / `eval()`
      after them.
    """

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
        self._folded = None

    def conv_norm_activations(self):
        """The (conv, BatchNorm, ReLU) triples of `self.proj`, without the final 1x1 conv."""
        layers = list(self.proj)
        return list(zip(layers[0:-1:3], layers[1:-1:3], layers[2:-1:3]))

    def train(self, mode=True):
        self._folded = None
        return super().train(mode)

    def fold_batch_norms(self):
        """Per 3x3 conv: weight and bias with the eval-mode BatchNorm folded in (differentiable)."""
        weights, biases = [], []
        for conv, norm, _ in self.conv_norm_activations():
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            weights.append(conv.weight * scale.view(-1, 1, 1, 1))
            biases.append(norm.bias - norm.running_mean * scale)
        return tuple(weights), tuple(biases)

    def folding_sources(self):
        tensors = []
        for conv, norm, _ in self.conv_norm_activations():
            tensors += [conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var]
        return tensors

    def folded_batch_norms(self):
        """`fold_batch_norms()`, from the cache when it is still valid and no gradient or graph capture needs it."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.fold_batch_norms()
        sources = self.folding_sources()
        if any(torch.is_inference(tensor) for tensor in sources):  # no version counter to check against
            return self.fold_batch_norms()
        signature = tuple((tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device) for tensor in sources)
        if self._folded is None or self._folded.signature != signature:
            weights, biases = self.fold_batch_norms()
            self._folded = FoldedConvolutions(signature, tuple(t.detach() for t in sources), weights, biases)
        return self._folded.weights, self._folded.biases

    def convolutions(self, pixel_values):
        """The four 3x3 conv, BatchNorm, ReLU stages: features [B, H / 8, W / 8, C] (channels-last), before the final
        1x1 projection."""
        hidden = pixel_values
        if not is_capturing_graph():  # eager CPU convolutions run faster channels-last; a compiler picks its layouts
            hidden = hidden.contiguous(memory_format=torch.channels_last)
        layers = self.conv_norm_activations()
        if any(norm.training for _, norm, _ in layers):
            for conv, norm, activation in layers:
                hidden = activation(norm(conv(hidden)))
        else:
            weights, biases = self.folded_batch_norms()
            for (conv, _, activation), weight, bias in zip(layers, weights, biases):
                hidden = activation(F.conv2d(hidden, weight, bias, conv.stride, conv.padding))
        return hidden.permute(0, 2, 3, 1)

    def project(self, features):
        """The final 1x1 convolution on channels-last `features` [..., C]."""
        final = self.proj[-1]
        return F.linear(features, final.weight.flatten(1), final.bias)

    def forward(self, pixel_values):
        return self.project(self.convolutions(pixel_values))  # [B, H / 8, W / 8, C]


class CastEmbeddings(nn.Module):
    """ConvStem features and position embeddings averaged per superpixel, plus a CLS token.

    By default (CAST's pre-training and classification models) the superpixel map is sampled on the ConvStem's
    stride-8 grid (the top-left pixel of each 8x8 cell), so a superpixel that no cell samples becomes a padding token.
    With `pool_at_full_resolution=True` (the segmentation stage of the original `cast_seg.py`) the map is not
    downsampled: the ConvStem features are upsampled to its size (bilinear) and the position grid too (bicubic),
    and both are averaged per superpixel at full resolution, so no superpixel is lost.
    """

    def __init__(self, config, pool_at_full_resolution=False):
        super().__init__()
        self.config = config
        self.pool_at_full_resolution = pool_at_full_resolution
        self.grid_size = config.image_size // config.patch_size
        num_cells = self.grid_size**2
        self.patch_embeddings = CastConvStem(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.position_embedding_type == "learned":
            # Slot 0 is the CLS position.
            self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + num_cells, config.hidden_size))
        else:
            # Non-persistent, in the dtype the model is built in (`from_pretrained(..., dtype=...)`); `.to()` moves it.
            grid = sincos_position_grid(self.grid_size, self.grid_size, config.hidden_size)
            self.register_buffer("position_embeddings", grid.to(torch.get_default_dtype()), persistent=False)
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

    def pooling_grid(self, stem_features, superpixels):
        """The label map the segments are pooled over and the ConvStem features [B, h, w, C] on its grid: int64
        [B, h, w] and [B, h, w, C], with (h, w) the ConvStem grid, or the image size when pooling at full resolution
        (bilinear weights sum to 1, so upsampling also commutes with the stem's 1x1 projection)."""
        if not self.pool_at_full_resolution:
            return resize_labels_nearest(superpixels, stem_features.shape[1:3]), stem_features
        labels = superpixels.long()
        features = F.interpolate(
            stem_features.permute(0, 3, 1, 2), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        return labels, features.permute(0, 2, 3, 1)

    def segment_tokens(self, features, positions, labels, num_segments):
        """ConvStem features and positions [1, h, w, C] averaged over the cells of each label in [B, h, w], where
        `features` [B, h, w, C] are the stem's convolutions before its 1x1 projection.

        The token is mean(project(features)) + mean(positions) = project(mean(features)) + mean(positions), and zero
        for labels absent from an image (as in the original): the projection runs on S tokens instead of h * w
        cells. Returns tokens [B, S, C] and the padding mask [B, S] (True for labels absent from an image)."""
        batch, height, width, channels = features.shape
        labels = labels.reshape(batch, height * width)
        feature_means, counts = segment_mean(features.reshape(batch, height * width, channels), labels, num_segments)
        # A second mean for the positions: one mean over both, concatenated, copies every cell (slower on the CPU).
        cell_positions = positions.reshape(1, height * width, -1).expand(batch, -1, -1)
        position_means, _ = segment_mean(cell_positions, labels, num_segments)
        padding_mask = counts <= 0.5  # [B, S]
        projected = self.patch_embeddings.project(feature_means).masked_fill(padding_mask.unsqueeze(-1), 0)
        return projected + position_means, padding_mask

    def num_segments(self, labels):
        """The level-1 token count S: `config.num_segment_tokens` when set (static), else (largest label over the
        batch) + 1, at least `num_clusters[0]` (read from the data: a host synchronisation)."""
        if self.config.has_static_segment_tokens:
            return self.config.num_segment_tokens
        return max(int(labels.max()) + 1, self.config.num_clusters[0])

    def forward(self, pixel_values, superpixels):
        """Returns embeddings [B, 1 + S, C] (CLS first), the padding mask [B, S] and the ConvStem's convolution
        features [B, h, w, C] before its 1x1 projection (`patch_embeddings.project` turns them into the stem's
        output). Token k is superpixel id k; S is `num_segments(...)`."""
        # Inputs of another float dtype follow the weights' (as DINOv2's embeddings do).
        stem_features = self.patch_embeddings.convolutions(pixel_values.to(self.cls_token.dtype))  # [B, H/8, W/8, C]
        labels, features = self.pooling_grid(stem_features, superpixels)
        num_segments = self.num_segments(labels)
        positions = self.position_grid(*labels.shape[-2:]).to(features.dtype)
        tokens, padding_mask = self.segment_tokens(features, positions, labels, num_segments)
        cls_token = (self.cls_token + self.cls_position()).expand(stem_features.shape[0], -1, -1)
        embeddings = self.dropout(torch.cat([cls_token, tokens], dim=1))
        return embeddings, padding_mask, stem_features


# --- levels -------------------------------------------------------------------------------------------------------


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

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn_output, _ = self.attn(self.norm1(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.drop_path(attn_output)
        return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))


class CastLevel(nn.Module):
    """One level: transformer blocks over [CLS, segment tokens], then graph pooling of the segment tokens."""

    def __init__(self, config, level, drop_path_rates):
        super().__init__()
        self.mask_padding = config.mask_padding_tokens
        self.blocks = nn.ModuleList([CastLayer(config, rate) for rate in drop_path_rates])
        self.pooling = GraphPooling(config, config.num_clusters[level])

    def forward(self, hidden_states, padding_mask, **kwargs):
        """hidden_states [B, 1 + N, C] (CLS first), padding_mask bool [B, N]. Returns the tokens after the blocks
        [B, 1 + N, C] and the `GraphPoolingOutput` (K clusters)."""
        attention_mask = padding_attention_mask(padding_mask, hidden_states.dtype, 1) if self.mask_padding else None
        for block in self.blocks:
            hidden_states = block(hidden_states, attention_mask, **kwargs)
        return hidden_states, self.pooling(hidden_states[:, :1], hidden_states[:, 1:], padding_mask)


class CastEncoder(nn.ModuleList):
    """The 4 levels (a ModuleList, so weights stay `levels.<l>.*`) and their forward: each level's pooled CLS and
    cluster tokens are the next level's input. With `config.freeze_last_pooling` the 4th graph pooling is frozen
    (as in the original cast.py / cast_deit.py; it does not affect the embedding)."""

    def __init__(self, config):
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        bounds = [sum(config.depths[:level]) for level in range(NUM_LEVELS + 1)]
        super().__init__(
            [CastLevel(config, level, rates[bounds[level] : bounds[level + 1]]) for level in range(NUM_LEVELS)]
        )
        if config.freeze_last_pooling:
            self[-1].pooling.requires_grad_(False)
        self.static_segment_tokens = config.has_static_segment_tokens

    def __getitem__(self, index):
        if isinstance(index, slice):  # nn.ModuleList would rebuild the class from a list of levels
            return nn.ModuleList(list(self._modules.values())[index])
        return super().__getitem__(index)

    def forward(self, hidden_states, padding_mask, **kwargs) -> CastHierarchyOutput:
        """hidden_states [B, 1 + N_1, C] (CLS first), padding_mask bool [B, N_1]. Only level 1 can hold padding: the
        levels after it get no mask. With a static token budget the level-1 mask is always applied; otherwise it is
        dropped when nothing is padded (one host synchronisation, as the dynamic token count already needs)."""
        batch, device = padding_mask.shape[0], padding_mask.device
        tokens_after_level_1 = [level.pooling.num_clusters for level in self][:-1]
        masks = [padding_mask] + [torch.zeros(batch, k, dtype=torch.bool, device=device) for k in tokens_after_level_1]
        level_hidden_states, pooled_hidden_states, logits, sampled = [], [], [], []
        if not self.static_segment_tokens and not bool(padding_mask.any()):
            padding_mask = None
        for level in self:
            hidden_states, pooled = level(hidden_states, padding_mask, **kwargs)
            level_hidden_states.append(hidden_states)
            logits.append(pooled.assignment_logits)
            sampled.append(pooled.sampled_indices)
            hidden_states = torch.cat([pooled.cls_token, pooled.pooled_tokens], dim=1)  # [B, 1 + K, C]
            pooled_hidden_states.append(hidden_states)
            padding_mask = None
        return CastHierarchyOutput(
            level_hidden_states=tuple(level_hidden_states),
            pooled_hidden_states=tuple(pooled_hidden_states),
            assignment_logits=tuple(logits),
            sampled_indices=tuple(sampled),
            padding_masks=tuple(masks),
            hierarchy=compose_hierarchy(parents_from_logits(logits)),
        )


# --- models -------------------------------------------------------------------------------------------------------


def check_attention_memory(config, pixel_values, superpixels, pool_at_full_resolution=False):
    """Refuse, before anything is allocated, a batch whose forward would need more memory than
    `config.max_attention_memory` bytes (default `DEFAULT_MAX_ATTENTION_MEMORY`, 16 GiB; None disables the check).

    The cost model: one token per superpixel id (N = the largest id the model samples + 1), so N grows with the image
    area; every ViT block holds a [B, heads, 1 + N, 1 + N] attention map, so memory (and time) grow with N^2. Pooling
    segments at full resolution also holds the ConvStem features upsampled to [B, H, W, C]. With a static token budget
    (`config.num_segment_tokens`) N is that budget and no tensor value is read. Eager code only: skipped while
    compiling, exporting or tracing (the shapes are fixed there)."""
    limit = getattr(config, "max_attention_memory", DEFAULT_MAX_ATTENTION_MEMORY)
    if limit is None or is_capturing_graph():
        return
    batch, _, height, width = pixel_values.shape
    stride = 1 if pool_at_full_resolution else config.patch_size
    if getattr(config, "num_segment_tokens", None) is not None:
        num_tokens = config.num_segment_tokens
    else:
        num_tokens = max(int(superpixels[:, ::stride, ::stride].max()) + 1, config.num_clusters[0])
    element = pixel_values.element_size()
    heads = config.num_attention_heads
    attention = batch * heads * (1 + num_tokens) ** 2 * element
    pooling = batch * height * width * config.hidden_size * element if pool_at_full_resolution else 0
    if max(attention, pooling) <= limit:
        return
    if attention >= pooling:
        need = (
            f"{_format_bytes(attention)} per attention map (batch {batch} x {heads} heads x {1 + num_tokens:,}^2 "
            f"tokens x {element} bytes)"
        )
    else:
        need = (
            f"{_format_bytes(pooling)} for the features pooled at full resolution (batch {batch} x {height}x{width} "
            f"pixels x {config.hidden_size} channels x {element} bytes)"
        )
    raise ValueError(
        f"This batch would need about {need}, more than config.max_attention_memory = {_format_bytes(limit)}. CAST "
        f"makes one token per superpixel ({num_tokens:,} here, for {height}x{width}-pixel images): the count grows with "
        "the image area and attention memory with its square. Resize the images (CastImageProcessor with "
        "do_resize=True, or a smaller `size`), request fewer superpixels (num_superpixels), pass fewer images per "
        "batch, or raise config.max_attention_memory (None disables this check)."
    )


@contextlib.contextmanager
def dynamic_batch_compilation(*inputs):
    """Compile a CAST model once for every batch size: marks dim 0 of `inputs` (e.g. `pixel_values` and
    `superpixels`) as an unbacked size, one the graph may not specialise on (a plain dynamic size is specialised at
    0 and 1, and the convolutions' backend choice guards on a range of batch sizes: both recompile). Call it before
    the first call of the compiled model (the one that compiles); later calls of any batch size reuse the graph.
    Inductor compiles it with its layout optimisation off (see below). Needs a static token budget (`CastConfig.num_segment_tokens`) so that no other size follows the data::

        compiled = torch.compile(model, fullgraph=True)
        with dynamic_batch_compilation(pixel_values, superpixels):
            compiled(pixel_values, superpixels)
    """
    from torch._inductor import config as inductor_config

    for tensor in inputs:
        torch._dynamo.decorators.mark_unbacked(tensor, 0)
    # Inductor's layout optimisation turns the convolutions channels-last in the graph but, with an unbacked batch
    # size, not the tensors given at run time (torch 2.13: "expected ... stride" from the convolution).
    with inductor_config.patch(layout_optimization=False):
        yield


def _format_bytes(count):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


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
    _input_embed_layer = "patch_embeddings"
    # hidden_states: the embedding output, then every ViT block's output. attentions: the ViT blocks' only; graph
    # pooling's centroid attention is a `CastSelfAttention` too, outside `blocks` (`layer_name` tells them apart).
    _can_record_outputs = {
        "hidden_states": [
            OutputRecorder(CastEmbeddings, index=0, capture_initial_hidden_state=False),
            OutputRecorder(CastLayer, index=0, capture_initial_hidden_state=False),
        ],
        "attentions": OutputRecorder(CastSelfAttention, index=1, layer_name="blocks"),
    }

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

    def set_num_segment_tokens(self, num_segment_tokens):
        """Switch this model, in place, to a static token budget of `num_segment_tokens` level-1 tokens (None: back
        to the dynamic count; padding then stays masked). Sets `config.num_segment_tokens` and
        `config.mask_padding_tokens=True`, which the modules read at construction, so they are updated too; saving
        the model keeps the budget. Returns the model. Pair it with a processor that caps its labels
        (`hf_hierseg.loading.static_model_and_processor` does both)."""
        if num_segment_tokens is not None and int(num_segment_tokens) < self.config.num_clusters[0]:
            raise ValueError(
                f"`num_segment_tokens` ({num_segment_tokens}) must be at least `num_clusters[0]` "
                f"({self.config.num_clusters[0]})."
            )
        self.config.num_segment_tokens = None if num_segment_tokens is None else int(num_segment_tokens)
        self.config.mask_padding_tokens = True
        for module in self.modules():
            if isinstance(module, (CastLevel, GraphPooling)):
                module.mask_padding = True
            elif isinstance(module, CastEncoder):
                module.static_segment_tokens = self.config.has_static_segment_tokens
        return self

    def _validate_inputs(self, pixel_values, superpixels):
        if pixel_values is None or superpixels is None:
            raise ValueError("CAST needs both `pixel_values` [B, 3, H, W] and `superpixels` [B, H, W].")
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"`pixel_values` must be a 4-D tensor [B, C, H, W], got {shape}.")
        if not pixel_values.is_floating_point():
            raise ValueError(f"`pixel_values` must be a float tensor, got {pixel_values.dtype}.")
        capturing = is_capturing_graph()
        if not capturing and pixel_values.shape[0] == 0:  # (a batch size compiled as unbacked has no value to test)
            raise ValueError("`pixel_values` is an empty batch (0 images): pass at least one image.")
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
        if capturing:  # the shapes are checked as symbols (batch sizes may be unbacked), the values eagerly only
            torch._check(superpixels.dim() == 3 and tuple(superpixels.shape[1:]) == (height, width))
            torch._check(superpixels.shape[0] == pixel_values.shape[0])
            torch._check(pixel_values.shape[0] >= 1)
            return
        if tuple(superpixels.shape) != (pixel_values.shape[0], height, width):
            raise ValueError(
                f"`superpixels` shape {tuple(superpixels.shape)} does not match the images: expected "
                f"{(pixel_values.shape[0], height, width)} (one label map per image, same height and width)."
            )
        if self.config.has_static_segment_tokens:
            self._validate_static_labels(superpixels)
            return
        if superpixels.numel() and int(superpixels.min()) < 0:
            raise ValueError("`superpixels` labels must be non-negative (0..S-1).")
        if superpixels.numel() and int(superpixels.max()) >= height * width:
            raise ValueError(
                f"`superpixels` has label {int(superpixels.max())} but only {height * width} pixels: label ids are "
                "token indices; make them consecutive with `hf_hierseg.segment_ops.relabel_consecutive`."
            )
        if superpixels.numel() and bool(unused_label_counts(superpixels).any()):
            logger.warning_once(
                "`superpixels` ids are not consecutive: an image leaves ids below its largest id unused. CAST makes "
                "one token per id up to the largest id in the batch, so every unused id is a padding token: more "
                "tokens and compute, and (unless `mask_padding_tokens=True`) other tokens attend to them. Relabel "
                "each map with `hf_hierseg.segment_ops.relabel_consecutive` (CastImageProcessor does) so the token "
                "count follows the segment count."
            )

    def _validate_static_labels(self, superpixels):
        """With a static token budget N, labels are token indices 0..N-1: one host synchronisation checks them all."""
        budget = self.config.num_segment_tokens
        if superpixels.numel() and bool(((superpixels < 0) | (superpixels >= budget)).any()):
            low, high = int(superpixels.min()), int(superpixels.max())
            raise ValueError(
                f"`superpixels` holds labels in [{low}, {high}], but the model has a static budget of "
                f"config.num_segment_tokens = {budget} level-1 tokens: labels must lie in 0..{budget - 1}. Use an "
                f"image processor that returns at most {budget} superpixels (`CastImageProcessor("
                f"num_segment_tokens={budget})`, see `hf_hierseg.loading.static_model_and_processor`), relabel the maps with "
                "`hf_hierseg.segment_ops.relabel_consecutive`, or build the model with a larger num_segment_tokens."
            )


class CastModel(CastPreTrainedModel):
    """
    CAST: ConvStem -> segment tokens (one per superpixel id) -> 4 x [ViT blocks -> graph pooling] -> final LayerNorm.

    Superpixel ids are token indices: the model makes (largest id in the batch) + 1 tokens (at least
    `num_clusters[0]`), and ids absent from an image become padding tokens, as in the original. Ids with gaps (e.g.
    100 segments numbered up to 696) are not compacted, so that `hierarchy[l][b, s]` stays the group of superpixel
    id `s`; the model warns about them once. Make them consecutive with `hf_hierseg.segment_ops.relabel_consecutive`
    (`CastImageProcessor` does).

    Args:
        config ([`CastConfig`]): the architecture.
        add_final_norm (`bool`, defaults to `True`): the final LayerNorm on the last level's tokens (`norm` of the
            original); the segmentation stage (`cast_seg.py`) has none.
        pool_segments_at_full_resolution (`bool`, defaults to `False`): average the ConvStem features per superpixel
            at the image size instead of on the stride-8 grid (the segmentation stage); see [`CastEmbeddings`].
    """

    # Heads saved beside the backbone (classifier, MoCo projector / predictor, segmentation fusion) are not part of it.
    _keys_to_ignore_on_load_unexpected = [r"^classifier\.", r"^projector\.", r"^predictor\.", r"^fusion\."]

    def __init__(
        self, config: CastConfig, add_final_norm: bool = True, pool_segments_at_full_resolution: bool = False
    ):
        super().__init__(config)
        self.config = config
        self.embeddings = CastEmbeddings(config, pool_at_full_resolution=pool_segments_at_full_resolution)
        self.levels = CastEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if add_final_norm else None
        self.post_init()

    # `hidden_states` / `attentions` are recorded by hooks (`_can_record_outputs`) when requested; the last hidden
    # state stays the last block's output (not the final-normed `last_hidden_state`), as in ViT. The hierarchy is not
    # recorded: it is the encoder's result, which the heads always need.
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor | None = None, superpixels: torch.Tensor | None = None, **kwargs
    ) -> CastModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `[B, C, H, W]`): normalised images, H and W multiples of 8.
        superpixels (`torch.LongTensor` of shape `[B, H, W]`): superpixel id per pixel (consecutive from 0).
        """
        self._validate_inputs(pixel_values, superpixels)
        check_attention_memory(self.config, pixel_values, superpixels, self.embeddings.pool_at_full_resolution)
        embeddings, padding_mask, _ = self.embeddings(pixel_values, superpixels)
        encoded = self.levels(embeddings, padding_mask, **kwargs)
        final = encoded.level_hidden_states[-1]
        if self.layernorm is not None:
            final = self.layernorm(final)
        output = CastModelOutput(last_hidden_state=final, pooler_output=final[:, 0], **encoded.hierarchy_fields())
        if self.embeddings.pool_at_full_resolution:
            output.segment_stride = 1  # an instance attribute: `hierarchy_maps` paints full-resolution segments
        return output


class CastForImageClassification(CastPreTrainedModel):
    def __init__(self, config: CastConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cast = CastModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def validate_class_labels(self, labels, batch_size):
        """Integer `labels` are class ids (single-label classification, as the loss reads them when `problem_type`
        is not set and there are several labels): `[B]` in `0..num_labels-1` (or -100, ignored), returned as int64.
        Float labels are the targets of the other problem types and are left to the loss."""
        if not torch.is_tensor(labels) or labels.dtype == torch.bool or labels.is_complex():
            kind = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
            raise TypeError(f"`labels` must be an integer tensor [B] of class ids (or float targets), got {kind}.")
        single_label = self.config.problem_type == "single_label_classification" or (
            self.config.problem_type is None and self.num_labels > 1
        )
        if labels.is_floating_point():
            if self.config.problem_type == "single_label_classification":
                raise TypeError(
                    f"`labels` must be integer class ids for single-label classification, got {labels.dtype}."
                )
            return labels
        if not single_label:
            return labels
        labels = labels.long()  # (uint8 labels compare with -100 as 156)
        if tuple(labels.shape) != (batch_size,):
            raise ValueError(
                f"`labels` must be one class id per image, shape ({batch_size},), got {tuple(labels.shape)}."
            )
        if is_capturing_graph():  # the range check reads tensor values: eager only
            return labels
        counted = labels[labels != -100]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= self.num_labels):
            raise ValueError(
                f"`labels` holds class ids in [{int(counted.min())}, {int(counted.max())}], but the model has "
                f"{self.num_labels} labels (0..{self.num_labels - 1}; -100 is ignored)."
            )
        return labels

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        superpixels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CastImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `[B]`, *optional*): class ids (or targets, per `config.problem_type`).
        """
        outputs = self.cast(pixel_values, superpixels, return_dict=True, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            labels = self.validate_class_labels(labels, logits.shape[0])
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return CastImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            pooler_output=outputs.pooler_output,
            **outputs.hierarchy_fields(),
        )


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

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, superpixels: torch.Tensor | None = None, **kwargs
    ) -> CastSelfSupervisedOutput:
        outputs = self.cast(pixel_values, superpixels, return_dict=True, **kwargs)
        projections = self.projector(outputs.pooler_output)
        predictions = self.predictor(projections)
        return CastSelfSupervisedOutput(
            projections=projections,
            predictions=predictions,
            pooler_output=outputs.pooler_output,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **outputs.hierarchy_fields(),
        )


def gather_to_segments(level_tokens, groups):
    """Copy each level-l token [B, N_l, C] to the level-1 segments it contains; `groups` int64 [B, N_1] holds the
    level-l token index of every level-1 segment. Returns [B, N_1, C]."""
    index = groups.unsqueeze(-1).expand(-1, -1, level_tokens.shape[-1])
    return torch.gather(level_tokens, 1, index)


class CastBlockFusion(nn.Module):
    """BlockFusion: the post-block tokens of levels 2..4 are gathered back to the level-1 segments (through the hard
    assignments) and concatenated with the level-1 tokens (4C); the CLS input is the concatenation of the four
    pooled CLS tokens. Then BatchNorm over the 4C channels, dropout and a linear projection to C."""

    def __init__(self, config):
        super().__init__()
        fused = NUM_LEVELS * config.hidden_size
        self.batch_norm = nn.BatchNorm1d(fused)
        self.dropout = nn.Dropout(FUSION_DROPOUT)
        self.projection = nn.Linear(fused, config.hidden_size)

    def forward(self, level_tokens, cls_tokens, hierarchy):
        """
        Args:
            level_tokens: 4 x [B, N_l, C], tokens after each level's blocks (CLS removed).
            cls_tokens: 4 x [B, 1, C], CLS tokens after each graph pooling.
            hierarchy: groups of the level-1 segments at levels 1..3 (int64 [B, N_1]), i.e. their token index among
                the tokens of levels 2..4.

        Returns:
            [B, 1 + N_1, C], fused CLS first.
        """
        segments = [level_tokens[0]] + [
            gather_to_segments(tokens, groups) for tokens, groups in zip(level_tokens[1:], hierarchy)
        ]
        fused = torch.cat([torch.cat(cls_tokens, dim=-1), torch.cat(segments, dim=-1)], dim=1)  # [B, 1 + N_1, 4C]
        # BatchNorm over the 4C channels of all B * (1 + N_1) tokens (the statistics of [B, 4C, 1 + N_1]).
        fused = self.batch_norm(fused.flatten(0, 1)).unflatten(0, fused.shape[:2])
        return self.projection(self.dropout(fused))


def segmentation_head(config):
    """`linear`: Linear(C, num_labels). `mlp_projector`: the MoCo-v3 projector MLP (C -> projection_hidden_dim ->
    projection_hidden_dim -> num_labels), the per-token head of a converted MoCo `cast_seg` checkpoint."""
    head_type = getattr(config, "segmentation_head_type", "linear")
    if head_type == "linear":
        return nn.Linear(config.hidden_size, config.num_labels)
    if head_type == "mlp_projector":
        return moco_mlp(3, config.hidden_size, config.projection_hidden_dim, config.num_labels)
    raise ValueError(f"`segmentation_head_type` must be one of {SEGMENTATION_HEAD_TYPES}, got {head_type!r}.")


def segment_cross_entropy(segment_logits, superpixels, labels, ignore_index):
    """Pixel-wise cross-entropy of the painted logits, computed per segment without painting them.

    Equal to `F.cross_entropy(logits [B, L, H, W], labels, ignore_index=...)` with
    `logits = paint_segments(segment_logits, superpixels)`: mean over the pixels whose label is not `ignore_index`.
    """
    batch, num_segments, num_labels = segment_logits.shape
    log_probs = segment_logits.float().log_softmax(dim=-1).reshape(-1)  # [B * N_1 * L]
    labels = labels.reshape(batch, -1)
    valid = labels != ignore_index
    rows = torch.arange(batch, device=labels.device).unsqueeze(1)
    # Ignored pixels read class 0 and weigh 0: no shape follows the data (every pixel ignored gives a zero loss that
    # still reaches the graph).
    flat = (rows * num_segments + superpixels.reshape(batch, -1)) * num_labels + labels.masked_fill(~valid, 0)
    pixel_log_probs = log_probs.take(flat).masked_fill(~valid, 0.0)
    return -pixel_log_probs.sum() / valid.sum().clamp(min=1)


class CastForSemanticSegmentation(CastPreTrainedModel):
    """CAST with the segmentation-stage encoder of `cast_seg.py` (a [`CastModel`] with no final LayerNorm and
    full-resolution segment pooling; the 4th pooling trainable when `freeze_last_pooling=False`), BlockFusion and a
    per-segment head.

    Extra config attributes (read with defaults): `segmentation_head_type` (`"linear"` or `"mlp_projector"`),
    `semantic_loss_ignore_index` (255).
    """

    def __init__(self, config: CastConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cast = CastModel(config, add_final_norm=False, pool_segments_at_full_resolution=True)
        self.fusion = CastBlockFusion(config)
        self.classifier = segmentation_head(config)
        self.post_init()

    @property
    def ignore_index(self):
        return getattr(self.config, "semantic_loss_ignore_index", 255)

    def validate_labels(self, labels, superpixels):
        if not torch.is_tensor(labels) or labels.is_floating_point() or labels.dtype == torch.bool:
            kind = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"`labels` must be an integer tensor [B, H, W] of class ids, got {kind}.")
        if labels.dim() == 4 and labels.shape[-1] in (3, 4):
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)}: an RGB(A) colour mask. Convert palette colours to class "
                "ids first (`hf_hierseg.image_datasets.mask_to_class_ids` with a `palette`)."
            )
        if labels.shape != superpixels.shape:
            raise ValueError(
                f"`labels` shape {tuple(labels.shape)} does not match the images and superpixels "
                f"{tuple(superpixels.shape)}: give one [H, W] class map per image at the image's size."
            )
        if is_capturing_graph():  # the range check reads tensor values: eager only
            return
        ids = labels.long()  # an int8 -1 would compare equal to the ignore index 255, a uint8 156 to -100
        valid = ids[ids != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.num_labels):
            raise ValueError(
                f"`labels` holds class ids in [{int(valid.min())}, {int(valid.max())}], but the model has "
                f"{self.num_labels} labels (0..{self.num_labels - 1}) and ignores only {self.ignore_index}."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        superpixels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CastSemanticSegmenterOutput:
        r"""
        labels (`torch.LongTensor` of shape `[B, H, W]`, *optional*): class id per pixel (`ignore_index` for
            pixels that do not count), at the size of `pixel_values`.
        """
        if labels is not None:
            self._validate_inputs(pixel_values, superpixels)
            self.validate_labels(labels, superpixels)
        outputs = self.cast(pixel_values, superpixels, return_dict=True, **kwargs)
        level_tokens = [hidden[:, 1:] for hidden in outputs.level_hidden_states]
        cls_tokens = [pooled[:, :1] for pooled in outputs.pooled_hidden_states]
        fused = self.fusion(level_tokens, cls_tokens, outputs.hierarchy[: NUM_LEVELS - 1])
        segment_logits = self.classifier_per_segment(fused[:, 1:])
        logits = paint_segments(segment_logits, superpixels).permute(0, 3, 1, 2)  # [B, num_labels, H, W]

        loss = None
        if labels is not None:
            loss = segment_cross_entropy(segment_logits, superpixels.long(), labels.long(), self.ignore_index)
        return CastSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            segment_logits=segment_logits,
            fused_hidden_states=fused,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **outputs.hierarchy_fields(),
        )

    def classifier_per_segment(self, tokens):
        """The head on every token [B, N_1, C] independently (BatchNorm in an MLP head sees B * N_1 rows)."""
        return self.classifier(tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])


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

    The backbone holds the modules of [`CastModel`] under the same names (`embeddings`, `levels`, `layernorm`), so it
    loads `CastModel` checkpoints as they are and head checkpoints (classifier, MoCo) without their `cast.` prefix.

    Dense heads that pass only `pixel_values` (UperNet, DPT, ...) get a regular grid of superpixels (196 per
    224x224 pixels); pass `superpixels` (e.g. SEEDS from `CastImageProcessor`) for CAST's own segments.
    """

    _keys_to_ignore_on_load_unexpected = [r"^classifier\.", r"^projector\.", r"^predictor\.", r"^fusion\."]

    def __init__(self, config, out_features=None, out_indices=None):
        super().__init__(backbone_config(config, out_features, out_indices))
        self.num_features = [self.config.hidden_size] * len(STAGE_NAMES)
        self.embeddings = CastEmbeddings(self.config)
        self.levels = CastEncoder(self.config)
        self.layernorm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor | None = None, superpixels: torch.Tensor | None = None, **kwargs
    ) -> BackboneOutput:
        if superpixels is None and torch.is_tensor(pixel_values) and pixel_values.dim() == 4:
            superpixels = default_superpixels(pixel_values)
        self._validate_inputs(pixel_values, superpixels)
        check_attention_memory(self.config, pixel_values, superpixels)
        embeddings, padding_mask, stem_features = self.embeddings(pixel_values, superpixels)
        encoded = self.levels(embeddings, padding_mask, **kwargs)
        grid_labels = resize_labels_nearest(superpixels, stem_features.shape[1:3])  # [B, h, w], token of each cell
        stage_maps = {}  # [B, h, w, C] each
        if "stem" in self.out_features:
            stage_maps["stem"] = self.embeddings.patch_embeddings.project(stem_features)
        cell_token = grid_labels.flatten(1)  # [B, h * w]
        for level, (name, tokens) in enumerate(zip(LEVEL_NAMES, encoded.level_hidden_states)):
            if level > 0:  # level-l tokens are the groups of level l - 1
                cell_token = torch.gather(encoded.hierarchy[level - 1], 1, grid_labels.flatten(1))
            if name in self.out_features:
                tokens = self.layernorm(tokens[:, 1:])
                index = cell_token.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
                stage_maps[name] = torch.gather(tokens, 1, index).reshape(stem_features.shape)
        feature_maps = tuple(stage_maps[name].permute(0, 3, 1, 2).contiguous() for name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps)


# --- hierarchical classification (H-CAST) -------------------------------------------------------------------------


@dataclass
class CastHierarchicalImageClassifierOutput(CastImageClassifierOutput):
    """
    Outputs of [`CastForHierarchicalImageClassification`]: [`CastImageClassifierOutput`] (whose `logits` are the
    finest level's) plus the logits of every label level.

    Args:
        loss (`[]`, *optional*): the H-CAST loss (`hierarchical_classification_loss`) when `labels` are given.
        logits (`[B, n_0]`): logits of the finest level, `logits_per_level[0]`.
        logits_per_level (L x `[B, n_k]`): logits of each label level, finest first.
    """

    logits_per_level: tuple[torch.FloatTensor, ...] | None = None


def hierarchy_targets(labels, num_labels_per_level, label_smoothing=0.0):
    """Dense targets per label level, finest first: L x float `[B, n_k]`.

    `labels` is either int64 `[B, L]` (class ids, finest first; each one-hot target smoothed as
    `one_hot * (1 - label_smoothing) + label_smoothing / n_k`), or dense targets (e.g. after Mixup / CutMix, already
    smoothed): a float `[B, sum(n_k)]` tensor of the levels' targets side by side, finest first, or a sequence of L
    float `[B, n_k]` tensors. Raises a `ValueError` naming the problem for anything else."""
    counts = tuple(num_labels_per_level)
    if isinstance(labels, (list, tuple)):
        if len(labels) != len(counts) or any(
            not torch.is_tensor(t) or t.dim() != 2 or t.shape[1] != n for t, n in zip(labels, counts)
        ):
            raise ValueError(
                f"Dense `labels` given per level must be {len(counts)} float tensors [B, n_k], n = {counts}."
            )
        return [t.float() for t in labels]
    if not torch.is_tensor(labels):
        raise ValueError(f"`labels` must be a tensor, got {type(labels).__name__}.")
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[1] != sum(counts):
            raise ValueError(
                f"Dense `labels` must be [B, {sum(counts)}] (the targets of the levels {counts} side by side, finest "
                f"first), got shape {tuple(labels.shape)}."
            )
        return list(labels.float().split(counts, dim=1))
    if labels.dtype == torch.bool or labels.dim() != 2 or labels.shape[1] != len(counts):
        raise ValueError(
            f"`labels` must be int64 [B, {len(counts)}] (one class id per label level, finest first) or dense float "
            f"targets, got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    limits = torch.tensor(counts, device=labels.device)
    if labels.numel() and bool(((labels < 0) | (labels >= limits)).any()):
        raise ValueError(f"`labels` hold class ids outside the levels' ranges 0..n_k - 1 for n = {counts}.")
    targets = []
    for level, count in enumerate(counts):
        one_hot = F.one_hot(labels[:, level].long(), count).float()
        targets.append(one_hot * (1.0 - label_smoothing) + label_smoothing / count)
    return targets


def soft_target_cross_entropy(logits, targets):
    """Cross-entropy with dense targets: `mean_b sum_c -targets[b, c] * log_softmax(logits[b])[c]` (timm's
    SoftTargetCrossEntropy; plain cross-entropy for one-hot targets)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def tree_path_kl(logits_per_level, targets_per_level):
    """H-CAST's tree-path KL term: one softmax over the logits of all levels side by side, against the levels'
    targets side by side normalised to sum 1 per row (mass 1/L on each level's true class for one-hot targets),
    `KL(q || softmax)` averaged over the batch. Levels are concatenated coarsest first, as the authors do (the value
    does not depend on the order, only its float rounding does)."""
    joint_log_probs = F.log_softmax(torch.cat([z.float() for z in reversed(logits_per_level)], dim=1), dim=1)
    joint_targets = torch.cat(list(reversed(targets_per_level)), dim=1)
    joint_targets = joint_targets / joint_targets.sum(dim=1, keepdim=True)
    return F.kl_div(joint_log_probs, joint_targets, reduction="batchmean")


def hierarchical_classification_loss(labels, logits_per_level, config, **kwargs):
    """The H-CAST loss: the sum over levels of the cross-entropy with each level's target, plus
    `config.tree_path_kl_weight` x `tree_path_kl`. Targets from `hierarchy_targets` (one-hot labels smoothed by
    `config.hierarchy_label_smoothing`)."""
    targets = hierarchy_targets(labels, config.hierarchy_num_labels, config.hierarchy_label_smoothing)
    cross_entropy = sum(soft_target_cross_entropy(z, t) for z, t in zip(logits_per_level, targets))
    return cross_entropy + config.tree_path_kl_weight * tree_path_kl(logits_per_level, targets)


class CastForHierarchicalImageClassification(CastPreTrainedModel):
    """H-CAST (Park, Zhang, Yu, Beery & Huang, ICLR 2025): CAST with one linear head per level of a taxonomy, each
    reading the CLS token of the CAST level `config.hierarchy_cast_levels` names, so that fine labels are read where
    the segments are fine and coarse labels where they are coarse. By default, as the authors: with 3 label levels
    the finest reads level 2's CLS token after its blocks, the middle level 3's (both without a norm) and the
    coarsest the final-normed CLS token (the image embedding); with 2 label levels, levels 3 and 4.

    The taxonomy is in the config (`hierarchy_num_labels`, finest first, `hierarchy_parents`, `hierarchy_id2label`);
    `config.id2label` and `logits` are the finest level's. Loss: `hierarchical_classification_loss`, through
    `self.loss_function`.
    """

    def __init__(self, config: CastConfig):
        super().__init__(config)
        if not config.hierarchy_num_labels:
            raise ValueError(
                "CastForHierarchicalImageClassification needs a taxonomy: set `hierarchy_num_labels` (classes per "
                "level, finest first) and `hierarchy_parents` in the CastConfig (`config.set_taxonomy(...)`)."
            )
        config.validate_taxonomy()  # also when the fields were set as attributes (e.g. from_pretrained kwargs)
        self.cast = CastModel(config)
        # One Linear per label level, finest first (`classifier.<k>`).
        self.classifier = nn.ModuleList(nn.Linear(config.hidden_size, count) for count in config.hierarchy_num_labels)
        self.loss_function = hierarchical_classification_loss
        self.post_init()

    def _init_weights(self, module):
        """The level heads as the authors' (timm's ViT init: truncated normal, zero bias); the rest as CAST."""
        if isinstance(module, nn.Linear) and any(module is head for head in getattr(self, "classifier", ())):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def level_features(self, outputs):
        """The CLS feature each label level reads, finest first: L x `[B, C]` (the CLS token after a level's
        blocks; for level 4 the final-normed one, `pooler_output`)."""
        return [
            outputs.pooler_output if level == NUM_LEVELS else outputs.level_hidden_states[level - 1][:, 0]
            for level in self.config.hierarchy_cast_levels
        ]

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        superpixels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CastHierarchicalImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `[B, L]`, *optional*): class ids per label level, finest first; or dense
            targets (see `hierarchy_targets`).
        """
        outputs = self.cast(pixel_values, superpixels, return_dict=True, **kwargs)
        logits_per_level = tuple(head(feature) for head, feature in zip(self.classifier, self.level_features(outputs)))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits_per_level, self.config, **kwargs)
        return CastHierarchicalImageClassifierOutput(
            loss=loss,
            logits=logits_per_level[0],
            logits_per_level=logits_per_level,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            pooler_output=outputs.pooler_output,
            **outputs.hierarchy_fields(),
        )


__all__ = [
    "CastBackbone",
    "CastBlockFusion",
    "CastEmbeddings",
    "CastEncoder",
    "CastForHierarchicalImageClassification",
    "CastForImageClassification",
    "CastForSelfSupervisedPretraining",
    "CastForSemanticSegmentation",
    "CastHierarchicalImageClassifierOutput",
    "CastHierarchyOutput",
    "CastImageClassifierOutput",
    "CastModel",
    "CastModelOutput",
    "CastPreTrainedModel",
    "CastSelfSupervisedOutput",
    "CastSemanticSegmenterOutput",
    "check_attention_memory",
    "default_superpixels",
    "dynamic_batch_compilation",
    "hierarchical_classification_loss",
    "hierarchy_targets",
    "soft_target_cross_entropy",
    "tree_path_kl",
]
