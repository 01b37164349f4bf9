"""The part-to-whole hierarchy: compose per-level assignments and paint them to pixels.

Level 0 are the superpixels (level-1 tokens, one per superpixel label). Graph pooling at level l assigns every
level-l token to one of K_l clusters, which are the tokens of level l+1. Composing the hard assignments gives,
for every level-1 segment, its group at each coarser level.
"""

import torch


def parents_from_logits(assignment_logits):
    """Hard parent of every token at each level: a list of int64 [B, N_l] (values in 0..K_l-1)."""
    return [logits.argmax(dim=-1) for logits in assignment_logits]


def compose_hierarchy(parent_of):
    """Group of every level-1 segment at each level.

    Args:
        parent_of: list over levels of int64 [B, N_l]; `parent_of[l][b, i]` is the index of token i's
            cluster among the tokens of level l+1 (so N_{l+1} = K_l).

    Returns:
        tuple of int64 [B, N_1], one per level: `hierarchy[l][b, s]` is the level-(l+1) group of segment s.
    """
    groups = []
    current = parent_of[0]
    groups.append(current)
    for parents in parent_of[1:]:
        current = torch.gather(parents, 1, current)
        groups.append(current)
    return tuple(groups)


def paint_segments(segment_values, superpixels):
    """Paint per-segment values to pixels.

    Args:
        segment_values: [B, N_1] or [B, N_1, D], one entry per superpixel label.
        superpixels: int64 [B, H, W] with labels 0..N_1-1.

    Returns:
        [B, H, W] or [B, H, W, D].
    """
    batch, height, width = superpixels.shape
    flat = superpixels.reshape(batch, height * width).to(segment_values.device).long()
    if segment_values.dim() == 2:
        return torch.gather(segment_values, 1, flat).reshape(batch, height, width)
    index = flat.unsqueeze(-1).expand(-1, -1, segment_values.shape[-1])
    return torch.gather(segment_values, 1, index).reshape(batch, height, width, segment_values.shape[-1])


def paint_hierarchy(hierarchy, superpixels):
    """Pixel label maps for every level: a list of int64 [B, H, W], level 0 (the superpixels) first."""
    superpixels = superpixels.long()
    return [superpixels] + [paint_segments(groups, superpixels) for groups in hierarchy]


def parent_links(hierarchy):
    """For each level l >= 1, the parent (at level l+1) of each level-l group that occurs.

    Returns a list of dicts `{group: parent}` per image and level; the last level has no parents.
    """
    links = []
    for b in range(hierarchy[0].shape[0]):
        per_level = []
        for fine, coarse in zip(hierarchy[:-1], hierarchy[1:]):
            pairs = torch.stack([fine[b], coarse[b]], dim=1).unique(dim=0).tolist()
            per_level.append({int(f): int(c) for f, c in pairs})
        links.append(per_level)
    return links


__all__ = ["parents_from_logits", "compose_hierarchy", "paint_segments", "paint_hierarchy", "parent_links"]
