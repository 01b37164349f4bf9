"""PyTorch CAST for semantic segmentation: the authors' `cast_seg.py` variant (segment pooling at full resolution,
BlockFusion of the four levels back onto the superpixels) with a per-segment head painted to pixels."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_cast import NUM_LEVELS, CastConfig
from .hierarchy import paint_hierarchy, paint_segments
from .modeling_cast import CastEmbeddings, CastModel, CastPreTrainedModel, moco_mlp


# Dropout between the fused BatchNorm and the projection (hard-coded in the original BlockFusion).
FUSION_DROPOUT = 0.2
SEGMENTATION_HEAD_TYPES = ("linear", "mlp_projector")


@dataclass
class CastSemanticSegmenterOutput(SemanticSegmenterOutput):
    """
    Outputs of [`CastForSemanticSegmentation`]. N_1 is the number of superpixel tokens (max label + 1, at least
    `num_clusters[0]`).

    Args:
        loss (`[]`, *optional*): pixel-wise cross-entropy (`ignore_index` pixels left out) when `labels` are given.
        logits (`[B, num_labels, H, W]`): `segment_logits` painted to the pixels of each superpixel.
        segment_logits (`[B, N_1, num_labels]`): one prediction per superpixel (the original per-token `head`).
        fused_hidden_states (`[B, 1 + N_1, C]`): BlockFusion output, fused CLS first; its tokens feed the head.
        level_hidden_states, pooled_hidden_states, assignment_logits, sampled_indices, padding_masks, hierarchy:
            as in [`CastModelOutput`].
    """

    segment_logits: torch.FloatTensor | None = None
    fused_hidden_states: torch.FloatTensor | None = None
    level_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooled_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    assignment_logits: tuple[torch.FloatTensor, ...] | None = None
    sampled_indices: tuple[torch.LongTensor, ...] | None = None
    padding_masks: tuple[torch.BoolTensor, ...] | None = None
    hierarchy: tuple[torch.LongTensor, ...] | None = None

    def hierarchy_maps(self, superpixels):
        """Pixel label maps [B, H, W] for levels 0 (superpixels) to 4. Segments are pooled at full resolution, so
        every superpixel has its own token and level 0 is the superpixel map itself."""
        return paint_hierarchy(self.hierarchy, superpixels, patch_size=None)


class CastSegmentationEmbeddings(CastEmbeddings):
    """Segment tokens of the original's segmentation stage: the superpixel map is *not* downsampled; the ConvStem
    features are upsampled to its size (bilinear) and the position grid too (bicubic), and both are averaged per
    superpixel at full resolution, so no superpixel is lost."""

    def forward(self, pixel_values, superpixels):
        """Returns embeddings [B, 1 + S, C] (CLS first), the padding mask [B, S] and the ConvStem grid."""
        stem = self.patch_embeddings(pixel_values)  # [B, h, w, C]
        labels = superpixels.long()
        batch, height, width = labels.shape
        features = F.interpolate(stem.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False)
        features = features.permute(0, 2, 3, 1)  # [B, H, W, C]
        num_segments = max(int(labels.max()) + 1, self.config.num_clusters[0])
        tokens, padding_mask = self.segment_tokens(features, self.position_grid(height, width), labels, num_segments)
        cls_token = (self.cls_token + self.cls_position()).expand(batch, -1, -1)
        embeddings = self.dropout(torch.cat([cls_token, tokens], dim=1))
        return embeddings, padding_mask, stem


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
        fused = self.batch_norm(fused.transpose(1, 2)).transpose(1, 2)
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
    flat = (rows * num_segments + superpixels.reshape(batch, -1)) * num_labels + labels
    pixel_log_probs = log_probs[flat[valid]]
    if pixel_log_probs.numel() == 0:  # every pixel ignored: zero loss that still reaches the graph
        return segment_logits.sum() * 0.0
    return -pixel_log_probs.mean()


class CastForSemanticSegmentation(CastPreTrainedModel):
    """CAST with the segmentation-stage encoder of `cast_seg.py` (no final LayerNorm, full-resolution segment
    pooling, trainable 4th pooling when `freeze_last_pooling=False`), BlockFusion and a per-segment head.

    Extra config attributes (read with defaults): `segmentation_head_type` (`"linear"` or `"mlp_projector"`),
    `semantic_loss_ignore_index` (255).
    """

    def __init__(self, config: CastConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cast = CastModel(config, add_final_norm=False)
        self.cast.embeddings = CastSegmentationEmbeddings(config)
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
                "ids first (`hf_hierseg.training.segmentation.mask_to_class_ids` with a `palette`)."
            )
        if labels.shape != superpixels.shape:
            raise ValueError(
                f"`labels` shape {tuple(labels.shape)} does not match the images and superpixels "
                f"{tuple(superpixels.shape)}: give one [H, W] class map per image at the image's size."
            )
        valid = labels[labels != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.num_labels):
            raise ValueError(
                f"`labels` holds class ids in [{int(valid.min())}, {int(valid.max())}], but the model has "
                f"{self.num_labels} labels (0..{self.num_labels - 1}) and ignores only {self.ignore_index}."
            )

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
        r"""
        labels (`torch.LongTensor` of shape `[B, H, W]`, *optional*): class id per pixel (`ignore_index` for
            pixels that do not count), at the size of `pixel_values`.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            self._validate_inputs(pixel_values, superpixels)
            self.validate_labels(labels, superpixels)
        outputs = self.cast(
            pixel_values,
            superpixels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        level_tokens = [hidden[:, 1:] for hidden in outputs.level_hidden_states]
        cls_tokens = [pooled[:, :1] for pooled in outputs.pooled_hidden_states]
        fused = self.fusion(level_tokens, cls_tokens, outputs.hierarchy[: NUM_LEVELS - 1])
        segment_logits = self.classifier_per_segment(fused[:, 1:])
        logits = paint_segments(segment_logits, superpixels).permute(0, 3, 1, 2)  # [B, num_labels, H, W]

        loss = None
        if labels is not None:
            loss = segment_cross_entropy(segment_logits, superpixels.long(), labels.long(), self.ignore_index)
        output = CastSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            segment_logits=segment_logits,
            fused_hidden_states=fused,
            level_hidden_states=outputs.level_hidden_states,
            pooled_hidden_states=outputs.pooled_hidden_states,
            assignment_logits=outputs.assignment_logits,
            sampled_indices=outputs.sampled_indices,
            padding_masks=outputs.padding_masks,
            hierarchy=outputs.hierarchy,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def classifier_per_segment(self, tokens):
        """The head on every token [B, N_1, C] independently (BatchNorm in an MLP head sees B * N_1 rows)."""
        return self.classifier(tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])


__all__ = ["CastForSemanticSegmentation", "CastSemanticSegmenterOutput", "CastBlockFusion", "CastSegmentationEmbeddings"]
