"""transformers pipelines for CAST.

With `hf_hierseg` imported, `pipeline(task, model=folder)` needs no `trust_remote_code` for any of these:

- `hierarchical-segmentation` ([`HierarchicalSegmentationPipeline`], registered in transformers' `PIPELINE_REGISTRY`
  when the package is imported): for each level, the segments with their masks and parent links, optionally an
  overlay picture.
- `hierarchical-image-classification` ([`HierarchicalImageClassificationPipeline`], registered likewise): the label
  path an H-CAST model predicts through its taxonomy, a score per level and the segments each level is read from.
- `image-classification` and `image-feature-extraction`: transformers' own pipelines, since `CastImageProcessor`
  returns the `superpixels` that transformers passes to the model beside `pixel_values`.
- `image-segmentation`: transformers' own `ImageSegmentationPipeline` runs a `CastForSemanticSegmentation` folder
  (`CastImageProcessor.post_process_semantic_segmentation`; such folders are saved with a processor that does not
  centre crop, so the masks cover the whole image). transformers logs that the class "is not supported for
  image-segmentation" (it lists only its own models there) and runs it all the same. A folder without a
  segmentation head (`CastModel`, a classifier) gets a randomly initialised head there, with transformers' usual
  warning, as any transformers backbone checkpoint would. The segments of one hierarchy level come from
  `hierarchical-segmentation`, or from [`CastImageSegmentationPipeline`] given a loaded model (given a folder,
  `pipeline("image-segmentation", ...)` would load it with the random head first):

      segment = pipeline("image-segmentation", model=CastModel.from_pretrained(folder), image_processor=folder,
                         pipeline_class=CastImageSegmentationPipeline)
      masks = segment(image, level=3)

Where the package is not installed, a repo shared with `hf_hierseg.hub.push_folder_to_hub` (or a folder prepared
with `hf_hierseg.hub.add_remote_code`) names these classes in `config.json`'s `custom_pipelines`, and
`pipeline("hierarchical-segmentation" | "image-segmentation", model=repo, trust_remote_code=True)` loads them from
the repo. Plain `save_pretrained` folders have no `custom_pipelines`: that entry makes transformers demand
`trust_remote_code` for the task even where the package is installed.

This module is shipped as remote code: relative imports only. The pipelines accept package and remote-code models
alike (they check `config.model_type`, never `isinstance`).
"""

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import load_image
from transformers.pipelines import ImageSegmentationPipeline, Pipeline

from .configuration_cast import check_is_cast
from .segment_ops import resize_label_maps
from .visualization import overlay_labels


NUM_LEVELS = 4
DEFAULT_SEGMENTATION_LEVEL = 3


def whole_image_size(image_processor):
    """Processor arguments that keep the whole picture: resized to the crop size (default 224x224), no centre crop,
    so segment masks map back onto the full input image."""
    crop = getattr(image_processor, "crop_size", None) or {}
    height, width = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop.height, crop.width)
    if not height or not width:
        return {}
    return {"do_center_crop": False, "size": {"height": height, "width": width}}


def cast_preprocess(pipeline, image, timeout=None):
    """Load one image (path, URL or PIL) and run the image processor on the whole picture: `pixel_values`,
    `superpixels`, plus the original size (`target_size`) and, for overlays, the picture itself."""
    image = load_image(image, timeout=timeout)
    processor = pipeline.image_processor
    inputs = processor(images=[image], return_tensors="pt", **whole_image_size(processor))
    if "superpixels" not in inputs:
        raise ValueError(f"{type(processor).__name__} returned no `superpixels`; use CastImageProcessor.")
    inputs = inputs.to(pipeline.dtype) if pipeline.dtype is not None else inputs
    model_inputs = {"pixel_values": inputs["pixel_values"], "superpixels": inputs["superpixels"]}
    # One-element lists: after batching, each image gets its own list back (as in ImageSegmentationPipeline).
    model_inputs["target_size"] = [(image.height, image.width)]
    model_inputs["image"] = [image]
    return model_inputs


def binary_mask(label_map, label):
    return Image.fromarray(((label_map == label) * 255).astype(np.uint8))  # 2-D uint8: mode "L"


class HierarchicalSegmentationPipeline(Pipeline):
    """
    Part-to-whole segmentation of images with a CAST model (`CastModel`, `CastForImageClassification` or
    `CastForSemanticSegmentation`, package or remote code).

    Call with an image (path, URL or PIL image) or a list of them; `batch_size` batches the model calls. Options:
    `levels` (default `(1, 2, 3, 4)`; 0 adds the superpixels as the model saw them), `overlay` (add each level's
    segments drawn over the image), `timeout` (for URLs).

    Returns, per image, `{"size": (height, width), "levels": [...]}` with, for each level, `"level"`,
    `"segmentation"` (int64 numpy `[height, width]` of segment ids), `"segments"` (a list of `{"id", "parent",
    "area", "mask"}`: `parent` is the id of the enclosing segment at the next level, `None` at level 4; `mask` is a
    binary PIL "L" image) and, with `overlay=True`, `"overlay"` (the image blended with segment colours, boundaries
    drawn, PIL RGB).

    Note: with `config.mask_padding_tokens=False` (the original CAST) images batched together influence each other
    through padding tokens; use `batch_size=1` (the default) for results independent of the batch.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_is_cast(self.model, type(self).__name__)

    def _sanitize_parameters(self, levels=None, overlay=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if levels is not None:
            levels = (levels,) if isinstance(levels, int) else tuple(levels)
            if not levels or any(not isinstance(level, int) or not 0 <= level <= NUM_LEVELS for level in levels):
                raise ValueError(f"`levels` must be integers in 0..{NUM_LEVELS}, got {levels}.")
            postprocess_params["levels"] = tuple(sorted(set(levels)))
        if overlay is not None:
            postprocess_params["overlay"] = bool(overlay)
        if kwargs:
            raise ValueError(f"Unknown arguments for hierarchical-segmentation: {sorted(kwargs)}.")
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout=None):
        return cast_preprocess(self, image, timeout)

    def _forward(self, model_inputs):
        target_size, image = model_inputs.pop("target_size"), model_inputs.pop("image")
        outputs = self.model(**model_inputs, return_dict=True)
        # [B, 5, H, W]: level 0 (superpixels as the model saw them) and levels 1..4, one tensor so batches split.
        label_maps = torch.stack(outputs.hierarchy_maps(model_inputs["superpixels"]), dim=1)
        return {"label_maps": label_maps, "target_size": target_size, "image": image}

    def postprocess(self, model_outputs, levels=(1, 2, 3, 4), overlay=False):
        (height, width), image = model_outputs["target_size"][0], model_outputs["image"][0]
        label_maps = resize_label_maps(model_outputs["label_maps"][0], (height, width)).numpy()  # [5, h, w]
        result = []
        for level in levels:
            segmentation = label_maps[level]
            ids, areas = np.unique(segmentation, return_counts=True)
            parents = {}
            if level < NUM_LEVELS:  # levels nest, so each segment lies in exactly one segment of the next level
                pairs = np.unique(np.stack([segmentation.ravel(), label_maps[level + 1].ravel()], axis=1), axis=0)
                parents = {int(child): int(parent) for child, parent in pairs}
            segments = [
                {"id": int(i), "parent": parents.get(int(i)), "area": int(area), "mask": binary_mask(segmentation, i)}
                for i, area in zip(ids, areas)
            ]
            entry = {"level": level, "segmentation": segmentation, "segments": segments}
            if overlay:
                entry["overlay"] = Image.fromarray(overlay_labels(image, segmentation))
            result.append(entry)
        return {"size": (height, width), "levels": result}


class CastImageSegmentationPipeline(ImageSegmentationPipeline):
    """
    `image-segmentation` for CAST: with `CastForSemanticSegmentation` (a segmentation head), one mask per predicted
    class (`label` from `config.id2label`); with other CAST models, one mask per segment of hierarchy `level`
    (default 3; `label` is `"level<l>-<id>"`). `score` is `None`, as for transformers' semantic segmentation.
    The image is processed whole (resized, never centre cropped), so the masks cover the whole input image.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        Pipeline.__init__(self, *args, **kwargs)  # CAST is in none of transformers' segmentation mappings
        check_is_cast(self.model, type(self).__name__)

    def _sanitize_parameters(self, level=None, subtask=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if subtask not in (None, "semantic"):
            raise ValueError(f"CAST gives semantic segmentation only; `subtask` must be 'semantic', got {subtask!r}.")
        if level is not None:
            if not isinstance(level, int) or not 0 <= level <= NUM_LEVELS:
                raise ValueError(f"`level` must be an integer in 0..{NUM_LEVELS}, got {level!r}.")
            postprocess_params["level"] = level
        if kwargs:
            raise ValueError(f"Unknown arguments for CAST image-segmentation: {sorted(kwargs)}.")
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout=None):
        return cast_preprocess(self, image, timeout)

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        model_inputs.pop("image")
        outputs = self.model(**model_inputs, return_dict=True)
        logits = getattr(outputs, "logits", None)
        if logits is not None and logits.dim() == 4:  # [B, num_labels, H, W] from a segmentation head
            return {"semantic": logits.argmax(dim=1), "target_size": target_size}
        label_maps = torch.stack(outputs.hierarchy_maps(model_inputs["superpixels"]), dim=1)
        return {"label_maps": label_maps, "target_size": target_size}

    def postprocess(self, model_outputs, level=DEFAULT_SEGMENTATION_LEVEL):
        size = model_outputs["target_size"][0]
        if "semantic" in model_outputs:
            segmentation = resize_label_maps(model_outputs["semantic"][0], size).numpy()
            names = {int(k): v for k, v in self.model.config.id2label.items()}
            return [
                {"score": None, "label": names.get(int(i), str(int(i))), "mask": binary_mask(segmentation, i)}
                for i in np.unique(segmentation)
            ]
        segmentation = resize_label_maps(model_outputs["label_maps"][0, level], size).numpy()
        return [
            {"score": None, "label": f"level{level}-{int(i)}", "mask": binary_mask(segmentation, i)}
            for i in np.unique(segmentation)
        ]


class HierarchicalImageClassificationPipeline(Pipeline):
    """
    Hierarchical classification with an H-CAST model (`CastForHierarchicalImageClassification`, package or remote
    code): per image, the predicted label path through the taxonomy, finest level first, with a score per level and,
    per level, the segments its prediction is read from.

    Label level k reads the CLS token of CAST level `l = config.hierarchy_cast_levels[k]`, which attended to the
    tokens entering that level: the superpixels for l = 1, else the segments of graph pooling l - 1. Those segments
    (hierarchy level l - 1, painted on the image) are returned with the level's prediction. The image is processed
    whole (resized, never centre cropped), so the masks cover the whole input image.

    Call with an image (path, URL or PIL image) or a list of them; options `top_k` (classes listed per level,
    default 1) and `timeout` (for URLs). Returns, per image:

        {"size": (height, width), "labels": [finest label, ..., coarsest label], "consistent": bool,
         "levels": [{"level": k, "name": level name, "label": str, "id": int, "score": float,
                     "top_k": [{"label", "id", "score"}, ...], "cast_level": l, "segmentation": int64 [H, W],
                     "segments": [{"id", "area", "mask"}, ...]}, ...]}

    `consistent` says whether the predicted labels form a path of the taxonomy (each level's class is the parent of
    the finer level's). Scores are the softmax of each level's logits.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_is_cast(self.model, type(self).__name__)
        if not getattr(self.model.config, "hierarchy_num_labels", None):
            raise ValueError(
                f"{type(self).__name__} needs a hierarchical classifier (CastForHierarchicalImageClassification, "
                "a config with `hierarchy_num_labels`), got a model without a taxonomy."
            )

    def _sanitize_parameters(self, top_k=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        if kwargs:
            raise ValueError(f"Unknown arguments for hierarchical-image-classification: {sorted(kwargs)}.")
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout=None):
        return cast_preprocess(self, image, timeout)

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        model_inputs.pop("image")
        outputs = self.model(**model_inputs, return_dict=True)
        # [B, sum(n_k)]: every level's probabilities side by side (finest first), one tensor so batches split.
        probabilities = torch.cat([logits.float().softmax(dim=-1) for logits in outputs.logits_per_level], dim=-1)
        label_maps = torch.stack(outputs.hierarchy_maps(model_inputs["superpixels"]), dim=1)  # [B, 5, H, W]
        return {"probabilities": probabilities, "label_maps": label_maps, "target_size": target_size}

    def postprocess(self, model_outputs, top_k=1):
        config = self.model.config
        size = model_outputs["target_size"][0]
        per_level = model_outputs["probabilities"][0].split(tuple(config.hierarchy_num_labels))
        levels = []
        for level, (probabilities, cast_level) in enumerate(zip(per_level, config.hierarchy_cast_levels)):
            names = config.hierarchy_id2label[level]
            scores, ids = probabilities.topk(min(top_k, probabilities.numel()))
            ranked = [{"label": names[int(i)], "id": int(i), "score": float(score)} for score, i in zip(scores, ids)]
            segmentation = resize_label_maps(model_outputs["label_maps"][0, cast_level - 1], size).numpy()
            segment_ids, areas = np.unique(segmentation, return_counts=True)
            segments = [
                {"id": int(i), "area": int(area), "mask": binary_mask(segmentation, i)}
                for i, area in zip(segment_ids, areas)
            ]
            levels.append(
                {
                    "level": level,
                    "name": config.hierarchy_level_names[level],
                    **ranked[0],
                    "top_k": ranked,
                    "cast_level": cast_level,
                    "segmentation": segmentation,
                    "segments": segments,
                }
            )
        predicted = [entry["id"] for entry in levels]
        consistent = all(
            parents[child] == parent
            for parents, child, parent in zip(config.hierarchy_parents, predicted, predicted[1:])
        )
        return {
            "size": size,
            "labels": [entry["label"] for entry in levels],
            "consistent": consistent,
            "levels": levels,
        }


def register_pipelines():
    """Register `hierarchical-segmentation` and `hierarchical-image-classification` in transformers' pipeline
    registry (idempotent)."""
    from transformers import AutoModel, AutoModelForImageClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, pipeline_class, auto_model in (
        ("hierarchical-segmentation", HierarchicalSegmentationPipeline, AutoModel),
        # CastForHierarchicalImageClassification shares this Auto class with the flat classifier; transformers picks
        # the class of the folder's `config.architectures`.
        (
            "hierarchical-image-classification",
            HierarchicalImageClassificationPipeline,
            AutoModelForImageClassification,
        ),
    ):
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is not pipeline_class:
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=auto_model, type="image")


__all__ = [
    "HierarchicalSegmentationPipeline",
    "CastImageSegmentationPipeline",
    "HierarchicalImageClassificationPipeline",
    "register_pipelines",
]
