"""Pictures of segmentations: region boundaries, mean colours, label colours, and a grid over hierarchy levels.

Images are 8-bit RGB (`PIL.Image` or `uint8 [H, W, 3]`); label maps are integer `[H, W]` arrays or tensors (for
example the per-level maps of `CastImageProcessor.post_process_hierarchical_segmentation`).
"""

import colorsys
import functools

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
    return labels.astype(np.int64, copy=False)


def _small_labels(labels):
    """Whether the ids of an int64 map are small non-negative integers (a bincount over them is cheap)."""
    return labels.size > 0 and labels.min() >= 0 and labels.max() < 4 * labels.size + 1024


def _dense_labels(labels):
    """`(inverse, counts)`: each pixel's index among the ids present (ascending) and the pixel count of each."""
    flat = labels.reshape(-1)
    if _small_labels(labels):
        counts = np.bincount(flat)
        present = counts > 0
        return (np.cumsum(present) - 1)[flat], counts[present]
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


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
    return _region_mean_painter(image, labels)(labels)


def _region_mean_painter(image, labels):
    """A function painting label maps (`labels` or a sampling of it) with the mean colour of each region of
    `labels` over `image` (float64 sums of the 8-bit values, rounded)."""
    pixels = image.reshape(-1, 3)
    if _small_labels(labels):  # ids index the means directly
        flat = labels.reshape(-1)
        counts = np.bincount(flat)
        sums = np.stack([np.bincount(flat, weights=pixels[:, c], minlength=len(counts)) for c in range(3)], axis=1)
        means = np.rint(sums / np.maximum(counts, 1)[:, None]).astype(np.uint8)
        return lambda sampled: np.take(means, sampled, axis=0)
    ids, inverse, counts = np.unique(labels.reshape(-1), return_inverse=True, return_counts=True)
    sums = np.stack([np.bincount(inverse, weights=pixels[:, c], minlength=len(ids)) for c in range(3)], axis=1)
    means = np.rint(sums / counts[:, None]).astype(np.uint8)
    return lambda sampled: np.take(means, np.searchsorted(ids, sampled), axis=0)


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
    return np.take(label_palette(int(labels.max()) + 1), labels, axis=0)


def overlay_boundaries(image, labels, color=BOUNDARY_COLOR):
    """The image with region boundaries drawn in `color`: `uint8 [H, W, 3]`."""
    image = to_rgb_array(image).copy()
    image[label_boundaries(to_label_array(labels, image.shape[:2]))] = color
    return image


def overlay_labels(image, labels, alpha=0.5, draw_boundaries=True):
    """The image blended with label colours (weight `alpha`), boundaries on top: `uint8 [H, W, 3]`."""
    image = to_rgb_array(image)
    labels = to_label_array(labels, image.shape[:2])
    # rint((1 - alpha) * pixel + alpha * colour) in float64, looked up for each (pixel, colour) value pair.
    pairs = image.astype(np.intp) * 256 + colorize_labels(labels)
    blended = _blend_table(float(alpha)).reshape(-1)[pairs]
    if draw_boundaries:
        blended[label_boundaries(labels)] = BOUNDARY_COLOR
    return blended


@functools.lru_cache(maxsize=8)
def _blend_table(alpha):
    """`uint8 [256, 256]`: `rint((1 - alpha) * value + alpha * colour)` for every 8-bit value and colour channel."""
    values = np.arange(256, dtype=np.float64)
    return np.rint((1.0 - alpha) * values[:, None] + alpha * values[None, :]).astype(np.uint8)


def _font(size):
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return PIL.ImageFont.load_default()


def level_titles(level_maps):
    """Titles for `draw_hierarchy`: `"superpixels: 196"`, `"level 1: 64 regions"`, ..."""
    titles = []
    for level, labels in enumerate(level_maps):
        count = len(_dense_labels(to_label_array(labels))[1])
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
    # Each picture is drawn at the cell size directly: the pixels a nearest resize of the full-size picture would
    # take (PIL's own sampling), with the boundaries and region means of the full-size maps.
    rows = pil_nearest_indices(image.shape[0], cell_height)
    columns = pil_nearest_indices(image.shape[1], cell_width)
    image_cell = image[rows][:, columns]
    for column, (labels, title) in enumerate(zip(level_maps, titles)):
        left = margin + column * (cell_width + margin)
        draw.text((left, margin // 2), title, fill=(0, 0, 0), font=font)
        sampled = labels[rows][:, columns]
        boundaries = image_cell.copy()
        boundaries[sampled_boundaries(labels, rows, columns, sampled)] = BOUNDARY_COLOR
        mean_colors = _region_mean_painter(image, labels)(sampled)
        for row, picture in enumerate((boundaries, mean_colors)):
            grid.paste(PIL.Image.fromarray(picture), (left, title_height + margin + row * (cell_height + margin)))
    return grid


def pil_nearest_indices(length, new_length):
    """The source indices (`int [new_length]`) that PIL's `NEAREST` resize from `length` to `new_length` pixels
    samples along one axis (read off a resized row of indices, so they are PIL's own)."""
    indices = PIL.Image.fromarray(np.arange(length, dtype=np.int32)[None, :])  # mode "I"
    return np.asarray(indices.resize((new_length, 1), PIL.Image.NEAREST))[0].astype(np.intp)


def sampled_boundaries(labels, rows, columns, sampled=None):
    """`label_boundaries(labels)[rows][:, columns]` without computing the boundaries of the other pixels
    (`sampled`: `labels[rows][:, columns]`, if already at hand)."""
    height, width = labels.shape
    sampled = labels[rows][:, columns] if sampled is None else sampled
    right = np.minimum(columns + 1, width - 1)
    below = np.minimum(rows + 1, height - 1)
    boundaries = (sampled != labels[rows][:, right]) & (columns + 1 < width)[None, :]
    boundaries |= (sampled != labels[below][:, columns]) & (rows + 1 < height)[:, None]
    return boundaries


__all__ = [
    "colorize_labels",
    "draw_hierarchy",
    "label_boundaries",
    "label_palette",
    "level_titles",
    "overlay_boundaries",
    "overlay_labels",
    "pil_nearest_indices",
    "region_mean_colors",
    "sampled_boundaries",
    "to_label_array",
    "to_rgb_array",
]
