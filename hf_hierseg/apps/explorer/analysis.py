"""What the explorer computes for one image, without any web framework: the model's hierarchy (label maps at the
display size, parents, areas and bounding boxes at the image's size), the wholes and parts of a selected region,
the pictures shown (level views, the selection highlighted) and the files offered for download.

    explorer = ExplorerModel.load()  # the bundled default model
    analysis = explorer.analyse(open_image("photo.jpg"), "photo")
    selection = analysis.select_at(level=2, x=120, y=80)  # the region under a pixel of the display image
    hierarchy = analysis.hierarchy(selection)  # its wholes (levels above) and parts (levels below), with areas
    picture = analysis.picture(level=3, view="overlay", selection=selection)
"""

import dataclasses
import json
import os
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import torch

from ...errors import InvalidInputError
from ...image_processing_cast import hierarchy_level_maps, segment_statistics
from ...loading import (
    CLASSIFIER_ARCHITECTURE,
    HIERARCHICAL_ARCHITECTURE,
    SEGMENTATION_ARCHITECTURE,
    load_model_and_processor,
)
from ...pipelines import level_segments, resized_label_maps, whole_image_size
from ...segment_ops import resize_label_maps
from ...visualization import label_palette, overlay_boundaries, overlay_labels, region_mean_colors
from ..segment_images import encode_png, output_key, segment_record


NUM_LEVELS = 4  # levels 1..4 are shown; level 0 (the superpixels) is counted
DISPLAY_MAX_SIDE = 640  # longest side of the pictures shown (larger images are shown downscaled)
TOP_LABELS = 5
VIEWS = ("overlay", "boundaries", "mean colours")
# How the image is brought to the model: the pipelines' whole-image resize, or about its own size.
RESOLUTIONS = {
    "model input": "resized to the model's input size, as the pipelines do (fast)",
    "full resolution": "each side rounded down to a multiple of the patch size (slow; the cost guard applies)",
}
# What is shown beside the hierarchy, by the model's class (package or remote code: the same names).
MODEL_KINDS = {
    CLASSIFIER_ARCHITECTURE: "classifier",
    HIERARCHICAL_ARCHITECTURE: "hierarchical",
    SEGMENTATION_ARCHITECTURE: "segmentation",
}
HIGHLIGHT_COLOR = (255, 0, 200)
DIMMED = 0.3  # brightness kept outside the selected region
OUTLINE_WIDTH = 2  # pixels, inward from the selected region's edge


@dataclasses.dataclass(frozen=True)
class Selection:
    """A region: its id among the segments of `level` (1..4)."""

    level: int
    region: int


def open_image(path):
    """A decoded PIL image from an uploaded file, or an `InvalidInputError` naming what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path.name}: no such file was uploaded.")
    if os.path.getsize(path) == 0:
        raise InvalidInputError(f"{path.name} is empty (0 bytes): upload an image file (JPEG, PNG, WebP, ...).")
    try:
        image = PIL.Image.open(path)
        image.load()
    except PIL.Image.DecompressionBombError as error:
        raise InvalidInputError(f"{path.name} is too large to decode safely: {error}") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InvalidInputError(
            f"{path.name} is not an image this app can read ({type(error).__name__}: {error}). Upload a JPEG, PNG, "
            "WebP, GIF, BMP or TIFF file."
        ) from None
    return image


def display_size(height, width, max_side=DISPLAY_MAX_SIDE):
    """`(height, width)` of the pictures shown: the image's own size, downscaled to fit `max_side` if larger."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class ExplorerModel:
    """A CAST model and its image processor, and what the explorer shows for the model's kind: the hierarchy always;
    top labels for a classifier (`config.id2label`); the class map for a segmentation model.

    Args:
        model: a CAST model (`CastModel`, a classifier or `CastForSemanticSegmentation`) in eval mode.
        processor: its `CastImageProcessor`.
        name: how the model is named in the page and the JSON.
    """

    def __init__(self, model, processor, name):
        self.model = model
        self.processor = processor
        self.name = name
        self.kind = MODEL_KINDS.get(type(model).__name__, "backbone")

    @classmethod
    def load(cls, model_name_or_path=None, device="cpu", trust_remote_code=False):
        """Load a model folder or Hub id (default: the bundled default model) with its processor; classifier and
        segmentation checkpoints keep their heads."""
        model, processor = load_model_and_processor(
            model_name_or_path, classifier=True, trust_remote_code=trust_remote_code, device=device
        )
        name = str(model_name_or_path) if model_name_or_path is not None else "hf_hierseg default model"
        return cls(model, processor, name)

    def processing_arguments(self, resolution, height, width):
        """Processor arguments for an image of `height x width` pixels at `resolution` (a key of `RESOLUTIONS`)."""
        if resolution not in RESOLUTIONS:
            raise InvalidInputError(f"resolution must be one of {sorted(RESOLUTIONS)}, got {resolution!r}.")
        if resolution == "model input":
            return whole_image_size(self.processor)
        patch = self.model.config.patch_size
        size = {"height": max(patch, height // patch * patch), "width": max(patch, width // patch * patch)}
        return {"do_resize": True, "do_center_crop": False, "size": size}

    def analyse(self, image, name, resolution="model input"):
        """The hierarchy of `image` (a PIL image of any size and mode, read as the processor reads it).

        Raises:
            ValueError: what the processor or the model refuse, e.g. the cost guard (`max_superpixels`,
                `config.max_attention_memory`) at full resolution.
        """
        rgb = self.processor.process_image(image)  # uint8 [H, W, 3]: EXIF rotation, modes, size limit
        height, width = rgb.shape[:2]
        inputs = self.processor(
            images=[rgb],
            return_tensors="pt",
            input_data_format="channels_last",
            **self.processing_arguments(resolution, height, width),
        )
        with torch.inference_mode():
            outputs = self.model(**inputs.to(self.model.device), return_dict=True)
            superpixels = inputs["superpixels"]
            label_maps = hierarchy_level_maps(outputs, superpixels)  # [1, 5, h, w] at the model's resolution
            at_image_size = segment_statistics(label_maps, [(height, width)])  # areas and boxes in image pixels
            parents = segment_statistics(label_maps, with_parents=True)["parents"][0]  # every label of the model
        label_maps = label_maps.cpu()
        shown = display_size(height, width)
        segments = [level_segments(at_image_size, level) for level in range(NUM_LEVELS + 1)]
        result = {"size": (height, width), "levels": [{"level": i, "segments": s} for i, s in enumerate(segments)]}
        record = {
            **segment_record(name, result),
            "model": self.name,
            "resolution": resolution,
            "model_input_size": list(label_maps.shape[-2:]),
        }
        analysis = Analysis(
            name=name,
            size=(height, width),
            image=np.asarray(PIL.Image.fromarray(rgb).resize(shown[::-1], PIL.Image.BILINEAR)),
            maps=resized_label_maps(label_maps[0], shown).astype(np.int32),  # [5, h, w] at the display size
            parents=parents.cpu().numpy(),
            areas=at_image_size["areas"][0].cpu().numpy(),
            model_maps=label_maps[0],
            record=record,
        )
        if self.kind in ("classifier", "hierarchical"):
            analysis.top_labels = self.top_labels(outputs.logits[0])
            record["top_labels"] = analysis.top_labels
        elif self.kind == "segmentation":
            classes = self.processor.post_process_semantic_segmentation(outputs, superpixels=superpixels)[0]
            analysis.class_map = resize_label_maps(classes.cpu(), shown).numpy()
            analysis.model_class_map = classes.cpu()
            id2label = self.model.config.id2label
            analysis.class_names = [id2label.get(i, str(i)) for i in range(self.model.config.num_labels)]
            record["classes"] = analysis.class_shares()
        return analysis

    def top_labels(self, logits):
        """`{label: probability}` of the `TOP_LABELS` most likely classes (`config.id2label`)."""
        probabilities = logits.float().softmax(-1)
        values, indices = probabilities.topk(min(TOP_LABELS, probabilities.numel()))
        id2label = self.model.config.id2label
        return {id2label.get(int(i), str(int(i))): float(v) for v, i in zip(values, indices)}


@dataclasses.dataclass
class Analysis:
    """One image's hierarchy as the explorer shows it (kept per browser session).

    Fields: `name`; `size` `(height, width)` of the image; `image` uint8 `[h, w, 3]` at the display size; `maps` int32
    `[5, h, w]` the label maps of levels 0..4 at the display size; `parents` int64 `[5, S]` (the level-(l + 1) region
    of each level-l label, -1 at level 4 and for absent labels); `areas` int64 `[5, S]` in pixels of the image;
    `model_maps` int64 `[5, h_m, w_m]` at the model's resolution (resized for the downloads); `record` the JSON of
    the hierarchy; for a classifier `top_labels`, for a segmentation model `class_map` (display size),
    `model_class_map` and `class_names`.
    """

    name: str
    size: tuple
    image: np.ndarray
    maps: np.ndarray
    parents: np.ndarray
    areas: np.ndarray
    model_maps: torch.Tensor
    record: dict
    top_labels: dict | None = None
    class_map: np.ndarray | None = None
    model_class_map: torch.Tensor | None = None
    class_names: list | None = None

    # --- regions ------------------------------------------------------------------------------------------------

    def select_at(self, level, x, y):
        """The region of `level` (1..4) under pixel `(x, y)` of the display image."""
        level = _check_level(level)
        height, width = self.maps.shape[1:]
        if not all(isinstance(value, (int, float, np.integer, np.floating)) for value in (x, y)):
            raise InvalidInputError(f"x and y must be pixel coordinates (numbers), got {x!r} and {y!r}.")
        if not (0 <= int(x) < width and 0 <= int(y) < height):
            raise InvalidInputError(f"({x}, {y}) is outside the {width}x{height} picture.")
        return Selection(level, int(self.maps[level, int(y), int(x)]))

    def ancestor(self, selection, level):
        """The id of the level-`level` region (>= the selection's level) that holds the selected region."""
        region = selection.region
        for current in range(selection.level, level):
            region = int(self.parents[current, region])
        return region

    def parts(self, selection, level):
        """The ids of the level-`level` regions (< the selection's level) inside the selected region, ascending:
        those of the image (area > 0) whose ancestor at the selection's level is the selected region."""
        ids = np.flatnonzero(self.areas[level] > 0)
        regions = ids
        for current in range(level, selection.level):
            regions = self.parents[current, regions]
        return [int(i) for i in ids[regions == selection.region]]

    def region_area(self, level, region):
        return int(self.areas[level, region])

    def hierarchy(self, selection):
        """The selected region with its wholes and parts: `{"selected": row, "wholes": [row, ...] (level + 1 up to
        4), "parts": [row, ...] (levels below, down to 1), "superpixels": count}`, each row `{"level", "region",
        "area", "share"}` (`area` in pixels of the image, `share` of the image's area)."""
        total = self.size[0] * self.size[1]

        def row(level, region):
            area = self.region_area(level, region)
            return {"level": level, "region": region, "area": area, "share": area / total}

        wholes = [row(level, self.ancestor(selection, level)) for level in range(selection.level + 1, NUM_LEVELS + 1)]
        parts = [
            row(level, part) for level in range(selection.level - 1, 0, -1) for part in self.parts(selection, level)
        ]
        return {
            "selected": row(selection.level, selection.region),
            "wholes": wholes,
            "parts": parts,
            "superpixels": len(self.parts(selection, 0)),
        }

    def region_mask(self, selection, level):
        """`bool [h, w]` at the display size: what the selection is at `level` (its whole at a coarser level, the
        region itself, i.e. the union of its parts, at its own level and finer ones)."""
        if level >= selection.level:
            return self.maps[level] == self.ancestor(selection, level)
        return self.maps[selection.level] == selection.region

    # --- pictures -----------------------------------------------------------------------------------------------

    def view(self, level, view="overlay"):
        """The regions of `level` (0..4) drawn over the image: `uint8 [h, w, 3]` at the display size."""
        labels = self.maps[_check_level(level, lowest=0)]
        if view == "overlay":
            return overlay_labels(self.image, labels)
        if view == "boundaries":
            return overlay_boundaries(self.image, labels)
        if view == "mean colours":
            return region_mean_colors(self.image, labels)
        raise InvalidInputError(f"view must be one of {VIEWS}, got {view!r}.")

    def picture(self, level, view="overlay", selection=None):
        """`view(level, view)` with the selection (if any) highlighted: the pixels of `region_mask(selection, level)`
        as they are, those outside dimmed to `DIMMED`, an outline of `OUTLINE_WIDTH` pixels inside its edge."""
        picture = self.view(level, view)
        if selection is None:
            return picture
        return highlight(picture, self.region_mask(selection, level))

    def level_pictures(self, selection, view="overlay"):
        """`[(picture, caption)]` for levels 1..4 with the selection highlighted at each level."""
        pictures = []
        for level in range(1, NUM_LEVELS + 1):
            if level > selection.level:
                role, region = "whole", self.ancestor(selection, level)
            elif level == selection.level:
                role, region = "selected", selection.region
            else:
                role, region = f"{len(self.parts(selection, level))} parts", None
            if region is None:
                caption = f"level {level}: {role}"
            else:
                share = self.region_area(level, region) / (self.size[0] * self.size[1])
                caption = f"level {level}: {role} region {region} ({share:.1%})"
            pictures.append((self.picture(level, view, selection), caption))
        return pictures

    # --- model outputs ------------------------------------------------------------------------------------------

    def class_picture(self):
        """The predicted classes over the image (segmentation models): `uint8 [h, w, 3]`, or None."""
        if self.class_map is None:
            return None
        return overlay_labels(self.image, self.class_map)

    def class_shares(self):
        """`[{"class", "id", "share", "color"}]` of the classes present in the class map, largest first."""
        ids, counts = np.unique(self.model_class_map.numpy(), return_counts=True)
        palette = label_palette(max(len(self.class_names), int(ids.max()) + 1))
        rows = [
            {
                "class": self.class_names[i] if i < len(self.class_names) else str(i),
                "id": int(i),
                "share": float(c / counts.sum()),
                "color": "#" + "".join(f"{int(v):02x}" for v in palette[i]),
            }
            for i, c in zip(ids, counts)
        ]
        return sorted(rows, key=lambda row: -row["share"])

    # --- downloads ----------------------------------------------------------------------------------------------

    def write_downloads(self, folder):
        """Write the label maps (16-bit PNGs at the image's size: one per level 0..4, ids as in the JSON; the class
        map of a segmentation model) and the JSON record into `folder`. Returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key = output_key(Path(self.name).stem)
        paths = []
        for level in range(NUM_LEVELS + 1):  # one level at a time: a photo-sized int64 map each
            labels = resized_label_maps(self.model_maps[level : level + 1], self.size)[0].astype(np.uint16)
            paths.append(folder / f"{key}_level{level}_labels.png")
            paths[-1].write_bytes(encode_png(labels))
        if self.model_class_map is not None:
            classes = resize_label_maps(self.model_class_map, self.size).numpy().astype(np.uint16)
            paths.append(folder / f"{key}_classes.png")
            paths[-1].write_bytes(encode_png(classes))
        paths.append(folder / f"{key}.json")
        paths[-1].write_text(json.dumps(self.record, indent=1) + "\n", encoding="utf-8")
        return paths


def highlight(picture, mask):
    """`picture` (uint8 `[h, w, 3]`) with the pixels outside `mask` dimmed and an outline inside its edge."""
    dimmed = np.rint(picture * DIMMED).astype(np.uint8)
    result = np.where(mask[..., None], picture, dimmed)
    kernel = np.ones((2 * OUTLINE_WIDTH + 1, 2 * OUTLINE_WIDTH + 1), np.uint8)
    inner = cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
    result[mask & ~inner] = HIGHLIGHT_COLOR
    return result


def _check_level(level, lowest=1):
    if isinstance(level, float) and level.is_integer():
        level = int(level)
    if not isinstance(level, (int, np.integer)) or not lowest <= level <= NUM_LEVELS:
        raise InvalidInputError(f"level must be an integer in {lowest}..{NUM_LEVELS}, got {level!r}.")
    return int(level)


__all__ = [
    "DISPLAY_MAX_SIDE",
    "RESOLUTIONS",
    "VIEWS",
    "Analysis",
    "ExplorerModel",
    "Selection",
    "display_size",
    "highlight",
    "open_image",
]
