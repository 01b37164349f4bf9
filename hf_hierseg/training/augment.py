"""Training augmentations in PIL / NumPy (no torchvision): MoCo-v3's two asymmetric views and DeiT's recipe.

Every view ends the way the original CAST training code ends it, through the run's `CastImageProcessor`
(`encode_view`): the superpixels are computed on the augmented uint8 image, then the image is normalised. All
randomness comes from an explicit `numpy.random.Generator`, so a sample's views are a function of (seed, epoch,
position) and a resumed run re-creates them exactly.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ..superpixels import IMAGENET_MEAN, IMAGENET_STD


# View size (pixels) for which the recipes' absolute settings (blur sigma) are given: ImageNet training crops.
RECIPE_VIEW_SIZE = 224


def random_resized_crop(image, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), resample=Image.BILINEAR):
    """Crop a random area fraction in `scale` with a log-uniform aspect ratio in `ratio`, resized to size x size.

    Ten tries, then the largest central crop whose aspect ratio lies in `ratio`."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return image.resize((size, size), resample, box=(left, top, left + crop_width, top + crop_height))
    aspect = width / height
    if aspect < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return image.resize((size, size), resample, box=(left, top, left + crop_width, top + crop_height))


def adjust_hue(image, shift):
    """Rotate the hue by `shift` turns (in [-0.5, 0.5])."""
    hue, saturation, value = image.convert("HSV").split()
    hue = Image.fromarray((np.asarray(hue, dtype=np.int16) + int(round(shift * 255))).astype(np.uint8), "L")
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def color_jitter(image, rng, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """Brightness, contrast, saturation and hue changes in a random order; factors uniform in [1 - x, 1 + x]."""
    for operation in rng.permutation(4):
        if operation == 0 and brightness:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif operation == 1 and contrast:
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif operation == 2 and saturation:
            image = ImageEnhance.Color(image).enhance(rng.uniform(1 - saturation, 1 + saturation))
        elif operation == 3 and hue:
            image = adjust_hue(image, rng.uniform(-hue, hue))
    return image


def grayscale(image):
    return image.convert("L").convert("RGB")


def gaussian_blur(image, rng, sigma=(0.1, 2.0)):
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*sigma)))


def solarize(image, threshold=128):
    return ImageOps.solarize(image, threshold=threshold)


def random_erasing(
    array, rng, probability=0.25, area=(0.02, 1 / 3), ratio=(0.3, 3.3), mean=IMAGENET_MEAN, std=IMAGENET_STD
):
    """DeiT's random erasing ("pixel" mode) on a uint8 [H, W, 3] array: one box of per-pixel normal noise.

    The original draws N(0, 1) noise in the normalised domain; here the noise is drawn as `mean + std * N(0, 1)`
    in [0, 255] so the superpixels, computed before normalisation, see the erased box too."""
    if rng.random() >= probability:
        return array
    height, width = array.shape[:2]
    for _ in range(10):
        target_area = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        box_height = int(round(math.sqrt(target_area * aspect)))
        box_width = int(round(math.sqrt(target_area / aspect)))
        if 0 < box_height < height and 0 < box_width < width:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            noise = np.asarray(mean) + np.asarray(std) * rng.standard_normal((box_height, box_width, 3))
            array = array.copy()
            array[top : top + box_height, left : left + box_width] = np.clip(noise * 255.0, 0, 255).astype(np.uint8)
            return array
    return array


class RandAugment:
    """RandAugment (Cubuk et al., 2020) as DeiT uses it ("rand-m9-mstd0.5-inc1"): `num_ops` operations drawn
    uniformly, each applied with probability `probability`, at a magnitude drawn from N(magnitude, magnitude_std)
    clipped to [0, 10]; magnitudes only increase the distortion (the "increasing" variants of the operations)."""

    OPERATIONS = (
        "auto_contrast",
        "equalize",
        "invert",
        "rotate",
        "posterize",
        "solarize",
        "solarize_add",
        "color",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    )

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, probability=0.5, fill=(124, 116, 104)):
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.probability = probability
        self.fill = tuple(fill)

    def __call__(self, image, rng):
        for name in rng.choice(self.OPERATIONS, size=self.num_ops, replace=True):
            if rng.random() >= self.probability:
                continue
            magnitude = rng.normal(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
            level = float(np.clip(magnitude, 0.0, 10.0)) / 10.0
            image = self.apply(image, str(name), level, rng)
        return image

    def apply(self, image, name, level, rng):
        """Apply one operation at `level` in [0, 1]; signed operations draw their sign from `rng`."""
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if name == "auto_contrast":
            return ImageOps.autocontrast(image)
        if name == "equalize":
            return ImageOps.equalize(image)
        if name == "invert":
            return ImageOps.invert(image)
        if name == "rotate":
            return image.rotate(sign * 30.0 * level, resample=Image.BILINEAR, fillcolor=self.fill)
        if name == "posterize":
            return ImageOps.posterize(image, max(1, 4 - int(4 * level)))
        if name == "solarize":
            return ImageOps.solarize(image, threshold=256 - int(256 * level))
        if name == "solarize_add":
            array = np.asarray(image, dtype=np.int16)
            added = np.where(array < 128, np.minimum(array + int(110 * level), 255), array)
            return Image.fromarray(added.astype(np.uint8), "RGB")
        if name in ("color", "contrast", "brightness", "sharpness"):
            enhancer = {
                "color": ImageEnhance.Color,
                "contrast": ImageEnhance.Contrast,
                "brightness": ImageEnhance.Brightness,
                "sharpness": ImageEnhance.Sharpness,
            }[name]
            return enhancer(image).enhance(1.0 + sign * 0.9 * level)
        width, height = image.size
        matrix = {
            "shear_x": (1, sign * 0.3 * level, 0, 0, 1, 0),
            "shear_y": (1, 0, 0, sign * 0.3 * level, 1, 0),
            "translate_x": (1, 0, sign * 0.45 * level * width, 0, 1, 0),
            "translate_y": (1, 0, 0, 0, 1, sign * 0.45 * level * height),
        }[name]
        return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=self.fill)


def encode_view(processor, view):
    """An augmented view, uint8 [H, W, 3], as model inputs computed by `processor` (a `CastImageProcessor`) with
    its superpixel and normalisation settings, without resizing or cropping: (pixel_values float32 [3, H, W],
    superpixels int64 [H, W]). The processor is the one saved with the model, so inference computes what training
    computed (the DeiT recipe's SEEDS on the truncated normalised view included)."""
    inputs = processor(
        images=view,
        do_resize=False,
        do_center_crop=False,
        input_data_format="channels_last",
        return_tensors="pt",
    )
    return inputs["pixel_values"][0], inputs["superpixels"][0]


@dataclass
class MocoViewRecipe:
    """One of MoCo-v3's two views (the BYOL recipe): random resized crop, flip, colour jitter, grayscale, blur,
    solarize. The two views differ only in their blur and solarize probabilities. `blur_sigma` is in pixels of a
    224-pixel view and scales with the view size (the same relative blur at any resolution)."""

    crop_scale: tuple = (0.08, 1.0)
    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_probability: float = 0.2
    blur_probability: float = 1.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_probability: float = 0.0

    def __call__(self, image, size, rng):
        image = random_resized_crop(image, size, rng, scale=self.crop_scale, resample=Image.BILINEAR)
        if rng.random() < self.flip_probability:
            image = ImageOps.mirror(image)
        if rng.random() < self.jitter_probability:
            image = color_jitter(image, rng, *self.jitter)
        if rng.random() < self.grayscale_probability:
            image = grayscale(image)
        if rng.random() < self.blur_probability:
            image = gaussian_blur(image, rng, tuple(sigma * size / RECIPE_VIEW_SIZE for sigma in self.blur_sigma))
        if rng.random() < self.solarize_probability:
            image = solarize(image)
        return image


MOCO_VIEW_1 = MocoViewRecipe(blur_probability=1.0, solarize_probability=0.0)
MOCO_VIEW_2 = MocoViewRecipe(blur_probability=0.1, solarize_probability=0.2)


class MocoTransform:
    """Two asymmetric MoCo-v3 views of one image, each with its own superpixels (`encode_view` with `processor`).

    Returns `{"pixel_values": float32 [2, 3, size, size], "superpixels": int64 [2, size, size]}`."""

    def __init__(self, processor, size, views=(MOCO_VIEW_1, MOCO_VIEW_2)):
        self.processor = processor
        self.size = size
        self.views = views

    def __call__(self, image, rng):
        encoded = [
            encode_view(self.processor, np.asarray(view(image, self.size, rng), dtype=np.uint8)) for view in self.views
        ]
        return {
            "pixel_values": torch.stack([pixel_values for pixel_values, _ in encoded]),
            "superpixels": torch.stack([superpixels for _, superpixels in encoded]),
        }


class DeitTransform:
    """DeiT's training view: random resized crop (bicubic), flip, RandAugment (a `RandAugment`, or None to skip
    it), random erasing; then `encode_view` with `processor`.

    Returns `{"pixel_values": float32 [3, size, size], "superpixels": int64 [size, size]}`."""

    def __init__(
        self, processor, size, rand_augment, crop_scale=(0.08, 1.0), flip_probability=0.5, erasing_probability=0.25
    ):
        self.processor = processor
        self.size = size
        self.rand_augment = rand_augment
        self.crop_scale = crop_scale
        self.flip_probability = flip_probability
        self.erasing_probability = erasing_probability

    def __call__(self, image, rng):
        image = random_resized_crop(image, self.size, rng, scale=self.crop_scale, resample=Image.BICUBIC)
        if rng.random() < self.flip_probability:
            image = ImageOps.mirror(image)
        if self.rand_augment is not None:
            image = self.rand_augment(image, rng)
        array = np.asarray(image, dtype=np.uint8)
        if self.erasing_probability > 0:
            array = random_erasing(
                array, rng, self.erasing_probability, mean=self.processor.image_mean, std=self.processor.image_std
            )
        pixel_values, superpixels = encode_view(self.processor, array)
        return {"pixel_values": pixel_values, "superpixels": superpixels}


class ProcessorTransform:
    """Evaluation view by an image processor (e.g. `CastImageProcessor`): exactly what inference computes."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image, rng=None):
        inputs = self.processor(images=image, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"][0], "superpixels": inputs["superpixels"][0].long()}


__all__ = [
    "DeitTransform",
    "MOCO_VIEW_1",
    "MOCO_VIEW_2",
    "MocoTransform",
    "MocoViewRecipe",
    "ProcessorTransform",
    "RandAugment",
    "color_jitter",
    "encode_view",
    "random_erasing",
    "random_resized_crop",
]
