"""The images an evaluation feeds a model: `CastImageProcessor` (superpixels on the 8-bit view, then normalisation,
exactly as at inference), with the settings saved with the model and the view geometry the evaluation needs.

- segmentation: the whole image resized to the model's square input (bilinear, no crop; `square_view`), so that
  label maps cover the whole mask;
- classification: the shorter side resized to `size / crop_fraction`, then a central `size` x `size` crop (bicubic,
  DeiT's evaluation view; `center_crop_view`).
"""

from transformers.image_utils import PILImageResampling

from ..image_processing_cast import CastImageProcessor
from ..loading import load_cast_image_processor


def square_view(image_size):
    """Processor settings: resize to `image_size` x `image_size` (bilinear), no crop."""
    return {
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "do_center_crop": False,
        "resample": PILImageResampling.BILINEAR,
    }


def center_crop_view(image_size, crop_fraction=0.875):
    """Processor settings: shorter side to `image_size / crop_fraction` (256 for 224, bicubic), central crop."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    return {
        "do_resize": True,
        "size": {"shortest_edge": int(image_size / crop_fraction)},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "resample": PILImageResampling.BICUBIC,
    }


def evaluation_processor(
    view, model_name_or_path=None, superpixel_method=None, num_superpixels=None, seeds_recipe=None
):
    """A `CastImageProcessor` with the view geometry `view` (`square_view` / `center_crop_view`) and the other
    settings of the processor saved with `model_name_or_path` (the defaults without a folder or a saved processor),
    unless `superpixel_method`, `num_superpixels` (per 224x224 px) or `seeds_recipe` (`"self_supervised"` or
    `"supervised"`, see `hf_hierseg.superpixels`) are given."""
    saved = load_cast_image_processor(model_name_or_path) if model_name_or_path is not None else None
    superpixels = {
        "superpixel_method": superpixel_method,
        "num_superpixels": num_superpixels,
        "superpixel_recipe": seeds_recipe,
    }
    overrides = {**{key: value for key, value in superpixels.items() if value is not None}, **view}
    return CastImageProcessor.from_dict(saved.to_dict() if saved is not None else {}, **overrides)


def superpixel_settings(processor):
    """The superpixel settings of a `CastImageProcessor`, for reports."""
    return {
        "method": processor.superpixel_method,
        "per_224x224": processor.num_superpixels,
        "seeds_recipe": processor.superpixel_recipe,
    }


__all__ = ["center_crop_view", "evaluation_processor", "square_view", "superpixel_settings"]
