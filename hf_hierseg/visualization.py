"""Pictures of segmentations: region boundaries, mean colours, label colours, and a grid over hierarchy levels.

Images are 8-bit RGB (`PIL.Image` or `uint8 [H, W, 3]`); label maps are integer `[H, W]` arrays or tensors (for
example the per-level maps of `CastImageProcessor.post_process_hierarchical_segmentation`).
"""

import colorsys

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


BOUNDARY_COLOR = (255, 230, 0)


def to_rgb_array(image):
    """`uint8 [H, W, 3]` from a PIL image or an 8-bit RGB array."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Expected an 8-bit RGB image [H, W, 3], got dtype {image.dtype} and shape {image.shape}.")
    return image


def to_label_array(labels, size=None):
    """`int64 [H, W]` from an array or tensor, resized to `size=(height, width)` with nearest if given."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Expected an integer label map [H, W], got dtype {labels.dtype} and shape {labels.shape}.")
    if size is not None and labels.shape != tuple(size):
        resized = PIL.Image.fromarray(labels.astype(np.int32)).resize((size[1], size[0]), PIL.Image.NEAREST)
        labels = np.asarray(resized)
    return labels.astype(np.int64)


def label_boundaries(labels):
    """`bool [H, W]`: pixels whose right or lower neighbour has another label (one-pixel-wide boundaries)."""
    labels = to_label_array(labels)
    boundaries = np.zeros(labels.shape, dtype=bool)
    boundaries[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    boundaries[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return boundaries


def region_mean_colors(image, labels):
    """Every region filled with its mean colour: `uint8 [H, W, 3]`."""
    image = to_rgb_array(image)
    labels = to_label_array(labels, image.shape[:2])
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    pixels = image.reshape(-1, 3).astype(np.float64)
    sums = np.stack([np.bincount(inverse, weights=pixels[:, c], minlength=len(counts)) for c in range(3)], axis=1)
    means = np.rint(sums / counts[:, None]).astype(np.uint8)
    return means[inverse].reshape(image.shape)


def label_palette(num_labels):
    """`uint8 [num_labels, 3]` of well-separated, saturated colours (golden-ratio hue steps)."""
    hues = (np.arange(num_labels) * 0.618033988749895) % 1.0
    values = 0.75 + 0.25 * (np.arange(num_labels) % 2)
    colors = [colorsys.hsv_to_rgb(hue, 0.65, value) for hue, value in zip(hues, values)]
    return np.rint(np.array(colors, dtype=np.float64).reshape(-1, 3) * 255).astype(np.uint8)


def colorize_labels(labels):
    """Each label id drawn in its palette colour: `uint8 [H, W, 3]`."""
    labels = to_label_array(labels)
    if labels.min() < 0:
        raise ValueError("Label ids must be non-negative.")
    return label_palette(int(labels.max()) + 1)[labels]


def overlay_boundaries(image, labels, color=BOUNDARY_COLOR):
    """The image with region boundaries drawn in `color`: `uint8 [H, W, 3]`."""
    image = to_rgb_array(image).copy()
    image[label_boundaries(to_label_array(labels, image.shape[:2]))] = color
    return image


def overlay_labels(image, labels, alpha=0.5, draw_boundaries=True):
    """The image blended with label colours (weight `alpha`), boundaries on top: `uint8 [H, W, 3]`."""
    image = to_rgb_array(image)
    labels = to_label_array(labels, image.shape[:2])
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colorize_labels(labels).astype(np.float64)
    blended = np.rint(blended).astype(np.uint8)
    return overlay_boundaries(blended, labels) if draw_boundaries else blended


def _font(size):
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return PIL.ImageFont.load_default()


def level_titles(level_maps):
    """Titles for `draw_hierarchy`: `"superpixels: 196"`, `"level 1: 64 regions"`, ..."""
    titles = []
    for level, labels in enumerate(level_maps):
        count = len(np.unique(to_label_array(labels)))
        titles.append(f"superpixels: {count}" if level == 0 else f"level {level}: {count} regions")
    return titles


def draw_hierarchy(image, level_maps, titles=None, cell_size=224, margin=4):
    """One picture of a segmentation hierarchy: a column per level (level 0 = superpixels), with the region
    boundaries over the image in the top row and the regions' mean colours in the bottom row.

    Args:
        image: the 8-bit RGB image the maps belong to (maps of another size are resized with nearest).
        level_maps: list of integer `[H, W]` label maps, finest first.
        titles: one title per column (default: level names and region counts).
        cell_size: height in pixels of each picture in the grid (aspect ratio kept).

    Returns:
        `PIL.Image` in RGB.
    """
    image = to_rgb_array(image)
    if len(level_maps) == 0:
        raise ValueError("level_maps is empty: pass at least one label map.")
    level_maps = [to_label_array(labels, image.shape[:2]) for labels in level_maps]
    titles = level_titles(level_maps) if titles is None else list(titles)
    if len(titles) != len(level_maps):
        raise ValueError(f"Got {len(titles)} titles for {len(level_maps)} levels.")

    cell_height = int(cell_size)
    cell_width = max(1, round(image.shape[1] * cell_height / image.shape[0]))
    font = _font(max(10, cell_height // 14))
    title_height = max(14, cell_height // 10)
    grid = PIL.Image.new(
        "RGB",
        (len(level_maps) * (cell_width + margin) + margin, 2 * (cell_height + margin) + title_height + margin),
        (255, 255, 255),
    )
    draw = PIL.ImageDraw.Draw(grid)
    for column, (labels, title) in enumerate(zip(level_maps, titles)):
        left = margin + column * (cell_width + margin)
        draw.text((left, margin // 2), title, fill=(0, 0, 0), font=font)
        for row, picture in enumerate((overlay_boundaries(image, labels), region_mean_colors(image, labels))):
            cell = PIL.Image.fromarray(picture).resize((cell_width, cell_height), PIL.Image.NEAREST)
            grid.paste(cell, (left, title_height + margin + row * (cell_height + margin)))
    return grid


__all__ = [
    "colorize_labels",
    "draw_hierarchy",
    "label_boundaries",
    "label_palette",
    "level_titles",
    "overlay_boundaries",
    "overlay_labels",
    "region_mean_colors",
    "to_label_array",
    "to_rgb_array",
]
