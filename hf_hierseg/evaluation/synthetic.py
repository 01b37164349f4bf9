"""A synthetic part-whole dataset for CPU-scale experiments: textured shapes on textured backgrounds.

Three variants (`VARIANTS`):

- `"contrasting"` (the default, the original set): every image shows one object of a shape class (house, mushroom,
  snowman, ...) made of two named parts, placed at a random position, scale, aspect and rotation on a textured
  background with small textured distractor blobs. Textures and colours are drawn independently of the class, so
  only the shape (the arrangement of the parts) tells the classes apart; but the object's colour is drawn to
  contrast with the background's, so colour (and position: one object, near the centre) alone separates object
  from background.
- `"camouflage"`: object and background share colour and texture statistics. Each image draws a palette of
  `CAMOUFLAGE_PALETTE_SIZE` textures; the background is a mosaic of Voronoi cells and ellipses each filled with a
  palette texture, and 2 or 3 objects of the image's class (bounding circles apart, so they rarely touch; fewer
  when no room is found; random scale, aspect and rotation) have
  each part filled with a palette texture too (the two parts of an object with different textures, each unlike the
  background under it, so the silhouette and the part layout stay visible). A region's colour and texture say
  nothing about whether it is object or background, or which parts belong together: only shapes and their layout
  do. The objects are small (about 11 % of the image in all).
- `"camouflage_large"`: the same, with one large object (height 0.7-0.95 of the image side, about 26 % of the image,
  9-60 %), so that it can be the majority of a coarse segment and its class is learnable in a short run.
  `CAMOUFLAGE_LAYOUTS` holds each camouflage variant's number and size of objects.

Each example has:

- `image`: RGB PIL image;
- `object_mask`: PIL "L" image, 0 = background, `label + 1` on the object (a semantic mask with
  `len(CLASS_NAMES) + 1` labels);
- `part_mask`: PIL "L" image, 0 = background, else the index of the part in `PART_NAMES` ("house/roof", ...);
- `label` / `label_name`: the class.

Examples are deterministic: example `i` of a split depends only on `(seed, split, i, image_size, variant)`.
"""

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


# Class name -> part names, in painting order (a later part covers an earlier one where they overlap).
SHAPE_PARTS = {
    "house": ("roof", "walls"),
    "mushroom": ("cap", "stem"),
    "snowman": ("body", "head"),
    "arrow": ("head", "shaft"),
    "dumbbell": ("weights", "bar"),
    "hammer": ("head", "handle"),
}
CLASS_NAMES = tuple(SHAPE_PARTS)
PART_NAMES = ("background",) + tuple(f"{name}/{part}" for name, parts in SHAPE_PARTS.items() for part in parts)
SPLITS = ("train", "validation", "test")
TEXTURES = ("solid", "stripes", "checker", "dots", "noise")
MIN_IMAGE_SIZE = 32
CAMOUFLAGE_PALETTE_SIZE = 4


@dataclasses.dataclass(frozen=True)
class CamouflageLayout:
    """How many objects a camouflage image shows and how large: `objects` (at least, at most) per image, each of
    height `scale` (a fraction of the image side, drawn uniformly in the range)."""

    objects: tuple
    scale: tuple


# Variant name -> layout of its objects (the `"contrasting"` variant has its own, one object per image).
CAMOUFLAGE_LAYOUTS = {
    # 2-3 small objects, about 11 % of the image in all.
    "camouflage": CamouflageLayout(objects=(2, 3), scale=(0.3, 0.42)),
    # One large object, about 26 % of the image (9-60 %): it is the majority of a coarse segment.
    "camouflage_large": CamouflageLayout(objects=(1, 1), scale=(0.7, 0.95)),
}
VARIANTS = ("contrasting",) + tuple(CAMOUFLAGE_LAYOUTS)
CAMOUFLAGE_OBJECTS = CAMOUFLAGE_LAYOUTS["camouflage"].objects  # objects per image, at least and at most


# --------------------------------------------------------------------------------------------------------------
# Shapes, in object coordinates: u to the right, v downwards, the object spanning about [-0.5, 0.5] in both.
# --------------------------------------------------------------------------------------------------------------


def _triangle(u, v, apex, base, half_width):
    """Isosceles triangle pointing up, apex at v = `apex`, base at v = `base` with half-width `half_width`."""
    return (v >= apex) & (v <= base) & (np.abs(u) <= half_width * (v - apex) / (base - apex))


def _disk(u, v, center_v, radius):
    return u**2 + (v - center_v) ** 2 <= radius**2


def _box(u, v, half_width, top, bottom):
    return (np.abs(u) <= half_width) & (v >= top) & (v <= bottom)


def _shape_parts(name, u, v):
    """Boolean masks of the parts of shape class `name`, in the order of `SHAPE_PARTS[name]`."""
    if name == "house":
        return [_triangle(u, v, -0.5, 0.0, 0.45), _box(u, v, 0.32, 0.0, 0.5)]
    if name == "mushroom":
        return [(v <= 0.0) & ((u / 0.5) ** 2 + (v / 0.4) ** 2 <= 1), _box(u, v, 0.14, 0.0, 0.5)]
    if name == "snowman":
        return [_disk(u, v, 0.17, 0.31), _disk(u, v, -0.3, 0.18)]
    if name == "arrow":
        return [_triangle(u, v, -0.5, -0.1, 0.3), _box(u, v, 0.07, -0.1, 0.5)]
    if name == "dumbbell":
        return [(np.abs(u) >= 0.3) & (np.abs(u) <= 0.5) & (np.abs(v) <= 0.25), _box(u, v, 0.3, -0.06, 0.06)]
    if name == "hammer":
        return [_box(u, v, 0.42, -0.5, -0.28), _box(u, v, 0.07, -0.28, 0.5)]
    raise ValueError(f"Unknown shape class {name!r}; choose one of {CLASS_NAMES}.")


# --------------------------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------------------------


def _texture(rng, size, colours, kind):
    """A `[size, size, 3]` float texture mixing two colours with a pattern of the given kind."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if kind == "solid":
        weight = np.zeros((size, size), dtype=np.float32)
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 12) * size / 64
        weight = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + rng.uniform(0, 6.3)) > 0
    elif kind == "checker":
        period = rng.uniform(4, 10) * size / 64
        offset = rng.uniform(0, period, size=2)
        weight = ((np.floor((x + offset[0]) / period) + np.floor((y + offset[1]) / period)) % 2) == 1
    elif kind == "dots":
        period = rng.uniform(5, 10) * size / 64
        offset = rng.uniform(0, period, size=2)
        dx = (x + offset[0]) % period - period / 2
        dy = (y + offset[1]) % period - period / 2
        weight = dx**2 + dy**2 <= (rng.uniform(0.2, 0.35) * period) ** 2
    elif kind == "noise":
        cells = int(rng.integers(3, 8))
        coarse = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
        weight = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    else:
        raise ValueError(f"Unknown texture {kind!r}; choose one of {TEXTURES}.")
    weight = np.asarray(weight, dtype=np.float32)[..., None]
    return (1 - weight) * colours[0] + weight * colours[1]


def _random_texture(rng, size, base_colour):
    """A texture of random kind whose two colours lie near `base_colour`."""
    colours = np.clip(base_colour + rng.uniform(-0.2, 0.2, size=(2, 3)), 0, 1).astype(np.float32)
    return _texture(rng, size, colours, TEXTURES[rng.integers(len(TEXTURES))])


def _contrasting_colours(rng, min_distance=0.35, attempts=50):
    """Background and object base colours at least `min_distance` apart (RGB in [0, 1])."""
    for _ in range(attempts):
        background, foreground = rng.uniform(0, 1, size=(2, 3))
        if np.linalg.norm(background - foreground) >= min_distance:
            break
    return background, foreground


# --------------------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------------------


def _example_rng(seed, split, index):
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def _object_coordinates(x, y, centre, scale, aspect, angle):
    """Object coordinates `(u, v)` of the pixel grid for an object of height `scale`, width `scale * aspect`,
    rotated by `angle` (radians) about `centre` (x, y)."""
    dx, dy = x - centre[0], y - centre[1]
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / (scale * aspect)
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / scale
    return u, v


def _example_dict(image, part_mask, label):
    """The example of a float `[S, S, 3]` image in [0, 1] (already noisy) and its part mask."""
    object_mask = np.where(part_mask > 0, label + 1, 0).astype(np.uint8)
    return {
        "image": Image.fromarray((image * 255).round().astype(np.uint8)),
        "object_mask": Image.fromarray(object_mask),
        "part_mask": Image.fromarray(part_mask),
        "label": label,
        "label_name": CLASS_NAMES[label],
    }


def _contrasting_example(rng, size, label, max_distractors):
    """One object whose colour contrasts with the background (the `"contrasting"` variant)."""
    name = CLASS_NAMES[label]
    background_colour, object_colour = _contrasting_colours(rng)

    image = _random_texture(rng, size, background_colour)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(int(rng.integers(0, max_distractors + 1))):  # clutter: small textured ellipses
        centre = rng.uniform(0, size, size=2)
        radii = rng.uniform(0.05, 0.12, size=2) * size
        blob = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 <= 1
        image[blob] = _random_texture(rng, size, rng.uniform(0, 1, size=3))[blob]

    # Object placement: height `scale`, width `scale * aspect`, rotated by `angle` about `centre`.
    scale = rng.uniform(0.5, 0.8) * size
    aspect = rng.uniform(0.8, 1.25)
    angle = math.radians(rng.uniform(-25, 25))
    margin = max(0.0, size / 2 - 0.5 * scale * max(aspect, 1.0))
    centre = size / 2 + rng.uniform(-margin, margin, size=2)
    u, v = _object_coordinates(x, y, centre, scale, aspect, angle)

    part_mask = np.zeros((size, size), dtype=np.uint8)
    shared_texture = _random_texture(rng, size, object_colour) if rng.uniform() < 0.5 else None
    for part_name, part in zip(SHAPE_PARTS[name], _shape_parts(name, u, v)):
        texture = shared_texture if shared_texture is not None else _random_texture(rng, size, object_colour)
        image[part] = texture[part]
        part_mask[part] = PART_NAMES.index(f"{name}/{part_name}")

    image = np.clip(image + rng.normal(0, 0.02, size=image.shape), 0, 1)
    return _example_dict(image, part_mask, label)


def _camouflage_background(rng, size, x, y, num_textures):
    """Palette index `[S, S]` of a background mosaic: Voronoi cells and 1-2 ellipses, each a random palette texture."""
    seeds = rng.uniform(0, size, size=(int(rng.integers(5, 10)), 2))
    distance = (x[..., None] - seeds[:, 0]) ** 2 + (y[..., None] - seeds[:, 1]) ** 2  # [S, S, cells]
    texture_index = rng.integers(num_textures, size=len(seeds))[distance.argmin(-1)]
    for _ in range(int(rng.integers(1, 3))):
        centre = rng.uniform(0, size, size=2)
        radii = rng.uniform(0.08, 0.18, size=2) * size
        blob = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 <= 1
        texture_index[blob] = rng.integers(num_textures)
    return texture_index


def _place_objects(rng, size, num_objects, layout, attempts=50):
    """Up to `num_objects` placements `(centre, scale, aspect, angle)` whose bounding circles lie inside the image and
    do not overlap (the first always fits; a later one that finds no room in `attempts` draws is left out)."""
    placements, circles = [], []
    for _ in range(num_objects):
        for _ in range(attempts):
            scale = rng.uniform(*layout.scale) * size
            aspect = rng.uniform(0.8, 1.25)
            angle = math.radians(rng.uniform(-25, 25))
            radius = min(0.5 * scale * max(aspect, 1.0), size / 2)
            centre = rng.uniform(radius, size - radius, size=2)
            if all(np.hypot(*(centre - other)) >= radius + other_radius for other, other_radius in circles):
                placements.append((centre, scale, aspect, angle))
                circles.append((centre, radius))
                break
    return placements


def _camouflage_example(rng, size, label, layout):
    """Objects of class `label` (as many and as large as `layout`) whose parts wear the background's palette (the
    `"camouflage"` variants)."""
    name = CLASS_NAMES[label]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    num_textures = CAMOUFLAGE_PALETTE_SIZE
    palette = np.stack([_random_texture(rng, size, rng.uniform(0, 1, size=3)) for _ in range(num_textures)])
    texture_index = _camouflage_background(rng, size, x, y, num_textures)

    part_mask = np.zeros((size, size), dtype=np.uint8)
    low, high = layout.objects
    for centre, scale, aspect, angle in _place_objects(rng, size, int(rng.integers(low, high + 1)), layout):
        u, v = _object_coordinates(x, y, centre, scale, aspect, angle)
        used = []
        for part_name, part in zip(SHAPE_PARTS[name], _shape_parts(name, u, v)):
            if not part.any():
                continue
            # A texture unlike the one under the part (its outline shows) and unlike the object's other part.
            under = np.bincount(texture_index[part], minlength=num_textures).argmax()
            choices = [index for index in range(num_textures) if index != under and index not in used]
            used.append(choices[rng.integers(len(choices))])
            texture_index[part] = used[-1]
            part_mask[part] = PART_NAMES.index(f"{name}/{part_name}")

    rows, columns = np.indices((size, size))
    image = palette[texture_index, rows, columns]  # [S, S, 3]
    image = np.clip(image + rng.normal(0, 0.02, size=image.shape), 0, 1)
    return _example_dict(image, part_mask, label)


def generate_example(index, seed=0, split="train", image_size=64, max_distractors=1, variant="contrasting"):
    """Example `index` of `split` (a dict with `image`, `object_mask`, `part_mask`, `label`, `label_name`).

    The class is `index % len(CLASS_NAMES)` (balanced classes); everything else is drawn from a generator seeded by
    `(seed, split, index)`. `variant` is one of `VARIANTS` (see the module docstring); `max_distractors` applies to
    `"contrasting"` only.
    """
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ValueError(f"`image_size` must be at least {MIN_IMAGE_SIZE}, got {image_size}.")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown synthetic variant {variant!r}; choose one of {VARIANTS}.")
    rng = _example_rng(seed, split, index)
    label = int(index) % len(CLASS_NAMES)
    if variant in CAMOUFLAGE_LAYOUTS:
        return _camouflage_example(rng, int(image_size), label, CAMOUFLAGE_LAYOUTS[variant])
    return _contrasting_example(rng, int(image_size), label, max_distractors)


# --------------------------------------------------------------------------------------------------------------
# Writing and loading
# --------------------------------------------------------------------------------------------------------------

INFO_FILE = "synthetic_info.json"
FORMATS = ("imagefolder", "parquet")


def dataset_features():
    """`datasets.Features` of the dataset (with `label` as a `ClassLabel`)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "object_mask": datasets.Image(),
            "part_mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_NAMES)),
            "label_name": datasets.Value("string"),
        }
    )


def _write_imagefolder_split(split_dir, examples):
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "masks").mkdir(parents=True, exist_ok=True)
    with open(split_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index, example in examples:
            stem = f"{index:06d}"
            row = {
                "file_name": f"images/{stem}.png",
                "object_mask_file_name": f"masks/{stem}_object.png",
                "part_mask_file_name": f"masks/{stem}_parts.png",
                "label": example["label"],
                "label_name": example["label_name"],
            }
            example["image"].save(split_dir / row["file_name"])
            example["object_mask"].save(split_dir / row["object_mask_file_name"])
            example["part_mask"].save(split_dir / row["part_mask_file_name"])
            metadata.write(json.dumps(row) + "\n")


def _write_parquet_split(data_dir, split, examples, num_examples, shard_size):
    import datasets

    data_dir.mkdir(parents=True, exist_ok=True)
    features = dataset_features()
    num_shards = max(1, math.ceil(num_examples / shard_size))
    rows, shard = [], 0

    def flush():
        nonlocal rows, shard
        path = data_dir / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
        rows, shard = [], shard + 1

    for _, example in examples:
        rows.append(example)
        if len(rows) == shard_size:
            flush()
    if rows:
        flush()


def write_synthetic_dataset(
    output_dir,
    num_images=600,
    num_test_images=None,
    image_size=64,
    format="imagefolder",
    seed=0,
    max_distractors=1,
    shard_size=1000,
    variant="contrasting",
):
    """Write the dataset with a `train` split of `num_images` and a `test` split (default `num_images // 5`), of the
    synthetic `variant` (one of `VARIANTS`, see the module docstring).

    Formats (both load offline with `datasets.load_dataset(format, data_dir=output_dir)`, `streaming=True` too):

    - `"imagefolder"`: `{split}/images/*.png`, `{split}/masks/*_object.png|*_parts.png` and `{split}/metadata.jsonl`
      (columns `file_name`, `object_mask_file_name`, `part_mask_file_name`, `label`, `label_name`);
    - `"parquet"`: `data/{split}-0000k-of-0000n.parquet` with Image columns and `label` as a `ClassLabel`.

    A `synthetic_info.json` records the settings, class names and part names. Returns the output `Path`.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    if int(num_images) < 1:
        raise ValueError(f"`num_images` must be at least 1, got {num_images}.")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ValueError(f"`image_size` must be at least {MIN_IMAGE_SIZE}, got {image_size}.")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown synthetic variant {variant!r}; choose one of {VARIANTS}.")
    num_test_images = max(1, int(num_images) // 5) if num_test_images is None else int(num_test_images)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    split_sizes = {"train": int(num_images), "test": num_test_images}
    for split, num_examples in split_sizes.items():
        if num_examples == 0:
            continue
        examples = (
            (index, generate_example(index, seed, split, image_size, max_distractors, variant))
            for index in range(num_examples)
        )
        if format == "imagefolder":
            _write_imagefolder_split(output_dir / split, examples)
        else:
            _write_parquet_split(output_dir / "data", split, examples, num_examples, shard_size)
    info = {
        "format": format,
        "variant": variant,
        "seed": int(seed),
        "image_size": int(image_size),
        "max_distractors": int(max_distractors),
        "splits": {split: n for split, n in split_sizes.items() if n > 0},
        "class_names": list(CLASS_NAMES),
        "part_names": list(PART_NAMES),
        "object_mask": "0 = background, label + 1 on the object",
        "part_mask": "0 = background, else the index of the part in part_names",
    }
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return output_dir


def load_synthetic_dataset(path, split=None, streaming=False):
    """Load a dataset written by `write_synthetic_dataset` with `datasets.load_dataset`, `label` as a `ClassLabel`."""
    import datasets

    path = Path(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file} not found: {path} was not written by `write_synthetic_dataset`.")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    data_dir = path / "data" if info["format"] == "parquet" else path
    dataset = datasets.load_dataset(info["format"], data_dir=str(data_dir), split=split, streaming=streaming)
    if info["format"] == "imagefolder":
        dataset = dataset.cast_column("label", datasets.ClassLabel(names=info["class_names"]))
    return dataset


__all__ = [
    "VARIANTS",
    "CAMOUFLAGE_LAYOUTS",
    "CamouflageLayout",
    "SHAPE_PARTS",
    "CLASS_NAMES",
    "PART_NAMES",
    "generate_example",
    "dataset_features",
    "write_synthetic_dataset",
    "load_synthetic_dataset",
]
