"""Superpixels for CAST: OpenCV SEEDS as in the original code, SLIC, and a regular grid.

Every function takes 8-bit RGB images `uint8 [H, W, 3]` and returns `int64 [H, W]` labels made consecutive
(0..S-1, in increasing order of OpenCV's label ids), so that label `k` is level-1 token `k` of the model.

The original code (github.com/twke18/CAST) runs `cv2.ximgproc.createSuperpixelSEEDS` on the LAB image with
`num_levels=1, prior=2, double_step=False` and 196 requested superpixels for a 224x224 crop, in two recipes:

- `"self_supervised"` (moco-v3/suppix_utils/datasets_seeds.py, MoCo pre-training and linear probing):
  `histogram_bins=15`, 20 iterations, on `(x * 255).astype(uint8)` of the `[0, 1]` crop, which is the
  decoded 8-bit image itself.
- `"supervised"` (deit/datasets_seeds.py): `histogram_bins=5`, 15 iterations, on the *normalised* crop turned
  back to 8 bit with `((x * std + mean) * 255).astype(uint8)` in float64: the truncation makes some pixels one
  level darker than the decoded image (see `denormalize_to_uint8(..., rounding="truncate")`).
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from .segment_ops import relabel_consecutive


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The original requests 196 superpixels for a 224x224 crop (one per 16x16 pixels).
DEFAULT_NUM_SUPERPIXELS = 196
REFERENCE_SIZE = 224

SUPERPIXEL_METHODS = ("seeds", "slic", "grid")


@dataclass(frozen=True)
class SeedsRecipe:
    """SEEDS settings of one of the original training pipelines.

    `from_normalized`: SEEDS runs on the normalised crop turned back to 8 bit by truncation (the DeiT pipeline)
    instead of on the decoded 8-bit crop (the MoCo pipeline).
    """

    histogram_bins: int
    num_iterations: int
    from_normalized: bool = False
    num_levels: int = 1
    prior: int = 2
    double_step: bool = False


SEEDS_RECIPES = {
    "self_supervised": SeedsRecipe(histogram_bins=15, num_iterations=20),
    "supervised": SeedsRecipe(histogram_bins=5, num_iterations=15, from_normalized=True),
}


def get_seeds_recipe(recipe):
    """A `SeedsRecipe` from its name (`"self_supervised"`, `"supervised"`) or the recipe itself."""
    if isinstance(recipe, SeedsRecipe):
        return recipe
    if recipe not in SEEDS_RECIPES:
        raise ValueError(f"Unknown SEEDS recipe {recipe!r}; expected one of {sorted(SEEDS_RECIPES)}.")
    return SEEDS_RECIPES[recipe]


def scaled_num_superpixels(height, width, num_superpixels=DEFAULT_NUM_SUPERPIXELS, reference_size=REFERENCE_SIZE):
    """Number of superpixels to request for an `height x width` image: `num_superpixels` per
    `reference_size x reference_size` pixels (constant superpixel area). `reference_size=None` disables scaling."""
    if reference_size is None:
        return int(num_superpixels)
    return max(1, round(num_superpixels * height * width / (reference_size * reference_size)))


def check_rgb_uint8(image):
    """Raise a clear error unless `image` is an 8-bit RGB array `[H, W, 3]` with at least one pixel."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Expected an 8-bit RGB numpy array [H, W, 3], got {type(image).__name__}.")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Expected an 8-bit RGB array [H, W, 3], got dtype {image.dtype} and shape {image.shape}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"The image is empty (shape {image.shape}).")


def seeds_block_grid(height, width, num_superpixels):
    """`(rows, cols)` of the superpixels OpenCV's SEEDS will return, or `None` where it would fail.

    Mirrors `SuperpixelSEEDSImpl::initialize`: at least 10 superpixels and 2 block levels are enforced, the grid is
    `rows = (int)sqrtf(n * H / W)` by `cols = rows * W / H`, blocks are `ceil(W / cols / 2)` pixels wide (same for the
    height) and the top level has half as many blocks as the bottom level. When the blocks would be narrower than a
    pixel, OpenCV drops to a single level, where it often crashes or loops forever: `None` then (and for empty
    grids). Checked against OpenCV 5.0 on 3716 sizes and counts up to 224 px: wherever this gives a grid, SEEDS
    returns exactly `rows * cols` superpixels.
    """
    requested = max(int(num_superpixels), 10)
    rows = int(np.sqrt(np.float32(requested) * np.float32(height) / np.float32(width)))
    cols = rows * width // height
    if rows < 1 or cols < 1:
        return None
    block_width = np.float32(width) / np.float32(cols) / np.float32(2)
    block_height = np.float32(height) / np.float32(rows) / np.float32(2)
    if block_width < 1 or block_height < 1:
        return None
    top_rows = (height // math.ceil(block_height)) // 2
    top_cols = (width // math.ceil(block_width)) // 2
    if top_rows < 1 or top_cols < 1:
        return None
    return top_rows, top_cols


def seeds_num_superpixels(height, width, num_superpixels):
    """Number of superpixels SEEDS returns for `num_superpixels` requested on an `height x width` image (0 where it
    cannot run): e.g. 196 at 224x224 for 196, 36 at 64x64 for 49."""
    grid = seeds_block_grid(height, width, num_superpixels)
    return 0 if grid is None else grid[0] * grid[1]


def seeds_superpixels(image, num_superpixels=DEFAULT_NUM_SUPERPIXELS, recipe="self_supervised"):
    """OpenCV SEEDS superpixels of an 8-bit RGB image `[H, W, 3]`, exactly as the original code computes them.

    `num_superpixels` is passed to OpenCV as is (SEEDS returns a grid-dependent number, e.g. 36 for 49 requested
    at 64x64). Returns consecutive int64 labels `[H, W]`.
    """
    check_rgb_uint8(image)
    recipe = get_seeds_recipe(recipe)
    height, width = image.shape[:2]
    if num_superpixels < 1:
        raise ValueError(f"num_superpixels must be >= 1, got {num_superpixels}.")
    if seeds_block_grid(height, width, num_superpixels) is None:
        raise ValueError(
            f"SEEDS cannot place {num_superpixels} superpixels on a {height}x{width} image (OpenCV would crash or "
            "never return): resize the image, request fewer superpixels, or use superpixel_method='grid'."
        )
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(
        width,
        height,
        3,
        int(num_superpixels),
        recipe.num_levels,
        recipe.prior,
        recipe.histogram_bins,
        recipe.double_step,
    )
    seeds.iterate(lab, recipe.num_iterations)
    return relabel_consecutive(seeds.getLabels())


def slic_superpixels(image, num_superpixels=DEFAULT_NUM_SUPERPIXELS, ruler=10.0, num_iterations=10):
    """OpenCV SLICO superpixels (on LAB) of an 8-bit RGB image, with a region size giving about `num_superpixels`.

    The original's SLIC variant used scikit-image; this one is an OpenCV stand-in, not a reproduction.
    """
    check_rgb_uint8(image)
    height, width = image.shape[:2]
    region_size = max(1, round(math.sqrt(height * width / max(int(num_superpixels), 1))))
    # OpenCV's SLIC crashes (segmentation fault) on regions of twice the image's shorter side or more.
    region_size = min(region_size, 2 * min(height, width) - 1)
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)
    slic = cv2.ximgproc.createSuperpixelSLIC(lab, cv2.ximgproc.SLICO, region_size, float(ruler))
    slic.iterate(num_iterations)
    slic.enforceLabelConnectivity(25)
    return relabel_consecutive(slic.getLabels())


def grid_superpixels(height, width, num_superpixels=DEFAULT_NUM_SUPERPIXELS):
    """A regular grid of about `num_superpixels` near-square cells, row-major: `int64 [H, W]`.

    For a 224x224 image and 196 cells, these are exactly the 16x16 patches of a ViT.
    """
    if height < 1 or width < 1:
        raise ValueError(f"The image is empty ({height}x{width}).")
    side = math.sqrt(height * width / max(int(num_superpixels), 1))
    rows = min(height, max(1, round(height / side)))
    cols = min(width, max(1, round(width / side)))
    row_of_pixel = np.arange(height) * rows // height  # [H]
    col_of_pixel = np.arange(width) * cols // width  # [W]
    return (row_of_pixel[:, None] * cols + col_of_pixel[None, :]).astype(np.int64)


def compute_superpixels(
    image,
    method="seeds",
    num_superpixels=DEFAULT_NUM_SUPERPIXELS,
    recipe="self_supervised",
):
    """Superpixels of one 8-bit RGB image with `method` in `SUPERPIXEL_METHODS`: consecutive int64 `[H, W]`."""
    if method == "seeds":
        return seeds_superpixels(image, num_superpixels, recipe)
    if method == "slic":
        return slic_superpixels(image, num_superpixels)
    if method == "grid":
        check_rgb_uint8(image)
        return grid_superpixels(image.shape[0], image.shape[1], num_superpixels)
    raise ValueError(f"Unknown superpixel method {method!r}; expected one of {SUPERPIXEL_METHODS}.")


def resolve_num_workers(num_workers, batch_size):
    """Threads to use: `num_workers` (None = all cores), never more than the batch."""
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be >= 1 or None, got {num_workers}.")
    return max(1, min(int(num_workers), batch_size))


def batch_superpixels(
    images,
    method="seeds",
    num_superpixels=DEFAULT_NUM_SUPERPIXELS,
    recipe="self_supervised",
    num_workers=None,
):
    """Superpixels of a list of 8-bit RGB images, computed in a thread pool (OpenCV releases the GIL).

    `num_superpixels` is one count for all images or one per image. Each image is processed independently, so the
    result does not depend on `num_workers`. Returns a list of int64 `[H, W]` arrays, in input order.
    """
    images = list(images)
    if isinstance(num_superpixels, (int, np.integer)):
        num_superpixels = [int(num_superpixels)] * len(images)
    if len(num_superpixels) != len(images):
        raise ValueError(f"Got {len(num_superpixels)} superpixel counts for {len(images)} images.")

    def one(args):
        image, count = args
        return compute_superpixels(image, method, count, recipe)

    workers = resolve_num_workers(num_workers, len(images))
    if workers == 1:
        return [one(args) for args in zip(images, num_superpixels)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, zip(images, num_superpixels)))


def denormalize_to_uint8(pixel_values, mean=IMAGENET_MEAN, std=IMAGENET_STD, rounding="round"):
    """Turn normalised pixel values `[..., 3, H, W]` (numpy or torch) back into 8-bit RGB `[..., H, W, 3]`.

    `rounding="round"` recovers the 8-bit image that was normalised (exact for any image decoded from 8 bit: it
    is how the fixtures' `superpixels` are reproduced from their `pixel_values`). `rounding="truncate"` is the
    DeiT pipeline's `((x * std + mean) * 255).astype(uint8)` in float64, bit for bit (values clipped to
    [0, 255] first, which only matters where the original's cast is undefined).
    """
    if hasattr(pixel_values, "detach"):
        pixel_values = pixel_values.detach().cpu().numpy()
    pixel_values = np.asarray(pixel_values)
    if pixel_values.ndim < 3 or pixel_values.shape[-3] != 3:
        raise ValueError(f"Expected pixel values [..., 3, H, W], got shape {pixel_values.shape}.")
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}.")
    channels_last = np.moveaxis(pixel_values, -3, -1)
    # The original multiplies a float32 array by tuples, which numpy promotes to float64.
    values = channels_last * np.asarray(std, dtype=np.float64) + np.asarray(mean, dtype=np.float64)
    values = values * 255
    if rounding == "round":
        values = np.rint(values)
    return np.clip(values, 0, 255).astype(np.uint8)


__all__ = [
    "DEFAULT_NUM_SUPERPIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REFERENCE_SIZE",
    "SEEDS_RECIPES",
    "SUPERPIXEL_METHODS",
    "SeedsRecipe",
    "batch_superpixels",
    "check_rgb_uint8",
    "compute_superpixels",
    "denormalize_to_uint8",
    "get_seeds_recipe",
    "grid_superpixels",
    "resolve_num_workers",
    "scaled_num_superpixels",
    "seeds_block_grid",
    "seeds_num_superpixels",
    "seeds_superpixels",
    "slic_superpixels",
]
