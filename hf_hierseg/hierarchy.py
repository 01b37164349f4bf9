"""The part-to-whole hierarchy: compose per-level assignments and paint them to pixels.

Level 0 are the superpixels (level-1 tokens, one per superpixel label). Graph pooling at level l assigns every
level-l token to one of K_l clusters, which are the tokens of level l+1. Composing the hard assignments gives,
for every level-1 segment, its group at each coarser level.
"""

import torch

from .segment_ops import present_labels, resize_labels_nearest


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


def effective_superpixels(superpixels, patch_size=8, num_tokens=None):
    """The superpixel map as the model sees it.

    On the stride-`patch_size` grid the model samples the top-left pixel of each cell; a superpixel that no cell
    samples has no token of its own (a padding token), so its pixels are given the label of the cell they lie in.
    With `patch_size=None` (segments pooled at full resolution) the map is returned unchanged.
    """
    superpixels = superpixels.long()
    if patch_size is None or patch_size == 1:
        return superpixels
    height, width = superpixels.shape[-2:]
    grid = resize_labels_nearest(superpixels, (height // patch_size, width // patch_size))
    num_labels = int(superpixels.max()) + 1
    if num_tokens is not None:
        num_labels = max(num_labels, num_tokens)
    present = present_labels(grid, num_labels)  # [B, num_labels]
    cell_labels = grid.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    cell_labels = cell_labels[:, :height, :width]
    sampled = torch.gather(present, 1, superpixels.reshape(superpixels.shape[0], -1)).reshape(superpixels.shape)
    return torch.where(sampled, superpixels, cell_labels)


def paint_hierarchy(hierarchy, superpixels, patch_size=8):
    """Pixel label maps for every level: a list of int64 [B, H, W], level 0 (the superpixels as the model saw
    them, see `effective_superpixels`) first, then levels 1..4. Every level-l region is a union of level-(l-1)
    regions."""
    level0 = effective_superpixels(superpixels.to(hierarchy[0].device), patch_size, hierarchy[0].shape[1])
    return [level0] + [paint_segments(groups, level0) for groups in hierarchy]


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


__all__ = [
    "parents_from_logits",
    "compose_hierarchy",
    "paint_segments",
    "effective_superpixels",
    "paint_hierarchy",
    "parent_links",
]
