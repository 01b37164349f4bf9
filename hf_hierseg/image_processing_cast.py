"""Image processor for CAST: 8-bit RGB -> resize -> centre crop -> superpixels -> normalise."""

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    get_image_size_for_max_height_width,
)
from transformers.processing_utils import ImagesKwargs

from .hierarchy import paint_hierarchy, paint_segments
from .segment_ops import relabel_consecutive, resize_label_maps
from .superpixels import (
    DEFAULT_NUM_SUPERPIXELS,
    REFERENCE_SIZE,
    SUPERPIXEL_METHODS,
    batch_superpixels,
    denormalize_to_uint8,
    get_seeds_recipe,
    scaled_num_superpixels,
    seeds_num_superpixels,
)


# PIL's decompression-bomb threshold: larger inputs (or resize targets) are refused before any allocation.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Most superpixels (= level-1 tokens) accepted per image: 196 per 224x224 pixels reach it at about 4.2 megapixels
# (e.g. 2048x2048). Tokens grow with the area and attention with their square (see `check_superpixel_count`).
DEFAULT_MAX_SUPERPIXELS = 16_384


class CastImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    superpixel_method (`str`, *optional*, defaults to `"seeds"`):
        `"seeds"` (OpenCV SEEDS, as the original), `"slic"` (OpenCV SLICO) or `"grid"` (square patches).
    superpixel_recipe (`str`, *optional*, defaults to `"self_supervised"`):
        SEEDS settings of the original pipelines: `"self_supervised"` (MoCo: 15 histogram bins, 20 iterations) or
        `"supervised"` (DeiT: 5 bins, 15 iterations, on the normalised image turned back to 8 bit by truncation).
    num_superpixels (`int`, *optional*, defaults to 196):
        Superpixels requested per `superpixel_reference_size`^2 pixels (SEEDS returns about this many).
    superpixel_reference_size (`int`, *optional*, defaults to 224):
        Side of the square on which `num_superpixels` are requested; the count scales with the image area.
    num_workers (`int`, *optional*):
        Threads computing superpixels (default: all cores). Results do not depend on it.
    max_image_pixels (`int`, *optional*, defaults to 89478485):
        Largest image (input or resize target) accepted, checked before allocating it.
    max_superpixels (`int`, *optional*, defaults to 16384):
        Most superpixels (the model's level-1 tokens) accepted per image, estimated from the processed size before
        resizing or computing them; `None` disables the check. See `check_superpixel_count`.
    num_segment_tokens (`int`, *optional*):
        The static token budget N of the model (`CastConfig.num_segment_tokens`): every returned map has at most N
        labels (0..N-1). SEEDS returns the `rows x cols` block grid of `superpixels.seeds_num_superpixels`, about the
        requested count and often fewer (196 for 196 at 224x224, 36 for 49 at 64x64), never more than its grid: the
        request (`num_superpixels`, scaled to the image area) is lowered until that grid has at most N cells. Maps
        that still have more labels (SLIC, precomputed `superpixels`) get their smallest segments merged into the
        neighbour they share most border with (`limit_segment_count`). `None` (default) caps nothing.
    """

    superpixel_method: str | None
    superpixel_recipe: str | None
    num_superpixels: int | None
    superpixel_reference_size: int | None
    num_workers: int | None
    max_image_pixels: int | None
    max_superpixels: int | None
    num_segment_tokens: int | None


class CastImageProcessor(PilBackend):
    r"""
    Image processor for CAST. Every image is converted to 8-bit RGB, resized (shortest edge 256, bilinear), centre
    cropped (224x224, as `torchvision.transforms.CenterCrop`), split into superpixels on the 8-bit crop and
    normalised with the ImageNet mean and std. Returns `pixel_values` (float32 `[B, 3, H, W]`) and `superpixels`
    (int64 `[B, H, W]`, labels 0..S-1 per image).

    With `do_resize=False, do_center_crop=False` and 8-bit RGB 224x224 inputs, the labels and normalised pixels are
    exactly those of the original MoCo-v3 pipeline. For the original DeiT pipeline use
    `superpixel_recipe="supervised"` and `resample=PILImageResampling.BICUBIC`.

    Input conversion, deliberately: EXIF orientation is applied; transparency is composited onto white; palette,
    grayscale and CMYK images use PIL's conversion (ICC profiles are ignored); 16-bit images (PIL modes `I;16*`
    and `I`, numpy `uint16`) are scaled to 8 bit by /257; float arrays must be finite and in [0, 1] and are rounded
    to 8 bit; other integer arrays must lie in 0..255.

    `do_rescale` follows transformers: `do_rescale=False` says "my pixels are already in [0, 1]". Float images in
    [0, 1] then give the same `pixel_values` as with the default `do_rescale=True` (floats are always read as values in
    [0, 1], never rescaled twice); 8-bit inputs (PIL images, integer arrays) with `do_rescale=False` raise a
    `ValueError`, since their 0..255 values would reach the model unscaled.
    """

    valid_kwargs = CastImageProcessorKwargs
    model_input_names = ["pixel_values", "superpixels"]

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    superpixel_method = "seeds"
    superpixel_recipe = "self_supervised"
    num_superpixels = DEFAULT_NUM_SUPERPIXELS
    superpixel_reference_size = REFERENCE_SIZE
    num_workers = None
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    max_superpixels = DEFAULT_MAX_SUPERPIXELS
    num_segment_tokens = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _check_superpixel_settings(self.superpixel_method, self.superpixel_recipe, self.num_superpixels)
        _check_segment_budget(self.num_segment_tokens)

    def preprocess(self, images, superpixels=None, **kwargs) -> BatchFeature:
        r"""
        images (`ImageInput`):
            One image or a list of images (PIL, numpy or torch, channels first or last; file paths are loaded).
        superpixels (`np.ndarray`, `torch.Tensor` or list of them, *optional*):
            Precomputed integer label maps, one `[H, W]` per image at the *input* size; they are resized (nearest)
            and cropped like the images and made consecutive, instead of computing superpixels.
        """
        return super().preprocess(images, superpixels, **kwargs)

    def to_dict(self):
        output = super().to_dict()
        output["num_workers"] = self.num_workers  # saved even when None (= all cores)
        return output

    # ----------------------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------------------

    def _prepare_images_structure(self, images, expected_ndims=3):
        """A flat list of single images, with clear errors for empty batches and non-images."""
        if isinstance(images, str):
            images = [images]
        if _is_array(images) and np.ndim(images) == 4:
            images = list(images)
        elif isinstance(images, PIL.Image.Image) or _is_array(images):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise TypeError(
                f"Expected an image (PIL.Image, numpy array, torch tensor, path) or a list of them, got "
                f"{type(images).__name__}."
            )
        if len(images) == 0:
            raise ValueError("Got an empty batch: pass at least one image.")
        prepared = []
        for index, image in enumerate(images):
            if isinstance(image, str):
                image = self.fetch_images(image)
            if not (isinstance(image, PIL.Image.Image) or _is_array(image)):
                raise TypeError(
                    f"Image {index} is a {type(image).__name__}, not an image (PIL.Image, numpy array, torch tensor "
                    "or path)."
                )
            prepared.append(image)
        return prepared

    def process_image(
        self, image, do_convert_rgb=None, input_data_format=None, max_image_pixels=None, do_rescale=None, **kwargs
    ):
        """One input image as 8-bit RGB `uint8 [H, W, 3]` (channels last: what PIL and OpenCV work on)."""
        max_image_pixels = max_image_pixels or self.max_image_pixels
        if not (self.do_rescale if do_rescale is None else do_rescale):
            _check_already_rescaled(image)
        if isinstance(image, PIL.Image.Image):
            _check_image_size(image.height, image.width, max_image_pixels)
            return _pil_to_rgb(image)
        return _array_to_rgb(image, input_data_format, max_image_pixels)

    def _preprocess_image_like_inputs(self, images, superpixels, **kwargs):
        images = self._prepare_image_like_inputs(images, **kwargs)
        if superpixels is not None:
            superpixels = _check_precomputed_superpixels(superpixels, images)
        return self._preprocess(images, superpixels=superpixels, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Transforms (on 8-bit RGB [H, W, 3] images and integer [H, W] label maps)
    # ----------------------------------------------------------------------------------------------------------

    def resize(self, image, size, resample=None, max_image_pixels=None, **kwargs):
        """Resize with PIL (as torchvision does on PIL images); label maps `[H, W]` always use nearest."""
        height, width = image.shape[:2]
        new_height, new_width = _resize_output_size(height, width, size)
        _check_image_size(new_height, new_width, max_image_pixels or self.max_image_pixels, what="resized image")
        if image.ndim == 2:
            resized = PIL.Image.fromarray(image.astype(np.int32)).resize((new_width, new_height), PIL.Image.NEAREST)
            return np.asarray(resized).astype(np.int64)
        resample = PILImageResampling.BILINEAR if resample is None else resample
        return np.asarray(PIL.Image.fromarray(image).resize((new_width, new_height), resample=resample))

    def center_crop(self, image, size, fill_value=0, **kwargs):
        """Centre crop as `torchvision.transforms.functional.center_crop`: rounded offsets, zero padding when the
        image is smaller than the crop (label maps are padded with `fill_value`)."""
        if size is None or size.height is None or size.width is None:
            raise ValueError(f"crop_size must have 'height' and 'width', got {size}.")
        crop_height, crop_width = size.height, size.width
        height, width = image.shape[:2]
        if crop_height > height or crop_width > width:
            pad_top = max(crop_height - height, 0) // 2
            pad_left = max(crop_width - width, 0) // 2
            pad_bottom = (max(crop_height - height, 0) + 1) // 2
            pad_right = (max(crop_width - width, 0) + 1) // 2
            padding = ((pad_top, pad_bottom), (pad_left, pad_right)) + ((0, 0),) * (image.ndim - 2)
            image = np.pad(image, padding, constant_values=fill_value)
            height, width = image.shape[:2]
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        return image[top : top + crop_height, left : left + crop_width]

    def rescale(self, image, scale, **kwargs):
        """`[H, W, 3]` uint8 -> `[3, H, W]` float32 divided by `1 / scale` (as `ToTensor` divides by 255)."""
        return np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / np.float32(1.0 / scale)

    def normalize(self, image, mean, std, **kwargs):
        """`(x - mean) / std` per channel of a `[3, H, W]` float32 image, in float32 (as torchvision)."""
        mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        return (image - mean) / std

    def _preprocess(
        self,
        images,
        superpixels=None,
        do_resize=True,
        size=None,
        resample=None,
        do_center_crop=True,
        crop_size=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=None,
        image_std=None,
        superpixel_method="seeds",
        superpixel_recipe="self_supervised",
        num_superpixels=DEFAULT_NUM_SUPERPIXELS,
        superpixel_reference_size=REFERENCE_SIZE,
        num_workers=None,
        max_image_pixels=None,
        max_superpixels=DEFAULT_MAX_SUPERPIXELS,
        num_segment_tokens=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        _check_superpixel_settings(superpixel_method, superpixel_recipe, num_superpixels)
        _check_segment_budget(num_segment_tokens)
        if superpixels is None:  # before resizing any image or computing superpixels
            for index, image in enumerate(images):
                height, width = image.shape[:2]
                if do_resize:
                    height, width = _resize_output_size(height, width, size)
                if do_center_crop:
                    height, width = crop_size.height, crop_size.width
                count = scaled_num_superpixels(height, width, num_superpixels, superpixel_reference_size)
                if num_segment_tokens is not None:
                    count = min(count, num_segment_tokens)
                check_superpixel_count(count, max_superpixels, f"Image {index} ({height}x{width} pixels processed)")
        crops, pixel_values = [], []
        for image in images:
            if do_resize:
                image = self.resize(image, size, resample, max_image_pixels)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            crops.append(image)
            # do_rescale=False: the inputs were floats in [0, 1], read as 8 bit (x 255, rounded); / 255 undoes that.
            values = self.rescale(image, rescale_factor if do_rescale else 1 / 255)
            if do_normalize:
                values = self.normalize(values, image_mean, image_std)
            pixel_values.append(values)

        if superpixels is not None:  # precomputed: the same geometry as the images, nearest
            label_maps = []
            for label_map in superpixels:
                if do_resize:
                    label_map = self.resize(label_map, size, max_image_pixels=max_image_pixels)
                if do_center_crop:
                    label_map = self.center_crop(label_map, crop_size, fill_value=-1)
                label_maps.append(limit_segment_count(relabel_consecutive(label_map), num_segment_tokens))
                count = int(label_maps[-1].max()) + 1
                check_superpixel_count(count, max_superpixels, f"superpixels[{len(label_maps) - 1}]", estimated=False)
            superpixels = label_maps
        else:
            superpixels = self._compute_superpixels(
                crops, pixel_values, superpixel_method, superpixel_recipe, num_superpixels,
                superpixel_reference_size, num_workers, do_normalize, image_mean, image_std, num_segment_tokens,
            )  # fmt: skip

        if return_tensors is not None:
            shapes = sorted({values.shape[1:] for values in pixel_values})
            if len(shapes) > 1:
                raise ValueError(
                    f"The processed images have different sizes {shapes}, so they cannot be stacked into one tensor: "
                    "keep do_center_crop=True (or resize to a fixed height and width), or pass return_tensors=None."
                )
            pixel_values, superpixels = np.stack(pixel_values), np.stack(superpixels)
        return BatchFeature(
            data={"pixel_values": pixel_values, "superpixels": superpixels}, tensor_type=return_tensors
        )

    def _compute_superpixels(
        self, crops, pixel_values, method, recipe, num_superpixels, reference_size, num_workers,
        do_normalize, image_mean, image_std, num_segment_tokens=None,
    ):  # fmt: skip
        """Superpixels of the 8-bit crops; the DeiT recipe sees the normalised crop truncated back to 8 bit. With a
        token budget the requests are lowered to fit it and the maps capped (see `num_segment_tokens`)."""
        if method == "seeds" and get_seeds_recipe(recipe).from_normalized and do_normalize:
            crops = [
                denormalize_to_uint8(values, image_mean, image_std, rounding="truncate") for values in pixel_values
            ]
        counts = [scaled_num_superpixels(*crop.shape[:2], num_superpixels, reference_size) for crop in crops]
        if num_segment_tokens is not None:
            counts = [
                budgeted_request(method, *crop.shape[:2], count, num_segment_tokens)
                for crop, count in zip(crops, counts)
            ]
        label_maps = batch_superpixels(crops, method, counts, recipe, num_workers)
        return [limit_segment_count(label_map, num_segment_tokens) for label_map in label_maps]

    # ----------------------------------------------------------------------------------------------------------
    # Post-processing
    # ----------------------------------------------------------------------------------------------------------

    def post_process_hierarchical_segmentation(self, outputs, superpixels, target_sizes=None):
        """Pixel label maps of every level of the part-to-whole hierarchy.

        Args:
            outputs: model outputs with `hierarchy` (tuple over levels 1..L of int64 `[B, N_1]`: the group of each
                superpixel at that level).
            superpixels (`torch.Tensor` or `np.ndarray` of shape `[B, H, W]`): the superpixels given to the model.
            target_sizes (list of `(height, width)`, *optional*): resize each image's maps to this size (nearest).

        Returns:
            A list over images of lists of int64 `[height, width]` tensors: level 0 (the superpixels as the model
            saw them: a superpixel without a token takes the label of its grid cell), then levels 1..L. Every
            level-l region is a union of level-(l-1) regions. All levels of the batch are painted at once and
            resized in one call (one per image when the target sizes differ); see `segment_statistics` for the
            segments' areas, bounding boxes and parents.
        """
        level_maps = hierarchy_level_maps(outputs, superpixels)  # [B, L + 1, H, W]
        target_sizes = _check_target_sizes(target_sizes, level_maps.shape[0])
        if target_sizes is None:
            resized = list(level_maps)
        elif len(set(target_sizes)) == 1:
            resized = list(resize_label_maps(level_maps, target_sizes[0]))
        else:
            resized = [resize_label_maps(maps, size) for maps, size in zip(level_maps, target_sizes)]
        return [list(maps) for maps in resized]

    def post_process_semantic_segmentation(self, outputs, target_sizes=None, superpixels=None):
        """Class label maps from segmentation logits.

        Args:
            outputs: model outputs with `logits`, either per pixel `[B, num_labels, H, W]` or per superpixel
                `[B, N_1, num_labels]` (then `superpixels` `[B, H, W]` paints them to pixels).
            target_sizes (list of `(height, width)`, *optional*): logits are resized (bilinear) before the argmax.

        Returns:
            A list over images of int64 `[height, width]` tensors.
        """
        logits = outputs.logits
        if logits.dim() == 3:
            if superpixels is None:
                raise ValueError("Per-segment logits [B, N, num_labels] need `superpixels` to paint them to pixels.")
            superpixels = torch.as_tensor(superpixels).long().to(logits.device)
            logits = paint_segments(logits, superpixels).permute(0, 3, 1, 2)  # [B, num_labels, H, W]
        if logits.dim() != 4:
            raise ValueError(f"Expected logits [B, num_labels, H, W], got shape {tuple(logits.shape)}.")
        target_sizes = _check_target_sizes(target_sizes, logits.shape[0])
        results = []
        for index in range(logits.shape[0]):
            image_logits = logits[index : index + 1]
            if target_sizes is not None:
                image_logits = F.interpolate(
                    image_logits.float(), size=tuple(target_sizes[index]), mode="bilinear", align_corners=False
                )
            results.append(image_logits[0].argmax(dim=0))
        return results


# --------------------------------------------------------------------------------------------------------------
# Post-processing helpers (shared with the pipelines)
# --------------------------------------------------------------------------------------------------------------


def hierarchy_level_maps(outputs, superpixels):
    """The label maps of every level, painted at the model's resolution: int64 `[B, L + 1, H, W]` (level 0, the
    superpixels as the model saw them, first). Checks `superpixels` against the model's `hierarchy`."""
    hierarchy = getattr(outputs, "hierarchy", None)
    if hierarchy is None:
        raise ValueError("`outputs` has no `hierarchy`: pass the outputs of a CAST model.")
    superpixels = torch.as_tensor(superpixels).long().to(hierarchy[0].device)
    if superpixels.dim() != 3 or superpixels.shape[0] != hierarchy[0].shape[0]:
        raise ValueError(
            f"superpixels must be [B, H, W] with B = {hierarchy[0].shape[0]}, got {tuple(superpixels.shape)}."
        )
    if superpixels.max() >= hierarchy[0].shape[1] or superpixels.min() < 0:
        raise ValueError(f"superpixel labels must lie in 0..{hierarchy[0].shape[1] - 1} (the model's segments).")
    if hasattr(outputs, "hierarchy_maps"):  # knows how its model pooled segments (stride-8 grid or full size)
        level_maps = outputs.hierarchy_maps(superpixels)  # L+1 x [B, H, W]
    else:
        level_maps = paint_hierarchy(hierarchy, superpixels)
    return torch.stack(level_maps, dim=1)


def nearest_sampling_indices(source_size, target_size):
    """The rows `[height]` and columns `[width]` (int64, non-decreasing) of a `source_size` map that
    `segment_ops.resize_label_maps` samples for `target_size = (height, width)`: `maps[..., rows[:, None], cols]`
    is that resize (found by resizing the row and column numbers with it, so the two never disagree)."""
    source_height, source_width = (int(v) for v in source_size)
    height, width = (int(v) for v in target_size)
    rows = resize_label_maps(torch.arange(source_height).unsqueeze(1), (height, 1))[:, 0]
    columns = resize_label_maps(torch.arange(source_width).unsqueeze(0), (1, width))[0]
    return rows, columns


def segment_statistics(label_maps, target_sizes=None, with_parents=True):
    """Area, bounding box and parent of every segment of every level of a batch, as they are once each image's maps
    are resized (nearest, `segment_ops.resize_label_maps`) to its target size, computed without resizing.

    The levels must be functions of level 0 (every level-0 segment lies in one segment of each level: true of
    `hierarchy_level_maps`, and of a single level). So one pass over the pixels finds each level-0 segment's label
    at every level, its area (a pixel counts as often as the resize copies it) and its first / last target row and
    column (bincounts); every level's segments then follow by reductions over the level-0 segments, for all images
    and levels at once.

    Args:
        label_maps (int `[B, L, H, W]`): non-negative label maps, level 0 first (e.g. `hierarchy_level_maps`).
        target_sizes (list of `(height, width)`, *optional*): per image; default `(H, W)` (no resize).
        with_parents (`bool`): also the parents (the segment of level l + 1 that holds each level-l segment).

    Returns:
        dict of int64 tensors, with S = the largest label + 1: `areas` `[B, L, S]` (0 for labels absent after the
        resize), `boxes` `[B, L, S, 4]` (`x0, y0, x1, y1` in target pixels, ends exclusive; 0 for absent labels)
        and, with `with_parents`, `parents` `[B, L, S]` (-1 at the last level and for absent labels).
    """
    label_maps = label_maps.long()
    batch, num_levels, height, width = label_maps.shape
    device = label_maps.device
    target_sizes = _check_target_sizes(target_sizes, batch) or [(height, width)] * batch
    level0 = label_maps[:, 0].reshape(batch, height * width)  # [B, P]
    num_parts = int(level0.max()) + 1  # level-0 labels
    num_labels = max(num_parts, int(label_maps.max()) + 1)
    # The label of each level-0 segment at every level: [B, L, S0].
    labels_of_parts = torch.zeros(batch, num_levels, num_parts, dtype=torch.long, device=device)
    labels_of_parts.scatter_(2, level0.unsqueeze(1).expand(-1, num_levels, -1), label_maps.flatten(2))

    # Level-0 segments at the target size: areas and the target rows / columns their pixels are copied to.
    samplings = {size: _sampling_of((height, width), size) for size in set(target_sizes)}  # counts, first, end
    row_counts, row_first, row_end = (torch.stack([samplings[s][0][i] for s in target_sizes]) for i in range(3))
    column_counts, column_first, column_end = (
        torch.stack([samplings[s][1][i] for s in target_sizes]) for i in range(3)
    )  # [B, H] and [B, W] each
    copies = (row_counts[:, :, None] * column_counts[:, None, :]).to(device).reshape(-1)  # [B * P]
    part_index = (level0 + num_parts * torch.arange(batch, device=device).unsqueeze(1)).reshape(-1)  # [B * P]
    part_areas = torch.bincount(part_index, weights=copies.double(), minlength=batch * num_parts)
    part_areas = part_areas.long().reshape(batch, num_parts)
    # x0, y0 (amin) and x1, y1 (amax) of every level-0 segment over the pixels the resize copies: [B * S0, 4].
    dropped = copies == 0
    part_boxes = []
    for values, reduce in (
        (column_first[:, None, :], "amin"),
        (row_first[:, :, None], "amin"),
        (column_end[:, None, :], "amax"),
        (row_end[:, :, None], "amax"),
    ):
        values = values.to(device).expand(batch, height, width).reshape(-1)
        unused = torch.iinfo(torch.long).max if reduce == "amin" else -1
        values = values.masked_fill(dropped, unused)
        part_boxes.append(
            torch.full((batch * num_parts,), unused, device=device).scatter_reduce_(0, part_index, values, reduce)
        )
    part_boxes = torch.stack(part_boxes, dim=-1).reshape(batch, num_parts, 4)

    # Every level: reductions over its level-0 segments (those the resize keeps).
    present = (part_areas > 0).unsqueeze(1).expand(-1, num_levels, -1)  # [B, L, S0]
    offsets = torch.arange(batch * num_levels, device=device).reshape(batch, num_levels, 1) * num_labels
    index = (labels_of_parts + offsets)[present]  # [M], the segment of each kept level-0 segment at each level
    total = batch * num_levels * num_labels
    weights = part_areas.unsqueeze(1).expand(-1, num_levels, -1)[present].double()
    areas = torch.bincount(index, weights=weights, minlength=total).long()
    corners = part_boxes.unsqueeze(1).expand(-1, num_levels, -1, -1)[present]  # [M, 4]
    boxes = torch.zeros(total, 4, dtype=torch.long, device=device)
    boxes[:, :2].scatter_reduce_(0, index[:, None].expand(-1, 2), corners[:, :2], reduce="amin", include_self=False)
    boxes[:, 2:].scatter_reduce_(0, index[:, None].expand(-1, 2), corners[:, 2:], reduce="amax", include_self=False)
    result = {
        "areas": areas.reshape(batch, num_levels, num_labels),
        "boxes": boxes.reshape(batch, num_levels, num_labels, 4),
    }
    if with_parents:
        parents = torch.full((total,), -1, dtype=torch.long, device=device)
        if num_levels > 1:  # the parent of a level-l segment: the level-(l + 1) label of any of its parts
            coarse = torch.cat([labels_of_parts[:, 1:], torch.full_like(labels_of_parts[:, :1], -1)], dim=1)
            parents.scatter_reduce_(0, index, coarse[present], reduce="amax", include_self=True)
        result["parents"] = parents.reshape(batch, num_levels, num_labels)
    return result


def _sampling_of(source_size, target_size):
    """How `resize_label_maps` from `source_size` to `target_size` copies rows and columns: for each axis, int64
    `[source length]` tensors of copy counts, first target index and end (one past the last; = first if none)."""
    sampled = nearest_sampling_indices(source_size, target_size)
    axes = []
    for indices, length in zip(sampled, source_size):
        positions = torch.arange(length)
        first = torch.searchsorted(indices, positions, right=False)
        end = torch.searchsorted(indices, positions, right=True)
        axes.append((end - first, first, end))
    return axes


def budgeted_request(method, height, width, num_superpixels, num_segment_tokens):
    """The superpixel count to request from `method` on a `height x width` image so that it returns at most
    `num_segment_tokens` labels: SEEDS returns exactly `seeds_num_superpixels(height, width, request)` (its block
    grid), so the request is lowered until that grid fits; the grid method returns about the request; SLIC's count
    varies (`limit_segment_count` caps what is still over)."""
    request = min(int(num_superpixels), int(num_segment_tokens))
    if method == "seeds":
        while request > 1 and seeds_num_superpixels(height, width, request) > num_segment_tokens:
            request -= 1
    return request


def limit_segment_count(labels, max_segments):
    """Merge segments of a consecutive label map `[H, W]` (numpy int) until it has at most `max_segments` labels:
    repeatedly, the smallest segment (the lowest id among equals) joins the neighbour (4-connected) it shares the
    most border pixels with (the lowest id among equals); labels stay consecutive and in their order. Every returned
    segment is a union of input segments. Returns the map unchanged when it is within the budget or `max_segments`
    is None."""
    labels = np.asarray(labels)
    if max_segments is None or labels.size == 0 or int(labels.max()) < max_segments:
        return labels
    labels = labels.astype(np.int64, copy=True)
    while int(labels.max()) + 1 > max_segments:
        sizes = np.bincount(labels.ravel())
        smallest = int(np.argmin(sizes))
        inside = labels == smallest
        neighbours = [
            labels[:, 1:][inside[:, :-1] & ~inside[:, 1:]],
            labels[:, :-1][inside[:, 1:] & ~inside[:, :-1]],
            labels[1:, :][inside[:-1, :] & ~inside[1:, :]],
            labels[:-1, :][inside[1:, :] & ~inside[:-1, :]],
        ]
        neighbours = np.concatenate(neighbours)
        if neighbours.size == 0:  # a segment without neighbours (the whole map): cannot merge further
            break
        target = int(np.argmax(np.bincount(neighbours)))
        labels[inside] = target
        labels[labels > smallest] -= 1
    return labels


def check_superpixel_count(count, max_superpixels, what, estimated=True):
    """Refuse an image whose superpixel count (CAST's level-1 token count) exceeds `max_superpixels`.

    The cost model: tokens grow with the image area (`num_superpixels` per `superpixel_reference_size`^2 pixels,
    196 per 224^2 by default), and every ViT block's attention holds a tokens x tokens score map per head and image,
    so attention memory and time grow with the square of the count (the model checks its own limit on that memory,
    `config.max_attention_memory`)."""
    if max_superpixels is None or count <= max_superpixels:
        return
    map_gib = count * count * 4 / 2**30
    about = "about " if estimated else ""
    raise ValueError(
        f"{what} would have {about}{count:,} superpixels, more than max_superpixels={max_superpixels:,}. CAST makes "
        f"one token per superpixel (the count grows with the image area) and its attention memory grows with the "
        f"square of the token count: one {count:,} x {count:,} float32 attention map is {map_gib:.1f} GiB per head "
        "and image. Resize the image (do_resize=True, or a smaller `size`), request fewer superpixels "
        "(num_superpixels), or raise max_superpixels (None disables this check)."
    )


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _is_array(obj):
    return isinstance(obj, (np.ndarray, torch.Tensor))


def _check_image_size(height, width, max_image_pixels, what="image"):
    if height < 1 or width < 1:
        raise ValueError(f"The {what} is empty ({height}x{width} pixels).")
    if height * width > max_image_pixels:
        raise ValueError(
            f"The {what} has {height}x{width} = {height * width} pixels, more than max_image_pixels="
            f"{max_image_pixels}: downscale it first or raise max_image_pixels."
        )


def _check_segment_budget(num_segment_tokens):
    if num_segment_tokens is not None and (isinstance(num_segment_tokens, bool) or int(num_segment_tokens) < 1):
        raise ValueError(f"num_segment_tokens must be a positive token count or None, got {num_segment_tokens!r}.")


def _check_superpixel_settings(method, recipe, num_superpixels):
    if method not in SUPERPIXEL_METHODS:
        raise ValueError(f"superpixel_method must be one of {SUPERPIXEL_METHODS}, got {method!r}.")
    get_seeds_recipe(recipe)
    if int(num_superpixels) < 1:
        raise ValueError(f"num_superpixels must be >= 1, got {num_superpixels}.")


def _check_already_rescaled(image):
    """`do_rescale=False` means the pixels are already in [0, 1] (transformers' convention): float images only."""
    if isinstance(image, PIL.Image.Image):
        is_float, kind = image.mode == "F", f"a PIL image of mode {image.mode!r}"
    elif isinstance(image, torch.Tensor):
        is_float, kind = image.is_floating_point(), f"a tensor of dtype {image.dtype}"
    else:
        is_float, kind = np.issubdtype(image.dtype, np.floating), f"an array of dtype {image.dtype}"
    if not is_float:
        raise ValueError(
            f"do_rescale=False says the pixels are already rescaled to [0, 1], but the image is {kind} (0..255 "
            "values): keep do_rescale=True for 8-bit images, or pass float images in [0, 1]."
        )


def _pil_to_rgb(image):
    """8-bit RGB `[H, W, 3]` from any PIL image (EXIF orientation applied, transparency over white)."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "F":  # float images follow the array rules (values in [0, 1])
        return _array_to_rgb(np.asarray(image))
    if image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit images, scaled to 8 bit
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"A PIL image of mode {image.mode!r} must hold 16-bit values (0..65535).")
        return _array_to_rgb(array.astype(np.uint16))
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(white, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error
    return np.asarray(image)


def _array_to_rgb(array, input_data_format=None, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """8-bit RGB `[H, W, 3]` from a numpy / torch image `[H, W]`, `[H, W, C]` or `[C, H, W]` with C in 1, 3, 4."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()  # numpy has no bfloat16
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = np.moveaxis(array, _channel_axis(array.shape, input_data_format), -1)
    else:
        raise ValueError(f"An image must have 2 or 3 dimensions, got shape {array.shape}.")
    height, width, channels = array.shape
    _check_image_size(height, width, max_image_pixels)
    array = _to_uint8(array)
    if channels == 4:
        return _pil_to_rgb(PIL.Image.fromarray(np.ascontiguousarray(array)))  # RGBA
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _channel_axis(shape, input_data_format):
    """0 (channels first) or 2 (channels last); refuses shapes that could be either."""
    if input_data_format is not None:
        layout = ChannelDimension(input_data_format)
        axis = 0 if layout == ChannelDimension.FIRST else 2
        if shape[axis] not in (1, 3, 4):
            raise ValueError(f"input_data_format={layout.value} but dimension {axis} of {shape} is not 1, 3 or 4.")
        return axis
    first, last = shape[0] in (1, 3, 4), shape[2] in (1, 3, 4)
    if first and last:
        raise ValueError(
            f"Cannot tell whether an image of shape {shape} is channels first or channels last: pass "
            "input_data_format='channels_first' or 'channels_last'."
        )
    if not (first or last):
        raise ValueError(f"An image needs 1, 3 or 4 channels first or last, got shape {shape}.")
    return 0 if first else 2


def _to_uint8(array):
    """8-bit values from uint8, 16-bit (/257), other integers in 0..255 or floats in [0, 1] (rounded)."""
    if array.dtype == np.uint8:
        return array
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == np.bool_ or not numeric:
        raise TypeError(f"Unsupported image dtype {array.dtype}: use uint8, uint16, integers in 0..255 or floats.")
    if array.dtype == np.uint16:
        return np.rint(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("The image contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Float images must have values in [0, 1], got [{low:g}, {high:g}]; pass uint8 arrays for 0..255."
            )
        return np.rint(array * 255.0).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"Integer images must have values in 0..255 (or be uint16), got [{low}, {high}].")
    return array.astype(np.uint8)


def _resize_output_size(height, width, size):
    """`(height, width)` after resizing with a `SizeDict`; `shortest_edge` alone follows `torchvision.Resize(int)`."""
    if size.shortest_edge and size.longest_edge:
        return get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    if size.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.max_height and size.max_width:
        return get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(
        f"size must have 'shortest_edge', 'height' and 'width', or 'max_height' and 'max_width'; got {dict(size)}."
    )


def _check_precomputed_superpixels(superpixels, images):
    """A list of int64 `[H, W]` label maps matching the prepared images one to one."""
    if _is_array(superpixels) and np.ndim(superpixels) == 2:
        superpixels = [superpixels]
    superpixels = list(superpixels)
    if len(superpixels) != len(images):
        raise ValueError(f"Got {len(superpixels)} superpixel maps for {len(images)} images.")
    checked = []
    for index, (label_map, image) in enumerate(zip(superpixels, images)):
        if isinstance(label_map, torch.Tensor):
            label_map = label_map.detach().cpu().numpy()
        label_map = np.asarray(label_map)
        if not np.issubdtype(label_map.dtype, np.integer):
            raise TypeError(f"superpixels[{index}] must hold integer labels, got dtype {label_map.dtype}.")
        if label_map.shape != image.shape[:2]:
            raise ValueError(
                f"superpixels[{index}] has shape {label_map.shape} but image {index} is {image.shape[:2]} (height, "
                "width): precomputed superpixels must match the input image size."
            )
        if label_map.min() < 0:
            raise ValueError(f"superpixels[{index}] has negative labels.")
        checked.append(label_map.astype(np.int64))
    return checked


def _check_target_sizes(target_sizes, batch_size):
    if target_sizes is None:
        return None
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != batch_size:
        raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch_size}.")
    return [tuple(int(v) for v in target_size) for target_size in target_sizes]


__all__ = [
    "CastImageProcessor",
    "budgeted_request",
    "check_superpixel_count",
    "hierarchy_level_maps",
    "limit_segment_count",
    "nearest_sampling_indices",
    "segment_statistics",
]
