"""Open-vocabulary objects and parts on PartImageNet-format data: the protocol of CAST's paper as an evaluation.

The authors' notebooks (`notebooks/eval_ovseg_cast.ipynb`, `eval_ovseg_sam.ipynb`, `utils.py`, `dataset.py` of
twke18/CAST) evaluate on the 224 x 224 centre crop of every validation image:

- ground truth: COCO-style annotations, one per part, whose category `name` is the part ("Quadruped Head") and
  `supercategory` the object ("Quadruped"); objects and parts are numbered in the order of the categories (11
  objects and 40 parts on PartImageNet), the background is the last label (11 and 40); annotations are painted in
  file order (a later one covers an earlier one); the maps are resized so that the shorter side is 224 (nearest,
  torch's legacy rule) and centre cropped to 224 x 224 (`paper_label_view`);
- CAST sees the image resized (bilinear, shorter side 224) and centre cropped, superpixels on that crop; its level-4
  segments are the objects, its level-3 segments the parts; the ViT baseline clusters ViT patch features of the
  same crop by k-means into 64, 32, 16 and 8 segments (objects: 8, parts: 16); SAM (the `mask-generation`
  pipeline, its last step without torchvision: `sam_masks`) sees the bicubic crop, its masks sorted by area,
  largest first, serve as objects and as parts;
- CLIP (ViT-B/16) sees the bicubic crop; every segment is labelled as `hf_hierseg.segment_labeling` describes (the
  same code as the `zero-shot-hierarchical-segmentation` pipeline); where SAM's masks overlap, the largest mask
  labels an object pixel and the smallest a part pixel, pixels in no mask are background;
- score: torchmetrics' `JaccardIndex(task="multiclass", num_classes=12 / 41)` (average "macro") of each image,
  averaged over images (`metrics.jaccard_from_counts`); the dataset-level mIoU (counts summed over images) is
  reported beside it.

The paper reports CAST-B 29.67 object / 13.21 part mIoU (the last line printed by cell 4 of `eval_ovseg_cast.ipynb`:
`2957/2957    29.67/13.21`). That loop skips, with a bare `except`, every image where anything raises. With CAST's
maps one thing does: `(mask_f == i).nonzero()[0]` for a level-3 id `i` below the largest that no pixel has, so
images whose part-level segment ids are not consecutive from 0 are left out of both averages (and, for SAM, images
without masks); the number of images averaged is not printed. This evaluation scores every image and reports the
mean over the images the notebook keeps beside it (`authors_selection`).

Known differences from the notebooks: polygons are rasterised at pixel centres (`polygon_mask`), not by pycocotools'
algorithm (which upsamples the polygon five times), so boundary pixels may differ; the object under a SAM part mask is the majority object
label of its pixels (the notebook takes the object at the mask's first pixel in raster order; for CAST's and the
k-means segments, which nest, both rules agree); the ViT baseline is `baselines.vit_kmeans_hierarchy` (k-means
fitted on at most `vit_max_fit_pixels` upsampled features) on a transformers ViT, where the authors used their
MoCo-v3 ViT-B/16.
"""

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling, SizeDict

from ..errors import InvalidInputError, MissingInputError
from ..image_processing_cast import CastImageProcessor
from ..pipelines import DEFAULT_OBJECT_LEVEL, DEFAULT_PART_LEVEL, load_clip, whole_image_size
from ..segment_labeling import (
    BACKGROUND_LABEL,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_FILL_VALUE,
    DEFAULT_HYPOTHESIS_TEMPLATE,
    DEFAULT_SEGMENT_BATCH_SIZE,
    encode_texts,
    label_segments,
    part_vocabulary,
    segment_masks,
)
from ..segment_ops import resize_labels_nearest
from .baselines import DEFAULT_NUM_CLUSTERS, images_to_pixel_values, vit_kmeans_hierarchy
from .metrics import intersect_and_union, jaccard_from_counts
from .sam_masks import sam_mask_generator


logger = logging.getLogger(__name__)

PAPER_IMAGE_SIZE = 224
PAPER_CLIP_MODEL = "openai/clip-vit-base-patch16"
# The authors' notebook output (eval_ovseg_cast.ipynb, cell 4, last line "2957/2957    29.67/13.21"), in %.
PAPER_RESULTS = {"CAST-B": {"objects": 29.67, "parts": 13.21}}
PROGRESS_MIN_IMAGES = 20  # a progress bar for evaluations of at least this many images


# --------------------------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartTaxonomy:
    """The object and part classes of an evaluation. Label ids: objects `0..C-1`, background `C`; parts `0..P-1`,
    background `P` (the authors' numbering)."""

    objects: tuple
    parts: tuple
    part_objects: tuple  # the object index of every part

    def __post_init__(self):
        for kind, names in (("object", self.objects), ("part", self.parts)):
            if len(set(names)) != len(names) or not all(isinstance(name, str) and name for name in names):
                raise InvalidInputError(f"The {kind} names must be unique, non-empty strings, got {list(names)}.")
        if len(self.part_objects) != len(self.parts) or not all(0 <= o < len(self.objects) for o in self.part_objects):
            raise InvalidInputError("Every part needs the index of its object.")
        orphans = [name for index, name in enumerate(self.objects) if index not in self.part_objects]
        if self.parts and orphans:
            raise InvalidInputError(f"The objects {orphans} have no parts; every object needs at least one part.")

    @property
    def object_labels(self):
        return (*self.objects, BACKGROUND_LABEL)

    @property
    def part_labels(self):
        return (*self.parts, BACKGROUND_LABEL)

    def parts_by_object(self):
        """`{object name: [its part names]}`, as the pipeline's `part_labels` takes it."""
        return {
            name: [p for p, o in zip(self.parts, self.part_objects) if o == index]
            for index, name in enumerate(self.objects)
        }

    @classmethod
    def from_coco_categories(cls, categories):
        """Objects = the supercategories in order of first appearance, parts = the category names in order (the
        authors' rule: `dataset.py`)."""
        objects, parts, part_objects = [], [], []
        for category in categories:
            if "name" not in category or "supercategory" not in category:
                raise InvalidInputError(
                    f"A category needs a 'name' (the part) and a 'supercategory' (the object): {category}."
                )
            if category["supercategory"] not in objects:
                objects.append(category["supercategory"])
            parts.append(category["name"])
            part_objects.append(objects.index(category["supercategory"]))
        return cls(tuple(objects), tuple(parts), tuple(part_objects))

    @classmethod
    def from_names(cls, object_names, part_names, part_objects=None):
        """From names; `part_objects` maps each part name to its object name (default: the object whose name the
        part contains, the longest if several: "house/roof" -> "house")."""
        objects, parts = tuple(object_names), tuple(part_names)
        owners = []
        for part in parts:
            if part_objects is not None:
                owner = part_objects.get(part)
                if owner not in objects:
                    raise InvalidInputError(
                        f"The object of part {part!r} ({owner!r}) is not an object name {list(objects)}."
                    )
            else:
                candidates = [name for name in objects if name in part]
                if not candidates:
                    raise InvalidInputError(
                        f"Part {part!r} contains no object name {list(objects)}: give the parts' objects explicitly."
                    )
                owner = max(candidates, key=len)
            owners.append(objects.index(owner))
        return cls(objects, parts, tuple(owners))


# --------------------------------------------------------------------------------------------------------------
# Ground truth: COCO-style polygons / RLE, or a `datasets` dataset with mask columns
# --------------------------------------------------------------------------------------------------------------


def decode_compressed_rle(counts):
    """The run lengths of COCO's compressed RLE string: characters from '0', each 5 value bits and a continuation
    bit, the last one's top value bit the sign; from the fourth count on, the difference to the count two before."""
    values, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            code = ord(counts[position]) - 48
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift  # negative: sign-extend
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def rle_mask(rle):
    """A boolean `[H, W]` mask from COCO RLE (`{"size": [H, W], "counts": list or compressed string}`; runs
    alternate 0 and 1, starting with 0, in column-major order)."""
    height, width = (int(value) for value in rle["size"])
    counts = rle["counts"]
    counts = (
        decode_compressed_rle(counts.decode() if isinstance(counts, bytes) else counts)
        if isinstance(counts, (str, bytes))
        else list(counts)
    )
    if sum(counts) != height * width:
        raise InvalidInputError(f"An RLE's counts sum to {sum(counts)}, not {height} x {width} pixels.")
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
    return flat.reshape(width, height).T


def polygon_mask(points, height, width):
    """A boolean `[H, W]` mask of one polygon (`[N, 2]` vertices `(x, y)` in pixel-edge coordinates: pixel `(r, c)`
    spans `[c, c + 1) x [r, r + 1)`): the pixels whose centre lies inside (even-odd rule; a centre on a left or top
    edge is inside, on a right or bottom edge outside)."""
    start = np.asarray(points, dtype=np.float64)
    end = np.roll(start, -1, axis=0)
    centres = np.arange(height) + 0.5  # the scanline of each row
    low, high = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    crosses = (centres[:, None] >= low) & (centres[:, None] < high)  # [H, E], horizontal edges never cross
    rows, edges = np.nonzero(crosses)
    fraction = (centres[rows] - start[edges, 1]) / (end[edges, 1] - start[edges, 1])
    x = start[edges, 0] + fraction * (end[edges, 0] - start[edges, 0])
    first_inside = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)  # the first column right of the crossing
    toggles = np.zeros((height, width + 1), dtype=np.int64)
    np.add.at(toggles, (rows, first_inside), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


def polygons_mask(polygons, height, width):
    """A boolean `[H, W]` mask of the union of COCO polygons (`[x1, y1, x2, y2, ...]`), see `polygon_mask`. Polygons
    with fewer than 3 points are skipped (pycocotools rejects them)."""
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        coordinates = np.asarray(polygon, dtype=np.float64).ravel()
        if coordinates.size % 2:
            raise InvalidInputError(f"A COCO polygon needs x, y pairs; got {coordinates.size} numbers.")
        points = coordinates.reshape(-1, 2)
        if len(points) >= 3:
            mask |= polygon_mask(points, height, width)
    return mask


def annotation_mask(segmentation, height, width):
    """The mask of one COCO annotation's `segmentation` (polygons, or RLE)."""
    if isinstance(segmentation, dict):
        mask = rle_mask(segmentation)
        if mask.shape != (height, width):
            raise InvalidInputError(f"An RLE mask is {mask.shape}, its image {height} x {width}.")
        return mask
    if isinstance(segmentation, list):
        return polygons_mask(segmentation, height, width)
    raise InvalidInputError(f"Unsupported COCO segmentation of type {type(segmentation).__name__}.")


@dataclass
class PartExample:
    """One evaluation image: `key` (its id), the RGB `image`, and `object_map` / `part_map` (int64 `[H, W]`, label ids
    of the taxonomy) at the image's size."""

    key: str
    image: Image.Image
    object_map: np.ndarray
    part_map: np.ndarray


class CocoPartDataset:
    """PartImageNet-format data: a COCO-style JSON whose annotations are parts (category `name`) of objects
    (`supercategory`), images under `image_root` (`file_name`, or `<first 9 characters>/file_name`: PartImageNet's
    class folders). Images in id order, as the authors'."""

    def __init__(self, annotation_file, image_root, max_samples=None):
        annotation_file, self.image_root = Path(annotation_file), Path(image_root)
        if not annotation_file.is_file():
            raise MissingInputError(f"The annotation file {annotation_file} does not exist.")
        if not self.image_root.is_dir():
            raise MissingInputError(f"The image folder {self.image_root} does not exist.")
        try:
            data = json.loads(annotation_file.read_text(encoding="utf-8"))
            images, categories = data["images"], data["categories"]
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidInputError(f"{annotation_file} is not a COCO annotation file: {error}") from error
        self.taxonomy = PartTaxonomy.from_coco_categories(categories)
        self.category_index = {category["id"]: index for index, category in enumerate(categories)}
        self.images = sorted(images, key=lambda image: image["id"])[:max_samples]
        self.annotations = {image["id"]: [] for image in self.images}
        for annotation in data.get("annotations", []):
            if annotation.get("image_id") in self.annotations:
                self.annotations[annotation["image_id"]].append(annotation)

    def __len__(self):
        return len(self.images)

    def key(self, index):
        return str(self.images[index]["id"])

    def image_path(self, file_name):
        candidates = [self.image_root / file_name, self.image_root / Path(file_name).name[:9] / file_name]
        for path in candidates:
            if path.is_file():
                return path
        raise MissingInputError(
            f"Image {file_name!r} is not in {self.image_root} (tried {[str(p) for p in candidates]})."
        )

    def __getitem__(self, index):
        record = self.images[index]
        image = Image.open(self.image_path(record["file_name"])).convert("RGB")
        height, width = int(record.get("height", image.height)), int(record.get("width", image.width))
        if (image.height, image.width) != (height, width):
            raise InvalidInputError(
                f"Image {record['file_name']} is {image.size}, its annotation says {width} x {height}."
            )
        taxonomy = self.taxonomy
        object_map = np.full((height, width), len(taxonomy.objects), dtype=np.int64)
        part_map = np.full((height, width), len(taxonomy.parts), dtype=np.int64)
        for annotation in self.annotations[record["id"]]:  # in file order: a later part covers an earlier one
            part = self.category_index.get(annotation.get("category_id"))
            if part is None:
                raise InvalidInputError(f"Annotation {annotation.get('id')} has an unknown category_id.")
            mask = annotation_mask(annotation.get("segmentation", []), height, width)
            object_map[mask] = taxonomy.part_objects[part]
            part_map[mask] = part
        return PartExample(self.key(index), image, object_map, part_map)


class MaskPartDataset:
    """A `datasets` dataset (or a list of dicts) with an image column and object / part mask columns (class ids as
    palette indices or grayscale values, read with `image_datasets.mask_to_class_ids`).

    `object_names` / `part_names` name the mask values `0, 1, ...`; the values `object_background` /
    `part_background` are the background (their names are not used)."""

    def __init__(
        self,
        dataset,
        object_names,
        part_names,
        object_column="object_mask",
        part_column="part_mask",
        image_column=None,
        object_background=0,
        part_background=0,
        part_objects=None,
        max_samples=None,
    ):
        from ..image_datasets import image_column_of

        self.dataset = dataset
        self.columns = (object_column, part_column)
        self.image_column = image_column or (
            image_column_of(dataset) if getattr(dataset, "features", None) else "image"
        )
        self.size = len(dataset) if max_samples is None else min(len(dataset), max_samples)
        for kind, names, background in (
            ("object", object_names, object_background),
            ("part", part_names, part_background),
        ):
            if not 0 <= background < len(names):
                raise InvalidInputError(f"The {kind} background value {background} is not a value of {list(names)}.")
        objects = [name for value, name in enumerate(object_names) if value != object_background]
        parts = [name for value, name in enumerate(part_names) if value != part_background]
        self.taxonomy = PartTaxonomy.from_names(objects, parts, part_objects)
        self.lookups = [
            self._lookup(len(object_names), object_background, len(objects)),
            self._lookup(len(part_names), part_background, len(parts)),
        ]

    @staticmethod
    def _lookup(num_values, background, background_id):
        """mask value -> label id (the background value -> the last id, the others keep their order)."""
        ids = [value - (value > background) for value in range(num_values)]
        ids[background] = background_id
        return np.asarray(ids, dtype=np.int64)

    def __len__(self):
        return self.size

    def key(self, index):
        return str(index)

    def __getitem__(self, index):
        from ..image_datasets import decode_image, decode_mask, mask_to_class_ids

        example = self.dataset[index]
        for column in (self.image_column, *self.columns):
            if column not in example:
                raise InvalidInputError(f"Column {column!r} is missing; the examples have {sorted(example)}.")
        image = decode_image(example[self.image_column])
        maps = []
        for column, lookup in zip(self.columns, self.lookups):
            values = mask_to_class_ids(decode_mask(example[column]))
            if values.shape != (image.height, image.width):
                raise InvalidInputError(f"The {column} of example {index} is {values.shape}, its image {image.size}.")
            if values.min() < 0 or values.max() >= len(lookup):
                raise InvalidInputError(f"The {column} of example {index} has values outside 0..{len(lookup) - 1}.")
            maps.append(lookup[values])
        return PartExample(self.key(index), image, *maps)


# --------------------------------------------------------------------------------------------------------------
# The paper's view: shorter side resized to 224, centre crop 224 x 224
# --------------------------------------------------------------------------------------------------------------


def shorter_side_size(height, width, size):
    """`(height, width)` with the shorter side `size` and the longer one scaled (truncated), as
    `torchvision.transforms.Resize(size)`."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def paper_image_view(image, size=PAPER_IMAGE_SIZE, resample=PILImageResampling.BILINEAR):
    """The RGB image resized (shorter side `size`, PIL `resample`) and centre cropped to `size` x `size`, as
    `Resize(size)` + `CenterCrop(size)` of torchvision (rounded crop offsets)."""
    processor = CastImageProcessor()
    array = processor.resize(np.asarray(image.convert("RGB")), SizeDict(shortest_edge=size), resample=resample)
    return Image.fromarray(processor.center_crop(array, SizeDict(height=size, width=size)))


def paper_label_view(label_map, size=PAPER_IMAGE_SIZE):
    """A label map resized as the authors' `T.Resize(size, NEAREST)` of a tensor (torch's legacy nearest:
    `segment_ops.resize_labels_nearest`) and centre cropped to `size` x `size`."""
    label_map = torch.as_tensor(np.asarray(label_map)).long()
    resized = resize_labels_nearest(label_map[None], shorter_side_size(*label_map.shape, size))[0].numpy()
    return CastImageProcessor().center_crop(resized, SizeDict(height=size, width=size))


@dataclass
class PaperViews:
    """One example in the paper's geometry: `cast_image` (bilinear crop), `clip_image` (bicubic crop, also SAM's),
    `object_map` / `part_map` (ground truth, int64 `[size, size]`)."""

    key: str
    cast_image: Image.Image
    clip_image: Image.Image
    object_map: np.ndarray
    part_map: np.ndarray


def paper_views(example, size=PAPER_IMAGE_SIZE):
    return PaperViews(
        example.key,
        paper_image_view(example.image, size, PILImageResampling.BILINEAR),
        paper_image_view(example.image, size, PILImageResampling.BICUBIC),
        paper_label_view(example.object_map, size),
        paper_label_view(example.part_map, size),
    )


# --------------------------------------------------------------------------------------------------------------
# Segments: CAST, ViT + k-means, SAM
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Segments:
    """Boolean object and part masks `[S, size, size]`; `authors_keep`: whether the authors' loop scores the image."""

    object_masks: torch.Tensor
    part_masks: torch.Tensor
    authors_keep: bool = True


def consecutive_ids(segment_map):
    """Whether the ids of a segment map are 0..n-1 (the authors' loop raises on, and skips, a part map without)."""
    ids = torch.as_tensor(segment_map).unique()
    return bool(torch.equal(ids.cpu(), torch.arange(len(ids))))


class CastSegments:
    """CAST's segments: `object_level` (default 4) for objects, `part_level` (default 3) for parts, on the bilinear
    crop (superpixels by the model's `CastImageProcessor`, no further resize or crop)."""

    name = "cast"

    def __init__(self, model, processor, object_level=DEFAULT_OBJECT_LEVEL, part_level=DEFAULT_PART_LEVEL):
        self.model, self.processor = model.eval(), processor
        self.object_level, self.part_level = object_level, part_level

    @torch.no_grad()
    def __call__(self, views):
        inputs = self.processor(images=[views.cast_image], do_resize=False, do_center_crop=False, return_tensors="pt")
        device = self.model.device
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(device), superpixels=inputs["superpixels"].to(device)
        )
        maps = outputs.hierarchy_maps(inputs["superpixels"].to(device))
        part_map = maps[self.part_level][0].cpu()
        return Segments(
            segment_masks(maps[self.object_level][0].cpu())[1], segment_masks(part_map)[1], consecutive_ids(part_map)
        )


class VitKMeansSegments:
    """The ViT + k-means baseline (`baselines.vit_kmeans_hierarchy` into `num_clusters` segments, finest first) on the
    bilinear crop; objects and parts are the levels `object_level` and `part_level` (1 = the finest)."""

    name = "vit_kmeans"

    def __init__(
        self,
        vit_model,
        num_clusters=DEFAULT_NUM_CLUSTERS,
        object_level=DEFAULT_OBJECT_LEVEL,
        part_level=DEFAULT_PART_LEVEL,
        max_fit_pixels=4096,
        seed=0,
    ):
        self.vit_model, self.num_clusters = vit_model.eval(), tuple(num_clusters)
        self.object_level, self.part_level = object_level, part_level
        self.max_fit_pixels, self.seed = max_fit_pixels, seed

    @torch.no_grad()
    def __call__(self, views):
        vit = getattr(self.vit_model, "vit", self.vit_model)
        pixel_values = images_to_pixel_values([views.cast_image], vit.config.image_size).to(vit.device)
        maps = vit_kmeans_hierarchy(
            self.vit_model,
            pixel_values,
            self.num_clusters,
            output_size=views.object_map.shape,
            max_fit_pixels=self.max_fit_pixels,
            seed=self.seed,
        )
        objects, parts = maps[self.object_level - 1][0].cpu(), maps[self.part_level - 1][0].cpu()
        return Segments(segment_masks(objects)[1], segment_masks(parts)[1], True)  # the authors relabel: always kept


class SamSegments:
    """SAM's masks (transformers' `mask-generation` pipeline, as `sam_masks.sam_mask_generator` makes it) on the
    bicubic crop, sorted by area (largest first), as objects and as parts; `generate_kwargs` go to the pipeline call
    (e.g. `points_per_batch`)."""

    name = "sam"

    def __init__(self, mask_generator, **generate_kwargs):
        self.mask_generator, self.generate_kwargs = mask_generator, generate_kwargs

    def __call__(self, views):
        outputs = self.mask_generator(views.clip_image, **self.generate_kwargs)
        masks = [torch.as_tensor(np.asarray(mask)).bool() for mask in outputs["masks"]]
        masks = sorted(masks, key=lambda mask: int(mask.sum()), reverse=True)
        size = views.object_map.shape
        stacked = torch.stack(masks) if masks else torch.zeros((0, *size), dtype=torch.bool)
        if tuple(stacked.shape[-2:]) != tuple(size):
            raise InvalidInputError(f"SAM returned masks of size {tuple(stacked.shape[-2:])} for a {size} image.")
        return Segments(stacked, stacked, bool(masks))  # the authors' loop fails on an image without masks


# --------------------------------------------------------------------------------------------------------------
# Labelling and scoring
# --------------------------------------------------------------------------------------------------------------


@dataclass
class OpenVocabularyLabeler:
    """Labels segments with a CLIP-style model (see `segment_labeling.label_segments`), with the taxonomy's object
    names + background and, for each object, its part names."""

    clip_model: object
    clip_image_processor: object
    clip_tokenizer: object
    taxonomy: PartTaxonomy
    hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE
    masking: str = "fill"
    segment_batch_size: int = DEFAULT_SEGMENT_BATCH_SIZE
    fill_value: float = DEFAULT_FILL_VALUE
    blur_sigma: float = DEFAULT_BLUR_SIGMA
    texts: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        objects = list(self.taxonomy.objects)
        part_names, self.parts_of = part_vocabulary(objects, self.taxonomy.parts_by_object())
        # The vocabulary's part index -> the taxonomy's part id (the background last in both).
        self.part_ids = torch.tensor([self.taxonomy.parts.index(name) for name in part_names] + [len(part_names)])
        self.texts = {"objects": self.encode(objects + [BACKGROUND_LABEL]), "parts": self.encode(part_names)}

    def encode(self, names):
        return encode_texts(self.clip_model, self.clip_tokenizer, names, self.hypothesis_template)

    def clip_pixel_values(self, image):
        """CLIP's input of a view: `[3, h, w]` (the whole view, resized to CLIP's input size)."""
        processor = self.clip_image_processor
        return processor(images=[image], return_tensors="pt", **whole_image_size(processor))["pixel_values"][0]

    def __call__(self, views, segments):
        """Predicted object and part label maps (int64 numpy `[size, size]`, taxonomy ids) of one image."""
        result = label_segments(
            self.clip_model,
            [self.clip_pixel_values(views.clip_image)],
            [segments.object_masks],
            self.texts["objects"],
            [segments.part_masks],
            self.texts["parts"],
            self.parts_of,
            self.masking,
            self.segment_batch_size,
            self.fill_value,
            self.blur_sigma,
        )[0]
        return result["object_map"].cpu().numpy(), self.part_ids[result["part_map"].cpu()].numpy()


def image_scores(prediction, reference, num_labels):
    """`{"jaccard", "intersection", "union"}` of one image (per-class pixel counts, for the dataset-level mIoU)."""
    intersection, union, _, _ = intersect_and_union(prediction, reference, num_labels)
    return {
        "jaccard": jaccard_from_counts(intersection, union),
        "intersection": intersection.tolist(),
        "union": union.tolist(),
    }


def summarise(rows, taxonomy):
    """Per model and for objects / parts: `mean_per_image_jaccard` (all images), `mean_iou` (dataset level),
    `per_category_iou`, `num_images`, and `authors_selection` (`mean_per_image_jaccard` and `num_images` over the
    images the authors' loop keeps). Scores in [0, 1]."""
    summary = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        model_rows = [row for row in rows if row["model"] == model]
        summary[model] = {}
        for kind, labels in (("objects", taxonomy.object_labels), ("parts", taxonomy.part_labels)):
            scores = np.array([row[kind]["jaccard"] for row in model_rows], dtype=np.float64)
            kept = np.array([row["authors_keep"] for row in model_rows], dtype=bool)
            intersection = np.sum([row[kind]["intersection"] for row in model_rows], axis=0)
            union = np.sum([row[kind]["union"] for row in model_rows], axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_category = intersection / union
            summary[model][kind] = {
                "mean_per_image_jaccard": _nanmean(scores),
                "mean_iou": _nanmean(per_category),
                "per_category_iou": dict(zip(labels, per_category.tolist())),
                "num_images": len(model_rows),
                "authors_selection": {"mean_per_image_jaccard": _nanmean(scores[kept]), "num_images": int(kept.sum())},
            }
    return summary


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


# --------------------------------------------------------------------------------------------------------------
# The run: resumable per-image results
# --------------------------------------------------------------------------------------------------------------


def _read_results(path, settings):
    """The rows of a results file written with the same `settings` (a run killed half-way resumes from them); a
    last line cut short by the kill is dropped from the file."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0]).get("settings")
    if header != settings:
        raise InvalidInputError(
            f"{path} holds results of other settings ({header}); pass another --results_file or delete it."
        )
    rows = []
    for line in lines[1:]:
        try:
            rows.append(json.loads(line))
        except ValueError:  # only the last line of a killed run can be cut short
            path.write_text("\n".join([lines[0], *(json.dumps(row) for row in rows)]) + "\n", encoding="utf-8")
            break
    return rows


def evaluate_open_vocabulary(
    dataset, segmenters, labeler, image_size=PAPER_IMAGE_SIZE, results_file=None, settings=None, show_progress=None
):
    """Object and part scores of every segmenter on `dataset` (a `CocoPartDataset` / `MaskPartDataset`).

    Args:
        segmenters: `CastSegments`, `VitKMeansSegments`, `SamSegments` (anything with a `name` returning `Segments`).
        labeler: an `OpenVocabularyLabeler` with the dataset's taxonomy.
        results_file: a JSON-lines file receiving one row per image and segmenter as soon as it is scored; a run
            with the same `settings` (the file's first line) resumes from it (nothing is lost when a run is killed),
            on the same images or on more of them.
        show_progress: a progress bar (default: for `PROGRESS_MIN_IMAGES` images or more).

    Returns:
        `(summary, rows)`: `summarise(rows)` and the per-image rows `{"key", "model", "authors_keep", "objects":
        image_scores, "parts": image_scores}`.
    """
    from tqdm.auto import tqdm

    names = [segmenter.name for segmenter in segmenters]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"Segmenter names must be unique, got {names}.")
    rows = _read_results(results_file, settings) if results_file is not None else []
    done = {(row["key"], row["model"]) for row in rows}
    taxonomy = labeler.taxonomy
    show_progress = len(dataset) >= PROGRESS_MIN_IMAGES if show_progress is None else show_progress
    output = open(results_file, "a", encoding="utf-8") if results_file is not None else None  # noqa: SIM115
    try:
        for index in tqdm(range(len(dataset)), desc="open-vocabulary evaluation", disable=not show_progress):
            key = dataset.key(index)
            todo = [segmenter for segmenter in segmenters if (key, segmenter.name) not in done]
            if not todo:
                continue
            views = paper_views(dataset[index], image_size)
            for segmenter in todo:
                segments = segmenter(views)
                object_prediction, part_prediction = labeler(views, segments)
                row = {
                    "key": key,
                    "model": segmenter.name,
                    "authors_keep": segments.authors_keep,
                    "objects": image_scores(object_prediction, views.object_map, len(taxonomy.object_labels)),
                    "parts": image_scores(part_prediction, views.part_map, len(taxonomy.part_labels)),
                }
                rows.append(row)
                if output is not None:
                    output.write(json.dumps(row) + "\n")
                    output.flush()
    finally:
        if output is not None:
            output.close()
    keys = {dataset.key(index) for index in range(len(dataset))}
    rows = [row for row in rows if row["key"] in keys and row["model"] in names]  # a file may hold more
    if not rows:
        raise InvalidInputError("No images to evaluate.")
    return summarise(rows, taxonomy), rows


MODEL_NAMES = {"cast": "CAST", "vit_kmeans": "ViT + k-means", "sam": "SAM"}


def format_open_vocabulary_report(summary):
    """A markdown table of `summarise`'s output (mIoU in %, as the paper), with the paper's CAST-B numbers."""
    lines = [
        "| model | images | object mIoU | object mIoU (dataset) | part mIoU | part mIoU (dataset) | "
        "authors' selection: images, object / part mIoU |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    def percent(value):
        return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"

    for model, scores in summary.items():
        objects, parts = scores["objects"], scores["parts"]
        kept_objects, kept_parts = objects["authors_selection"], parts["authors_selection"]
        cells = [
            MODEL_NAMES.get(model, model),
            str(objects["num_images"]),
            percent(objects["mean_per_image_jaccard"]),
            percent(objects["mean_iou"]),
            percent(parts["mean_per_image_jaccard"]),
            percent(parts["mean_iou"]),
            f"{kept_objects['num_images']}, {percent(kept_objects['mean_per_image_jaccard'])} / "
            f"{percent(kept_parts['mean_per_image_jaccard'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    paper = ", ".join(f"{name} {r['objects']:.2f} / {r['parts']:.2f}" for name, r in PAPER_RESULTS.items())
    lines.append(f"\nmIoU: per-image Jaccard averaged over images (the paper's); paper (PartImageNet val): {paper}.")
    return "\n".join(lines)


def run_open_vocabulary_evaluation(
    model_name_or_path=None,
    clip_model=PAPER_CLIP_MODEL,
    annotation_file=None,
    image_root=None,
    dataset_name=None,
    split="validation",
    image_column=None,
    object_column="object_mask",
    part_column="part_mask",
    object_names=None,
    part_names=None,
    object_background=0,
    part_background=0,
    max_samples=None,
    object_level=DEFAULT_OBJECT_LEVEL,
    part_level=DEFAULT_PART_LEVEL,
    skip_cast=False,
    vit_model=None,
    vit_max_fit_pixels=4096,
    sam_model=None,
    sam_points_per_batch=64,
    hypothesis_template=DEFAULT_HYPOTHESIS_TEMPLATE,
    masking="fill",
    fill_value=DEFAULT_FILL_VALUE,
    blur_sigma=DEFAULT_BLUR_SIGMA,
    segment_batch_size=DEFAULT_SEGMENT_BATCH_SIZE,
    image_size=PAPER_IMAGE_SIZE,
    device="cpu",
    results_file=None,
    seed=0,
    show_progress=None,
):
    """The whole evaluation of `hf-hierseg evaluate open-vocabulary` / `scripts/evaluate_open_vocabulary.py`.

    Data: `annotation_file` + `image_root` (PartImageNet's COCO-style JSON), or `dataset_name` / `split` (a
    `datasets` dataset with `object_column` / `part_column` masks named by `object_names` / `part_names`; a folder
    written by `synthetic.write_synthetic_dataset` names its own). Segmenters: CAST (`model_name_or_path`, None = the
    bundled default model; `skip_cast` leaves it out), the ViT + k-means baseline (`vit_model`, a ViT folder or Hub
    id) and SAM (`sam_model`, e.g. "facebook/sam-vit-huge"). Returns `{"settings", "summary"}`.
    """
    from ..loading import load_cast_model, load_config, resolve_device, resolve_model_source
    from .segmentation_eval import load_dataset_split, vit_baseline_model
    from .views import evaluation_processor

    device = str(resolve_device(device))
    if (annotation_file is None) == (dataset_name is None):
        raise InvalidInputError("Give either --annotation_file (with --image_root) or --dataset_name.")
    if annotation_file is not None:
        if image_root is None:
            raise InvalidInputError("--annotation_file needs --image_root (the folder of its images).")
        dataset = CocoPartDataset(annotation_file, image_root, max_samples)
        data = {"annotation_file": str(annotation_file), "image_root": str(image_root)}
    else:
        from .synthetic import CLASS_NAMES, INFO_FILE, PART_NAMES

        if object_names is None and part_names is None and (Path(dataset_name) / INFO_FILE).is_file():
            object_names, part_names = ("background", *CLASS_NAMES), PART_NAMES
        if object_names is None or part_names is None:
            raise InvalidInputError(
                "--dataset_name needs --object_names and --part_names (the names of the mask values)."
            )
        split_data = load_dataset_split(dataset_name, split)
        dataset = MaskPartDataset(
            split_data,
            list(object_names),
            list(part_names),
            object_column,
            part_column,
            image_column,
            object_background,
            part_background,
            max_samples=max_samples,
        )
        data = {
            "dataset_name": str(dataset_name),
            "split": split,
            "object_column": object_column,
            "part_column": part_column,
        }
    segmenters = []
    if not skip_cast:
        source = resolve_model_source(model_name_or_path)
        view = {"do_resize": False, "do_center_crop": False}  # the evaluation makes the crop itself
        segmenters.append(
            CastSegments(
                load_cast_model(source, device=device), evaluation_processor(view, source), object_level, part_level
            )
        )
    if vit_model is not None:
        cast_config = load_config(resolve_model_source(model_name_or_path))
        vit, _ = vit_baseline_model(cast_config, vit_model)
        segmenters.append(
            VitKMeansSegments(
                vit.to(device), cast_config.num_clusters, object_level, part_level, vit_max_fit_pixels, seed
            )
        )
    if sam_model is not None:
        generator = sam_mask_generator(sam_model, device=device)
        segmenters.append(SamSegments(generator, points_per_batch=sam_points_per_batch))
    if not segmenters:
        raise InvalidInputError("Nothing to evaluate: CAST is skipped and no --vit_model or --sam_model is given.")
    clip, clip_image_processor, clip_tokenizer = load_clip(clip_model)
    labeler = OpenVocabularyLabeler(
        clip.to(device),
        clip_image_processor,
        clip_tokenizer,
        dataset.taxonomy,
        hypothesis_template,
        masking,
        segment_batch_size,
        fill_value,
        blur_sigma,
    )
    settings = {
        "data": data,
        "cast_model": None if skip_cast else str(resolve_model_source(model_name_or_path)),
        "object_level": object_level,
        "part_level": part_level,
        "vit_model": None if vit_model is None else str(vit_model),
        "sam_model": None if sam_model is None else str(sam_model),
        "clip_model": str(clip_model if isinstance(clip_model, str) else clip.name_or_path),
        "hypothesis_template": hypothesis_template,
        "masking": masking,
        "fill_value": fill_value,
        "blur_sigma": blur_sigma,
        "image_size": image_size,
        "seed": seed,
    }
    summary, _ = evaluate_open_vocabulary(
        dataset, segmenters, labeler, image_size, results_file, settings, show_progress
    )
    return {"settings": {**settings, "max_samples": max_samples, "num_images": len(dataset)}, "summary": summary}


__all__ = [
    "PAPER_RESULTS",
    "CastSegments",
    "CocoPartDataset",
    "MaskPartDataset",
    "OpenVocabularyLabeler",
    "PartExample",
    "PartTaxonomy",
    "SamSegments",
    "Segments",
    "VitKMeansSegments",
    "annotation_mask",
    "evaluate_open_vocabulary",
    "format_open_vocabulary_report",
    "image_scores",
    "paper_image_view",
    "paper_label_view",
    "paper_views",
    "polygon_mask",
    "polygons_mask",
    "rle_mask",
    "run_open_vocabulary_evaluation",
    "summarise",
]
