"""transformers pipelines for CAST.

With `hf_hierseg` imported, `pipeline(task, model=folder)` needs no `trust_remote_code` for any of these:

- `hierarchical-segmentation` ([`HierarchicalSegmentationPipeline`], registered in transformers' `PIPELINE_REGISTRY`
  when the package is imported): for each level, the segments with their masks and parent links, optionally an
  overlay picture.
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

import collections
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from transformers.image_utils import load_image
from transformers.pipelines import ImageSegmentationPipeline, Pipeline
from transformers.pipelines.base import no_collate_fn, pad_collate_fn
from transformers.pipelines.pt_utils import PipelineIterator

from .configuration_cast import check_is_cast
from .image_processing_cast import hierarchy_level_maps, nearest_sampling_indices, segment_statistics
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
    model_inputs["target_size"] = torch.tensor([[image.height, image.width]])  # [1, 2], batched to [B, 2]
    # A one-element list: after batching, each image gets its own list back (as in ImageSegmentationPipeline).
    model_inputs["image"] = [image]
    return model_inputs


class LazyMask(Image.Image):
    """The binary mask of one segment, a PIL image of mode "L" (255 inside, 0 outside) whose pixels are computed
    on first use, as PIL reads a file image on first use: an image's hierarchy has a hundred segments or more, and
    most of their masks are never looked at. `segmentation` is the label map (int `[height, width]`, kept, not
    copied, until the mask is computed); any use of the pixels (`np.asarray`, `save`, `resize`, `getpixel`, ...)
    computes them once."""

    # Where PIL keeps the mode and size: read-only properties over `_mode` / `_size` since Pillow 10.1.
    _MODE, _SIZE = (f"_{name}" if isinstance(getattr(Image.Image, name, None), property) else name
                    for name in ("mode", "size"))  # fmt: skip

    def __init__(self, segmentation, segment_id):
        super().__init__()
        height, width = segmentation.shape
        setattr(self, self._MODE, "L")
        setattr(self, self._SIZE, (width, height))
        self._segmentation = segmentation
        self._segment_id = segment_id

    @property
    def im(self):
        if self.__dict__.get("_im") is None and self.__dict__.get("_segmentation") is not None:
            mask = np.multiply(self._segmentation == self._segment_id, 255, dtype=np.uint8)
            self._im, self._segmentation = Image.fromarray(mask).im, None
        return self.__dict__.get("_im")

    @im.setter
    def im(self, value):
        self._im = value

    def load(self):
        self.im  # noqa: B018 -- computes the pixels
        return super().load()

    def __eq__(self, other):
        """Equal to any PIL image with the same pixels (and mode, size, info), lazy or not."""
        if not isinstance(other, Image.Image):
            return False
        return self.copy() == (other.copy() if isinstance(other, LazyMask) else other)

    __hash__ = None


def segment_masks(segmentation, ids):
    """One `LazyMask` per segment id of `segmentation`."""
    return [LazyMask(segmentation, segment_id) for segment_id in ids]


def resized_label_maps(label_maps, size):
    """Label maps int64 `[..., H, W]` (a tensor) resized to `size` as `segment_ops.resize_label_maps` resizes them
    (nearest at pixel centres; its sampled rows and columns): int64 numpy `[..., height, width]`, one gather."""
    rows, columns = (index.numpy() for index in nearest_sampling_indices(label_maps.shape[-2:], size))
    maps = label_maps.numpy()
    flat = maps.reshape(*maps.shape[:-2], -1)
    return np.take(flat, (rows[:, None] * maps.shape[-1] + columns).reshape(-1), axis=-1).reshape(
        *maps.shape[:-2], len(rows), len(columns)
    )


class PreprocessedInputs(IterableDataset):
    """`preprocess(item, **params)` of every input, in input order, computed by a pool of threads: with `overlap`,
    always `lookahead` items ahead of the consumer (image loading and superpixels of the next batches run while the
    model works on the current one); without, `lookahead` items at a time, submitted when the consumer has taken
    all the previous ones (the items of a batch in parallel, nothing while the model runs)."""

    def __init__(self, inputs, preprocess, params, num_threads, lookahead, overlap=True):
        self.inputs = inputs
        self.preprocess = preprocess
        self.params = params
        self.num_threads = num_threads
        self.lookahead = lookahead
        self.overlap = overlap

    def __len__(self):
        return len(self.inputs)  # a TypeError (no length) for generators, as `len` of any iterable

    def __iter__(self):
        items = iter(self.inputs)
        with ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="cast-preprocess") as pool:
            pending = collections.deque()
            try:
                while True:
                    if self.overlap or not pending:
                        for item in itertools.islice(items, self.lookahead - len(pending)):
                            pending.append(pool.submit(self.preprocess, item, **self.params))
                    if not pending:
                        return
                    yield pending.popleft().result()
            finally:
                for future in pending:  # stopped early: drop the work not started yet
                    future.cancel()


def threaded_iterator(pipeline, inputs, batch_size, preprocess_params, forward_params, postprocess_params):
    """What `Pipeline.get_iterator` builds (batches collated as transformers does, the forward, the
    post-processing), with the preprocessing in threads (`PreprocessedInputs`) instead of DataLoader processes.

    The next batches are preprocessed while the model runs when the model is not on the CPU (or runs one CPU thread);
    a multi-threaded CPU forward would compete with them for the same cores (and OpenMP's waiting threads spin), so
    there whole batches, about one image per thread, are preprocessed in parallel between forwards."""
    workers = getattr(pipeline.image_processor, "num_workers", None) or os.cpu_count() or 1
    if pipeline.device.type != "cpu" or torch.get_num_threads() == 1:
        dataset = PreprocessedInputs(
            inputs, pipeline.preprocess, preprocess_params, workers, 2 * max(batch_size, workers)
        )
    else:
        chunk = batch_size * max(1, workers // batch_size)
        dataset = PreprocessedInputs(inputs, pipeline.preprocess, preprocess_params, workers, chunk, overlap=False)
    collate = no_collate_fn if batch_size == 1 else pad_collate_fn(pipeline.tokenizer, pipeline.image_processor)
    loader = DataLoader(dataset, num_workers=0, batch_size=batch_size, collate_fn=collate)
    model_iterator = PipelineIterator(loader, pipeline.forward, forward_params, loader_batch_size=batch_size)
    return PipelineIterator(model_iterator, pipeline.postprocess, postprocess_params)


class HierarchicalSegmentationPipeline(Pipeline):
    """
    Part-to-whole segmentation of images with a CAST model (`CastModel`, `CastForImageClassification` or
    `CastForSemanticSegmentation`, package or remote code).

    Call with an image (path, URL or PIL image), a list of them or any iterable (a generator, a dataset: results
    are then yielded as they come); `batch_size` batches the model calls. Options: `levels` (default
    `(1, 2, 3, 4)`; 0 adds the superpixels as the model saw them), `overlay` (add each level's segments drawn over
    the image), `return_masks` (default `True`; `False` leaves the masks out, for bulk work that needs the label
    maps only), `timeout` (for URLs). Images are loaded and processed by a pool of threads (`image_processor.
    num_workers`, default all cores; the next batches while the model runs, except for a multi-threaded CPU forward,
    see `threaded_iterator`), unless `num_workers` asks for DataLoader processes.

    Returns, per image, `{"size": (height, width), "levels": [...]}` with, for each level, `"level"`,
    `"segmentation"` (int64 numpy `[height, width]` of segment ids), `"segments"` (a list of `{"id", "parent",
    "area", "bbox", "mask"}` in increasing id order: `parent` is the id of the enclosing segment at the next level,
    `None` at level 4; `area` counts pixels; `bbox` is `[x0, y0, x1, y1]` with exclusive ends; `mask` is a binary
    PIL "L" image, computed on first use ([`LazyMask`])) and, with `overlay=True`, `"overlay"` (the image blended
    with segment colours, boundaries drawn, PIL RGB). Areas, boxes and parents of all levels of a batch come from
    one set of reductions at the model's resolution (`segment_statistics`); each image's maps are resized once.

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

    def _sanitize_parameters(self, levels=None, overlay=None, return_masks=None, timeout=None, **kwargs):
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
        if return_masks is not None:
            postprocess_params["return_masks"] = bool(return_masks)
        if kwargs:
            raise ValueError(f"Unknown arguments for hierarchical-segmentation: {sorted(kwargs)}.")
        return preprocess_params, {}, postprocess_params

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        if num_workers:  # DataLoader worker processes, as transformers does
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        return threaded_iterator(self, inputs, batch_size, preprocess_params, forward_params, postprocess_params)

    def preprocess(self, image, timeout=None):
        return cast_preprocess(self, image, timeout)

    def _forward(self, model_inputs):
        target_size, image = model_inputs.pop("target_size"), model_inputs.pop("image")
        outputs = self.model(**model_inputs, return_dict=True)
        # [B, 5, H, W]: level 0 (superpixels as the model saw them) and levels 1..4, one tensor so batches split.
        label_maps = hierarchy_level_maps(outputs, model_inputs["superpixels"])
        statistics = segment_statistics(label_maps, target_size.tolist())  # every level of the batch at once
        return {"label_maps": label_maps, **statistics, "target_size": target_size, "image": image}

    def postprocess(self, model_outputs, levels=(1, 2, 3, 4), overlay=False, return_masks=True):
        (height, width), image = model_outputs["target_size"][0].tolist(), model_outputs["image"][0]
        maps = resized_label_maps(model_outputs["label_maps"][0, list(levels)], (height, width))  # [n, h, w]
        result = []
        for segmentation, level in zip(maps, levels):
            present = torch.nonzero(model_outputs["areas"][0, level] > 0)[:, 0]
            ids = present.tolist()
            areas = model_outputs["areas"][0, level, present].tolist()
            parents = model_outputs["parents"][0, level, present].tolist()
            boxes = model_outputs["boxes"][0, level, present].tolist()
            segments = [
                {"id": i, "parent": parent if parent >= 0 else None, "area": area, "bbox": box}
                for i, area, parent, box in zip(ids, areas, parents, boxes)
            ]
            if return_masks:
                for segment, mask in zip(segments, segment_masks(segmentation, ids)):
                    segment["mask"] = mask
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

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        if num_workers:  # DataLoader worker processes, as transformers does
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        return threaded_iterator(self, inputs, batch_size, preprocess_params, forward_params, postprocess_params)

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
        semantic = logits is not None and logits.dim() == 4  # [B, num_labels, H, W] from a segmentation head
        if semantic:
            label_maps = logits.argmax(dim=1, keepdim=True)  # [B, 1, H, W]: the classes
        else:
            label_maps = hierarchy_level_maps(outputs, model_inputs["superpixels"])  # [B, 5, H, W]: the levels
        areas = segment_statistics(label_maps, target_size.tolist(), with_parents=False)["areas"]
        semantic = torch.full((len(label_maps),), semantic)  # [B], so that batches split
        return {"label_maps": label_maps, "areas": areas, "semantic": semantic, "target_size": target_size}

    def postprocess(self, model_outputs, level=DEFAULT_SEGMENTATION_LEVEL):
        size = model_outputs["target_size"][0].tolist()
        semantic = bool(model_outputs["semantic"][0])
        index = 0 if semantic else level
        segmentation = resized_label_maps(model_outputs["label_maps"][0, index], size)
        ids = torch.nonzero(model_outputs["areas"][0, index] > 0)[:, 0].tolist()
        if semantic:
            names = {int(k): v for k, v in self.model.config.id2label.items()}
            labels = [names.get(i, str(i)) for i in ids]
        else:
            labels = [f"level{level}-{i}" for i in ids]
        return [
            {"score": None, "label": label, "mask": mask}
            for label, mask in zip(labels, segment_masks(segmentation, ids))
        ]


def register_pipelines():
    """Register `hierarchical-segmentation` in transformers' pipeline registry (idempotent)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    registered = PIPELINE_REGISTRY.supported_tasks.get("hierarchical-segmentation", {})
    if registered.get("impl") is HierarchicalSegmentationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        "hierarchical-segmentation", pipeline_class=HierarchicalSegmentationPipeline, pt_model=AutoModel, type="image"
    )


__all__ = [
    "CastImageSegmentationPipeline",
    "HierarchicalSegmentationPipeline",
    "LazyMask",
    "register_pipelines",
]
