"""Graph pooling: farthest point sampling picks K centroid tokens, every token is softly assigned to them, and
the assignments average the tokens into K new (coarser) segment tokens."""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CastSelfAttention, padding_attention_mask
from .segment_ops import is_capturing_graph, masked_mean


def farthest_point_sampling(points, num_samples, start_index=0):
    """Batched farthest point sampling with the semantics of DGL's CPU kernel.

    Distances are squared Euclidean; each step picks the point farthest from the chosen set, ties to the lowest
    index. Points already chosen are never chosen again (where DGL would re-pick a chosen point, i.e. only when
    every remaining distance is 0, this picks the lowest-index unchosen point instead).

    In eager mode on the CPU the steps run on distances from one batched Gram matrix (|p|^2 + |q|^2 - 2 p.q), so
    each step costs O(N) instead of O(N * D), in four small ops. Any row where, at some step, the two farthest
    candidates lie within that formula's rounding bound of each other is recomputed with the direct sum of squared
    differences (`farthest_point_sampling_direct`; reading that flag costs nothing on the CPU), so the picks always
    equal the direct computation's. Under graph capture (torch.compile, export) and off the CPU the direct
    computation alone runs: no branch on tensor values, no host synchronisation, and half the graph that computing
    both and selecting per row would unroll (a compiler fuses each of its steps).

    Args:
        points: [B, N, D] (use float64 for exact ties).
        num_samples: K <= N.
        start_index: the first pick.

    Returns:
        int64 [B, K] indices.
    """
    batch, num_points, dim = points.shape
    if num_samples > num_points:
        raise ValueError(f"Cannot sample {num_samples} points from {num_points}.")
    if is_capturing_graph() or points.device.type != "cpu":
        return farthest_point_sampling_direct(points, num_samples, start_index)
    start = torch.full((batch,), start_index, dtype=torch.long, device=points.device)
    if num_samples == 1:
        return start.unsqueeze(1)
    gram = torch.bmm(points, points.transpose(1, 2))  # [B, N, N]
    norms = gram.diagonal(dim1=1, dim2=2)  # [B, N]
    # These differ from the direct sums by <= ~8 (D + 2) u max|p|^2 (u = unit roundoff); twice that as margin.
    tolerance = 8 * (dim + 4) * torch.finfo(points.dtype).eps * norms.amax(dim=1)  # [B]
    distances = (norms.unsqueeze(2) + norms.unsqueeze(1)).sub_(gram, alpha=2)  # [B, N, N], symmetric
    # -inf to itself: the running minimum marks every chosen point -inf, so it is never picked again.
    diagonal = torch.eye(num_points, dtype=torch.bool, device=points.device)
    distances = distances.masked_fill(diagonal, float("-inf"))
    # Row b * N + c: distances of image b's points to its point c (index_select is far cheaper than [rows, c]).
    distance_rows = distances.view(batch * num_points, num_points)
    # Image b's rows start at b * N; a single image needs no offsets (one op less per step).
    row_offsets = torch.arange(0, batch * num_points, num_points, device=points.device) if batch > 1 else None

    def rows_of(indices):  # [B] point indices -> their distance rows [B, N]
        return distance_rows.index_select(0, indices if row_offsets is None else row_offsets + indices)

    # score: min distance of every point to the chosen set (-inf for chosen points), one [B, N] per step.
    score = rows_of(start)
    picks, scores = [start], [score]
    for _ in range(num_samples - 2):
        current = score.argmax(dim=1)
        picks.append(current)
        score = torch.minimum(score, rows_of(current))
        scores.append(score)
    picks.append(score.argmax(dim=1))
    picks = torch.stack(picks, dim=1)  # [B, K]

    top_two = torch.stack(scores, dim=1).topk(2, dim=2).values  # [B, K - 1, 2]
    gaps = top_two[..., 0] - top_two[..., 1]
    ambiguous = (gaps <= 2 * tolerance.unsqueeze(1)).any(dim=1) | ~torch.isfinite(tolerance)  # [B]
    if ambiguous.any():
        picks[ambiguous] = farthest_point_sampling_direct(points[ambiguous], num_samples, start_index)
    return picks


def farthest_point_sampling_direct(points, num_samples, start_index=0):
    """Reference farthest point sampling: every step sums squared differences over D (see
    `farthest_point_sampling`, which returns the same picks faster). Branch-free: it compiles and exports."""
    batch, num_points, dim = points.shape
    if num_samples > num_points:
        raise ValueError(f"Cannot sample {num_samples} points from {num_points}.")
    flat_points = points.reshape(batch * num_points, dim)
    row_offsets = torch.arange(0, batch * num_points, num_points, device=points.device)
    current = torch.full((batch,), start_index, dtype=torch.long, device=points.device)
    picks, min_distance = [current], None
    for _ in range(num_samples - 1):
        chosen = flat_points.index_select(0, row_offsets + current)  # [B, D]
        distance = (points - chosen.unsqueeze(1)).pow(2).sum(-1)  # [B, N]
        min_distance = distance if min_distance is None else torch.minimum(min_distance, distance)
        # Chosen points hold -inf (distances are >= 0), so they are never picked again; ties go to the lowest index.
        min_distance = min_distance.scatter(1, current.unsqueeze(1), float("-inf"))
        current = min_distance.argmax(dim=1)
        picks.append(current)
    return torch.stack(picks, dim=1)


@dataclass
class GraphPoolingOutput:
    cls_token: torch.Tensor  # [B, 1, C] pooled CLS
    pooled_tokens: torch.Tensor  # [B, K, C] one token per cluster (the next level's segments)
    assignment_logits: torch.Tensor  # [B, N, K]
    sampled_indices: torch.Tensor  # int64 [B, K], FPS picks among the N input tokens


class CentroidAttention(nn.Module):
    """Attention-only block that embeds tokens for grouping: x + Attn(LN(x)), mean-centred, plus a bias."""

    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CastSelfAttention(config, num_heads=config.graph_pooling_num_heads)
        self.bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, tokens, padding_mask=None, mask_padding=False):
        """tokens [B, N, C]; padding_mask bool [B, N] or None (nothing padded)."""
        masked = mask_padding and padding_mask is not None
        attention_mask = padding_attention_mask(padding_mask, tokens.dtype) if masked else None
        hidden, _ = self.attn(self.norm(tokens), attention_mask)
        hidden = tokens + hidden
        mean = masked_mean(hidden, ~padding_mask, keepdim=True) if masked else hidden.mean(dim=1, keepdim=True)
        return hidden - mean + self.bias


HALF_DTYPES = (torch.float16, torch.bfloat16)


def sampling_dtype(dtype):
    """The float dtype graph pooling groups in: float32 for half-precision models (so the hierarchy does not follow
    their rounding), else the model's own."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def without_autocast(device_type):
    """A context in which `torch.autocast` (if enabled on `device_type`) is off, so the grouping runs in the dtypes
    `sampling_dtype` gives it also inside an autocast region (a no-op context otherwise)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class GraphPooling(nn.Module):
    """Merge N segment tokens into `num_clusters` tokens (one CAST level).

    Sampling (farthest point sampling, in float64) and assignment (cosine logits, softmax, the assignment-weighted
    cluster means) run in at least float32, also in a half-precision model (`sampling_dtype`): the hierarchy is the
    float32 model's up to the rounding of the tokens it is given. `assignment_logits` are float32 there. Inside a
    `torch.autocast` region they run with autocast off (`without_autocast`), in the tokens' own dtype."""

    def __init__(self, config, num_clusters):
        super().__init__()
        hidden, expanded = config.hidden_size, 4 * config.hidden_size
        self.num_clusters = num_clusters
        self.assignment_scale = config.assignment_scale
        self.mask_padding = config.mask_padding_tokens
        self.centroid_fc = CentroidAttention(config)
        # LayerNorms here use torch's default eps (1e-5), as the original.
        self.token_norm = nn.LayerNorm(hidden)
        self.token_expand = nn.Linear(hidden, expanded)
        self.token_dropout = nn.Dropout(config.pooling_dropout_prob)
        self.cluster_norm = nn.LayerNorm(expanded)
        self.cluster_project = nn.Linear(expanded, hidden)

    def sample_centroids(self, tokens, padding_mask):
        """FPS over the tokens with padding replaced by the mean token, which is prepended as the start point."""
        tokens = tokens.detach().to(sampling_dtype(tokens.dtype))
        if padding_mask is None:
            mean = tokens.sum(dim=1, keepdim=True) / tokens.shape[1]  # [B, 1, C] (as masked_mean computes it)
            filled = tokens
        else:
            mean = masked_mean(tokens, ~padding_mask, keepdim=True)  # [B, 1, C]
            filled = torch.where(padding_mask.unsqueeze(-1), mean, tokens)
        points = torch.cat([mean, filled], dim=1).to(torch.float64)
        return farthest_point_sampling(points, self.num_clusters + 1, start_index=0)[:, 1:] - 1

    def expand(self, tokens):
        return self.token_dropout(F.gelu(self.token_expand(self.token_norm(tokens))))

    def forward(self, cls_token, tokens, padding_mask=None):
        """cls_token [B, 1, C]; tokens [B, N, C] (after the level's blocks); padding_mask bool [B, N] or None (nothing
        padded)."""
        device_type = tokens.device.type
        with without_autocast(device_type):
            sampled_indices = self.sample_centroids(tokens, padding_mask)  # [B, K]
        gather_index = sampled_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        compute_dtype = sampling_dtype(tokens.dtype)

        node_features = self.centroid_fc(tokens, padding_mask, self.mask_padding)
        with without_autocast(device_type):
            # Cosine logits: unit node features against the unit features of the sampled ones.
            node_directions = F.normalize(node_features.to(compute_dtype), dim=-1)  # [B, N, C]
            centroid_directions = torch.gather(node_directions, 1, gather_index)  # [B, K, C]
            assignment_logits = self.assignment_scale * torch.bmm(node_directions, centroid_directions.transpose(1, 2))
            assignments = assignment_logits.softmax(dim=-1)  # [B, N, K]
            if self.mask_padding and padding_mask is not None:
                assignments = assignments.masked_fill(padding_mask.unsqueeze(-1), 0.0)

        expanded = self.expand(torch.cat([cls_token, tokens], dim=1))
        expanded_cls, expanded_tokens = expanded[:, :1], expanded[:, 1:]
        with without_autocast(device_type):
            cluster_mass = assignments.sum(dim=1).unsqueeze(-1)  # [B, K, 1]
            cluster_sums = torch.bmm(assignments.transpose(1, 2), expanded_tokens.to(compute_dtype))  # [B, K, 4C]
            cluster_means = (cluster_sums / cluster_mass).to(expanded.dtype)
        projected = self.cluster_project(self.cluster_norm(torch.cat([expanded_cls, cluster_means], dim=1)))
        pooled_tokens = projected[:, 1:] + torch.gather(tokens, 1, gather_index)
        cls_token = projected[:, :1] + cls_token
        return GraphPoolingOutput(cls_token, pooled_tokens, assignment_logits, sampled_indices)


__all__ = [
    "GraphPooling",
    "GraphPoolingOutput",
    "CentroidAttention",
    "farthest_point_sampling",
    "farthest_point_sampling_direct",
    "sampling_dtype",
    "without_autocast",
]
