"""transformers pipelines for CAST.

With `hf_hierseg` imported, `pipeline(task, model=folder)` needs no `trust_remote_code` for any of these:

- `hierarchical-segmentation` ([`HierarchicalSegmentationPipeline`], registered in transformers' `PIPELINE_REGISTRY`
  when the package is imported): for each level, the segments with their masks and parent links, optionally an
  overlay picture.
- `hierarchical-image-classification` ([`HierarchicalImageClassificationPipeline`], registered likewise): the label
  path an H-CAST model predicts through its taxonomy, a score per level and the segments each level is read from.
- `image-classification` and `image-feature-extraction`: transformers' own pipelines, since `CastImageProcessor`
  returns the `superpixels` that transformers passes to the model beside `pixel_values`.
- `zero-shot-hierarchical-segmentation` ([`ZeroShotHierarchicalSegmentationPipeline`], registered as well): objects
  and parts with open-vocabulary names, CAST's segments of two levels labelled by a CLIP-style model (the paper's
  PartImageNet protocol, see `segment_labeling`).
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
`pipeline("hierarchical-segmentation" | "zero-shot-hierarchical-segmentation" | "image-segmentation", model=repo,
trust_remote_code=True)` loads them from the repo (an H-CAST repo also `hierarchical-image-classification`). Plain `save_pretrained` folders have no `custom_pipelines`: that
entry makes transformers demand `trust_remote_code` for the task even where the package is installed.

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
from .segment_labeling import (
    BACKGROUND_LABEL,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_FILL_VALUE,
    DEFAULT_HYPOTHESIS_TEMPLATE,
    DEFAULT_SEGMENT_BATCH_SIZE,
    check_clip_model,
    check_masking,
    check_object_labels,
    check_segment_batch_size,
    encode_texts,
    label_segments,
    part_vocabulary,
    segment_masks,
)
from .segment_ops import resize_label_maps
from .visualization import overlay_labels


NUM_LEVELS = 4
DEFAULT_SEGMENTATION_LEVEL = 3
DEFAULT_OBJECT_LEVEL = 4  # the paper's PartImageNet protocol: level-4 segments are objects,
DEFAULT_PART_LEVEL = 3  # level-3 segments are parts


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


def timeout_params(timeout):
    """The preprocessing parameters for a pipeline's `timeout` (for URLs): none when it is not given."""
    return {} if timeout is None else {"timeout": timeout}


def check_no_unknown_arguments(kwargs, task):
    """Raise a `ValueError` naming the arguments in `kwargs` that the pipeline of `task` does not take."""
    if kwargs:
        raise ValueError(f"Unknown arguments for {task}: {sorted(kwargs)}.")


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


def sized_preprocess(pipeline, image, timeout=None):
    """`cast_preprocess` with the original size as an int64 tensor `[1, 2]` (batched to `[B, 2]`), for a forward that
    works on the sizes of the whole batch."""
    model_inputs = cast_preprocess(pipeline, image, timeout)
    model_inputs["target_size"] = torch.tensor(model_inputs["target_size"])
    return model_inputs


def lazy_masks(segmentation, ids):
    """One `LazyMask` per segment id of `segmentation`."""
    return [LazyMask(segmentation, segment_id) for segment_id in ids]


def level_segments(statistics, level, index=0):
    """The segments of one level of image `index`, from `segment_statistics` (`areas`, `parents`, `boxes`): a list
    of `{"id", "parent", "area", "bbox"}` in increasing id order, for the ids present (area > 0); `parent` is `None`
    at the last level."""
    present = torch.nonzero(statistics["areas"][index, level] > 0)[:, 0]
    ids = present.tolist()
    areas = statistics["areas"][index, level, present].tolist()
    parents = statistics["parents"][index, level, present].tolist()
    boxes = statistics["boxes"][index, level, present].tolist()
    return [
        {"id": i, "parent": parent if parent >= 0 else None, "area": area, "bbox": box}
        for i, area, parent, box in zip(ids, areas, parents, boxes)
    ]


def binary_mask(label_map, label):
    return Image.fromarray(((label_map == label) * 255).astype(np.uint8))  # 2-D uint8: mode "L"


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


class CastPipelineMixin:
    """What every CAST pipeline shares: it loads an image processor only (CAST reads no text), checks at construction
    that the model is CAST, and runs the model on `cast_preprocess`'s inputs (`run_model`)."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_is_cast(self.model, type(self).__name__)

    def run_model(self, model_inputs):
        """`(outputs, target_size, image)`: the model's outputs on `cast_preprocess`'s inputs, and the batch's
        original sizes and pictures, which `model_inputs` no longer holds."""
        target_size, image = model_inputs.pop("target_size"), model_inputs.pop("image")
        return self.model(**model_inputs, return_dict=True), target_size, image


class ThreadedPreprocessingMixin:
    """Preprocessing in a pool of threads (`threaded_iterator`), unless `num_workers` asks for DataLoader processes."""

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        if num_workers:  # DataLoader worker processes, as transformers does
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        return threaded_iterator(self, inputs, batch_size, preprocess_params, forward_params, postprocess_params)


class HierarchicalSegmentationPipeline(CastPipelineMixin, ThreadedPreprocessingMixin, Pipeline):
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

    def _sanitize_parameters(self, levels=None, overlay=None, return_masks=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = timeout_params(timeout), {}
        if levels is not None:
            levels = (levels,) if isinstance(levels, int) else tuple(levels)
            if not levels or any(not isinstance(level, int) or not 0 <= level <= NUM_LEVELS for level in levels):
                raise ValueError(f"`levels` must be integers in 0..{NUM_LEVELS}, got {levels}.")
            postprocess_params["levels"] = tuple(sorted(set(levels)))
        if overlay is not None:
            postprocess_params["overlay"] = bool(overlay)
        if return_masks is not None:
            postprocess_params["return_masks"] = bool(return_masks)
        check_no_unknown_arguments(kwargs, "hierarchical-segmentation")
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout=None):
        return sized_preprocess(self, image, timeout)

    def _forward(self, model_inputs):
        outputs, target_size, image = self.run_model(model_inputs)
        # [B, 5, H, W]: level 0 (superpixels as the model saw them) and levels 1..4, one tensor so batches split.
        label_maps = hierarchy_level_maps(outputs, model_inputs["superpixels"])
        statistics = segment_statistics(label_maps, target_size.tolist())  # every level of the batch at once
        return {"label_maps": label_maps, **statistics, "target_size": target_size, "image": image}

    def postprocess(self, model_outputs, levels=(1, 2, 3, 4), overlay=False, return_masks=True):
        (height, width), image = model_outputs["target_size"][0].tolist(), model_outputs["image"][0]
        maps = resized_label_maps(model_outputs["label_maps"][0, list(levels)], (height, width))  # [n, h, w]
        result = []
        for segmentation, level in zip(maps, levels):
            segments = level_segments(model_outputs, level)
            if return_masks:
                for segment, mask in zip(segments, lazy_masks(segmentation, [segment["id"] for segment in segments])):
                    segment["mask"] = mask
            entry = {"level": level, "segmentation": segmentation, "segments": segments}
            if overlay:
                entry["overlay"] = Image.fromarray(overlay_labels(image, segmentation))
            result.append(entry)
        return {"size": (height, width), "levels": result}


class CastImageSegmentationPipeline(CastPipelineMixin, ThreadedPreprocessingMixin, ImageSegmentationPipeline):
    """
    `image-segmentation` for CAST: with `CastForSemanticSegmentation` (a segmentation head), one mask per predicted
    class (`label` from `config.id2label`); with other CAST models, one mask per segment of hierarchy `level`
    (default 3; `label` is `"level<l>-<id>"`). `score` is `None`, as for transformers' semantic segmentation.
    The image is processed whole (resized, never centre cropped), so the masks cover the whole input image.
    """

    def __init__(self, *args, **kwargs):
        Pipeline.__init__(self, *args, **kwargs)  # CAST is in none of transformers' segmentation mappings
        check_is_cast(self.model, type(self).__name__)

    def _sanitize_parameters(self, level=None, subtask=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = timeout_params(timeout), {}
        if subtask not in (None, "semantic"):
            raise ValueError(f"CAST gives semantic segmentation only; `subtask` must be 'semantic', got {subtask!r}.")
        if level is not None:
            if not isinstance(level, int) or not 0 <= level <= NUM_LEVELS:
                raise ValueError(f"`level` must be an integer in 0..{NUM_LEVELS}, got {level!r}.")
            postprocess_params["level"] = level
        check_no_unknown_arguments(kwargs, "CAST image-segmentation")
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout=None):
        return sized_preprocess(self, image, timeout)

    def _forward(self, model_inputs):
        outputs, target_size, _ = self.run_model(model_inputs)
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
            {"score": None, "label": label, "mask": mask} for label, mask in zip(labels, lazy_masks(segmentation, ids))
        ]


def load_clip(clip_model, clip_processor=None, user="ZeroShotHierarchicalSegmentationPipeline"):
    """`(model, image_processor, tokenizer)` of a CLIP-style model given as a model or a Hub id / folder (loaded with
    transformers' `AutoModel` and `AutoProcessor`); `clip_processor` (a processor with `image_processor` and
    `tokenizer`, or its id / folder) defaults to the one saved with the model."""
    from transformers import AutoModel, AutoProcessor

    if clip_model is None:
        raise ValueError(
            f"{user} needs `clip_model=`: a CLIPModel or SiglipModel, or the Hub id or folder of one (e.g. "
            "'openai/clip-vit-base-patch16', the paper's)."
        )
    if isinstance(clip_model, (str, os.PathLike)):
        clip_processor = str(clip_model) if clip_processor is None else clip_processor
        clip_model = AutoModel.from_pretrained(str(clip_model))
    check_clip_model(clip_model, user)
    if clip_processor is None:
        name = getattr(clip_model, "name_or_path", "") or getattr(clip_model.config, "_name_or_path", "")
        if not name:
            raise ValueError(f"{user}: pass `clip_processor=` (e.g. a CLIPProcessor) with a `clip_model` object.")
        clip_processor = name
    if isinstance(clip_processor, (str, os.PathLike)):
        clip_processor = AutoProcessor.from_pretrained(str(clip_processor))
    image_processor = getattr(clip_processor, "image_processor", None)
    tokenizer = getattr(clip_processor, "tokenizer", None)
    if image_processor is None or tokenizer is None:
        raise TypeError(
            f"{user}: `clip_processor` must have an `image_processor` and a `tokenizer` (e.g. CLIPProcessor), got "
            f"{type(clip_processor).__name__}."
        )
    return clip_model.eval(), image_processor, tokenizer


def _check_level(level, name):
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= NUM_LEVELS:
        raise ValueError(f"`{name}` must be an integer in 1..{NUM_LEVELS}, got {level!r}.")
    return level


class ZeroShotHierarchicalSegmentationPipeline(CastPipelineMixin, Pipeline):
    """
    Open-vocabulary objects and parts: the segments of two levels of CAST's hierarchy (package or remote code)
    labelled by a CLIP-style model, as in the paper's PartImageNet evaluation (see `hf_hierseg.segment_labeling`).

    Create with a CAST model and `clip_model=` (a `CLIPModel` / `SiglipModel`, or a Hub id or folder, loaded with
    `AutoModel` / `AutoProcessor`; `clip_processor=` if the model object has no saved processor):

        segmenter = pipeline("zero-shot-hierarchical-segmentation", model=cast_folder,
                             clip_model="openai/clip-vit-base-patch16")
        result = segmenter(image, candidate_labels=["Quadruped", "Bird"],
                           part_labels={"Quadruped": ["Quadruped Head", "Quadruped Body"], "Bird": ["Bird Wing"]})

    Call with an image (path, URL, PIL image) or a list and:
    - `candidate_labels`: the object names; `"Background"` is always a candidate besides them;
    - `part_labels` (optional): a mapping object -> its part names, or a flat list of part names, each a part of
      every object whose name it contains ("Quadruped Head" of "Quadruped"). An object without parts keeps its own
      name as its only part;
    - `object_level` (default 4) and `part_level` (default 3, at most `object_level`);
    - `hypothesis_template` (default `"a photo of a {}"`, the authors');
    - `masking`: how a segment is shown to CLIP: `"fill"` (default, the authors': pixels outside the segment set to
      `fill_value`=0.5 after CLIP's normalisation), `"crop"` (its bounding box, resized) or `"blur"` (outside
      blurred, `blur_sigma` pixels of CLIP's input);
    - `segment_batch_size` (default 32): segment views per CLIP call (the views of a batch of images share them);
      `batch_size` batches the CAST calls as in every pipeline; `timeout` for URLs.

    Both models see the whole picture (resized to their input size, never centre cropped). Returns, per image,
    `{"objects": {...}, "parts": {...}}` (`"parts"` only with `part_labels`), each with `"level"`, `"labels"`
    (the names, `"Background"` last), `"label_map"` (int64 numpy `[height, width]` of indices into `labels`, at
    the image's size), `"segmentation"` (int64 numpy `[height, width]` of the level's segment ids) and
    `"segments"` (`{"id", "label", "score"}` for each segment of the level: every pixel of a segment has its label;
    `score` is CLIP's probability of the label among the candidates, and for parts the object's score times the
    part's probability among the object's parts). Every part label belongs to the object label under it; parts of
    the background are background.
    """

    def __init__(self, *args, clip_model=None, clip_processor=None, **kwargs):
        super().__init__(*args, **kwargs)  # checks the model (CastPipelineMixin)
        self.clip_model, self.clip_image_processor, self.clip_tokenizer = load_clip(clip_model, clip_processor)
        self.clip_model.to(self.device)
        self._text_embeddings = {}  # (names, template) -> [N, D]

    def __call__(self, images, candidate_labels=None, **kwargs):
        """Label the objects (and parts) of `images`; see the class documentation."""
        if candidate_labels is None:
            raise ValueError("zero-shot-hierarchical-segmentation needs `candidate_labels` (the object names).")
        return super().__call__(images, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(
        self,
        candidate_labels=None,
        part_labels=None,
        object_level=None,
        part_level=None,
        hypothesis_template=None,
        masking=None,
        fill_value=None,
        blur_sigma=None,
        segment_batch_size=None,
        timeout=None,
        **kwargs,
    ):
        check_no_unknown_arguments(kwargs, "zero-shot-hierarchical-segmentation")
        preprocess_params = timeout_params(timeout)
        if candidate_labels is None:  # the defaults at construction
            return preprocess_params, {}, {}
        objects = check_object_labels(candidate_labels)
        object_level = _check_level(DEFAULT_OBJECT_LEVEL if object_level is None else object_level, "object_level")
        template = DEFAULT_HYPOTHESIS_TEMPLATE if hypothesis_template is None else hypothesis_template
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"`hypothesis_template` must be a string with a '{{}}' for the name, got {template!r}.")
        masking = "fill" if masking is None else masking
        fill_value = DEFAULT_FILL_VALUE if fill_value is None else fill_value
        blur_sigma = DEFAULT_BLUR_SIGMA if blur_sigma is None else blur_sigma
        check_masking(masking, fill_value, blur_sigma)
        segment_batch_size = DEFAULT_SEGMENT_BATCH_SIZE if segment_batch_size is None else segment_batch_size
        check_segment_batch_size(segment_batch_size)
        forward_params = {
            "objects": objects,
            "object_level": object_level,
            "template": template,
            "masking": masking,
            "fill_value": float(fill_value),
            "blur_sigma": float(blur_sigma),
            "segment_batch_size": segment_batch_size,
        }
        postprocess_params = {"object_names": objects + [BACKGROUND_LABEL], "object_level": object_level}
        if part_labels is not None:
            part_level = _check_level(DEFAULT_PART_LEVEL if part_level is None else part_level, "part_level")
            if part_level > object_level:
                raise ValueError(
                    f"`part_level` ({part_level}) must be at most `object_level` ({object_level}): parts are "
                    "segments inside the objects."
                )
            part_names, parts_of = part_vocabulary(objects, part_labels)
            forward_params.update(part_level=part_level, part_names=part_names, parts_of=parts_of)
            postprocess_params.update(part_names=part_names + [BACKGROUND_LABEL], part_level=part_level)
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, timeout=None):
        model_inputs = cast_preprocess(self, image, timeout)
        clip_processor = self.clip_image_processor
        clip_inputs = clip_processor(
            images=model_inputs["image"], return_tensors="pt", **whole_image_size(clip_processor)
        )
        model_inputs["clip_pixel_values"] = clip_inputs["pixel_values"]  # [1, 3, h, w]
        return model_inputs

    def text_embeddings(self, names, template):
        """Unit text embeddings `[N, D]` of the prompts for `names` (computed once per names and template)."""
        key = (tuple(names), template)
        if key not in self._text_embeddings:
            self._text_embeddings[key] = encode_texts(self.clip_model, self.clip_tokenizer, names, template)
        return self._text_embeddings[key]

    def _forward(
        self,
        model_inputs,
        objects=None,
        object_level=DEFAULT_OBJECT_LEVEL,
        template=DEFAULT_HYPOTHESIS_TEMPLATE,
        masking="fill",
        fill_value=DEFAULT_FILL_VALUE,
        blur_sigma=DEFAULT_BLUR_SIGMA,
        segment_batch_size=DEFAULT_SEGMENT_BATCH_SIZE,
        part_level=None,
        part_names=None,
        parts_of=None,
    ):
        clip_pixel_values = model_inputs.pop("clip_pixel_values")
        outputs, target_size, _ = self.run_model(model_inputs)
        hierarchy_maps = outputs.hierarchy_maps(model_inputs["superpixels"])  # 5 x [B, H, W], levels 0..4
        levels = [object_level] if part_names is None else [object_level, part_level]
        segment_maps = torch.stack([hierarchy_maps[level] for level in levels], dim=1)  # [B, 1 or 2, H, W]
        objects_found = [segment_masks(image_maps[0]) for image_maps in segment_maps]
        parts_found = None if part_names is None else [segment_masks(image_maps[1]) for image_maps in segment_maps]
        results = label_segments(
            self.clip_model,
            list(clip_pixel_values),
            [masks for _, masks in objects_found],
            self.text_embeddings(objects + [BACKGROUND_LABEL], template),
            None if parts_found is None else [masks for _, masks in parts_found],
            None if part_names is None else self.text_embeddings(part_names, template),
            parts_of,
            masking,
            segment_batch_size,
            fill_value,
            blur_sigma,
        )
        label_maps = [[result["object_map"]] + ([result["part_map"]] if parts_found else []) for result in results]
        model_outputs = {
            "segment_maps": segment_maps,
            "label_maps": torch.stack([torch.stack(maps) for maps in label_maps]),  # [B, 1 or 2, H, W]
            "object_ids": [ids for ids, _ in objects_found],
            "object_labels": [result["object_labels"] for result in results],
            "object_scores": [result["object_scores"] for result in results],
            "target_size": target_size,
        }
        if parts_found is not None:
            model_outputs["part_ids"] = [ids for ids, _ in parts_found]
            model_outputs["part_labels"] = [result["part_labels"] for result in results]
            model_outputs["part_scores"] = [result["part_scores"] for result in results]
        return model_outputs

    def postprocess(
        self, model_outputs, object_names=None, object_level=DEFAULT_OBJECT_LEVEL, part_names=None, part_level=None
    ):
        size = model_outputs["target_size"][0]
        segment_maps = resize_label_maps(model_outputs["segment_maps"][0], size).cpu().numpy()  # [1 or 2, h, w]
        label_maps = resize_label_maps(model_outputs["label_maps"][0], size).cpu().numpy()
        levels = {"objects": ("object", object_names, object_level)}
        if part_names is not None:
            levels["parts"] = ("part", part_names, part_level)
        result = {}
        for index, (key, (kind, names, level)) in enumerate(levels.items()):
            ids = model_outputs[f"{kind}_ids"][0].tolist()
            labels = model_outputs[f"{kind}_labels"][0].tolist()
            scores = model_outputs[f"{kind}_scores"][0].tolist()
            result[key] = {
                "level": level,
                "labels": list(names),
                "label_map": label_maps[index],
                "segmentation": segment_maps[index],
                "segments": [
                    {"id": int(i), "label": names[label], "score": float(score)}
                    for i, label, score in zip(ids, labels, scores)
                ],
            }
        return result


class HierarchicalImageClassificationPipeline(CastPipelineMixin, Pipeline):
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # checks the model (CastPipelineMixin)
        if not getattr(self.model.config, "hierarchy_num_labels", None):
            raise ValueError(
                f"{type(self).__name__} needs a hierarchical classifier (CastForHierarchicalImageClassification, "
                "a config with `hierarchy_num_labels`), got a model without a taxonomy."
            )

    def _sanitize_parameters(self, top_k=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = timeout_params(timeout), {}
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        check_no_unknown_arguments(kwargs, "hierarchical-image-classification")
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout=None):
        return cast_preprocess(self, image, timeout)

    def _forward(self, model_inputs):
        outputs, target_size, _ = self.run_model(model_inputs)
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


REGISTERED_PIPELINES = {
    "hierarchical-segmentation": HierarchicalSegmentationPipeline,
    "zero-shot-hierarchical-segmentation": ZeroShotHierarchicalSegmentationPipeline,
    "hierarchical-image-classification": HierarchicalImageClassificationPipeline,
}
# The Auto class a registered task loads a folder with, when not AutoModel. CastForHierarchicalImageClassification
# shares AutoModelForImageClassification with the flat classifier; transformers picks the class of the folder's
# `config.architectures`.
REGISTERED_AUTO_MODELS = {"hierarchical-image-classification": "AutoModelForImageClassification"}


def register_pipelines():
    """Register `hierarchical-segmentation`, `zero-shot-hierarchical-segmentation` and
    `hierarchical-image-classification` in transformers' pipeline registry (idempotent)."""
    import transformers
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, pipeline_class in REGISTERED_PIPELINES.items():
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is not pipeline_class:
            auto_model = getattr(transformers, REGISTERED_AUTO_MODELS.get(task, "AutoModel"))
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=auto_model, type="image")


__all__ = [
    "HierarchicalSegmentationPipeline",
    "ZeroShotHierarchicalSegmentationPipeline",
    "CastImageSegmentationPipeline",
    "HierarchicalImageClassificationPipeline",
    "LazyMask",
    "load_clip",
    "register_pipelines",
]
