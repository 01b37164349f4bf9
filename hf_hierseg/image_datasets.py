"""Image datasets as training and evaluation read them: splits from `datasets` (Hub ids, image folders, parquet,
webdataset shards), the image / label / mask columns, and image and mask records decoded with clear errors.

Masks become integer class-id maps (`mask_to_class_ids`): palette ("P") and grayscale images give their pixel
values; RGB(A) colour masks need a `palette` (one colour per class id) unless their three channels are equal
(grayscale saved as RGB). Ids must lie in `0..num_labels-1` or equal the ignore index (255 by default), else a
`ValueError` names them.

Local data are checked when they are loaded: an unreadable parquet / webdataset shard (not parquet, truncated) is
skipped with a warning naming it and why (an error if every shard of a split is unreadable), and an image folder
whose class sub-folders include one without images is an error (it would silently not be a class).
"""

import logging
import os
import tarfile

import datasets
import numpy as np
import pyarrow.parquet
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

from .errors import InvalidInputError


logger = logging.getLogger(__name__)


LABEL_COLUMN_NAMES = ("label", "labels", "cls", "class", "target")


IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")


class UndecodableImageError(ValueError):
    """A record whose image cannot be read (corrupt, truncated, not an image)."""


def load_image_datasets(
    dataset_name=None,
    dataset_config_name=None,
    train_dir=None,
    validation_dir=None,
    streaming=False,
    cache_dir=None,
    token=None,
):
    """Load the splits as `run_image_classification_no_trainer.py` does.

    `dataset_name`: anything `datasets.load_dataset` takes: a Hub id, or a local folder of images (imagefolder,
    class sub-folders give labels), of parquet files with an `Image` column, or of webdataset `.tar` shards.
    `train_dir` / `validation_dir`: image folders. Returns a `DatasetDict` (or `IterableDatasetDict` if streaming).
    Local data are checked first (see the module docstring).
    """
    if dataset_name is not None:
        if os.path.isdir(dataset_name):
            return load_local_folder(dataset_name, dataset_config_name, streaming, cache_dir)
        return datasets.load_dataset(
            dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir, token=token
        )
    if train_dir is None and validation_dir is None:
        raise ValueError("Give `--dataset_name` or a `--train_dir` / `--validation_dir` image folder.")
    data_files = {}
    for split, folder in (("train", train_dir), ("validation", validation_dir)):
        if folder is not None:
            if not os.path.isdir(folder):
                raise ValueError(f"--{split if split == 'train' else 'validation'}_dir {folder!r} is not a folder.")
            check_class_folders(folder)
            data_files[split] = os.path.join(folder, "**")
    return load_prepared("imagefolder", None, data_files, streaming, cache_dir)


SHARD_BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}


def shard_problem(path):
    """Why the parquet / webdataset shard at `path` cannot be read (None if it can): the parquet footer, the tar
    member headers (a truncated file fails here)."""
    try:
        if path.endswith(".parquet"):
            pyarrow.parquet.ParquetFile(path).close()
        else:
            with tarfile.open(path) as archive:
                for _ in archive:
                    pass
    except Exception as error:  # pyarrow and tarfile raise their own types
        return f"{type(error).__name__}: {' '.join(str(error).split())}"
    return None


def readable_shards(folder):
    """{split: shard paths} of a local folder of parquet or webdataset shards without the unreadable ones (each
    skipped with a warning), the builder name ("parquet" / "webdataset"), and whether any was skipped; (None, None,
    False) for a folder of other files."""
    try:
        data_files = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    except datasets.data_files.EmptyDatasetError:
        return None, None, False
    shards = {
        str(split): [path for path in files if os.path.splitext(path)[1] in SHARD_BUILDERS]
        for split, files in data_files.items()
    }
    builders = {SHARD_BUILDERS[os.path.splitext(path)[1]] for files in shards.values() for path in files}
    if len(builders) != 1:
        return None, None, False
    readable, skipped = {}, False
    for split, files in shards.items():
        readable[split] = []
        for path in files:
            problem = shard_problem(path)
            if problem is None:
                readable[split].append(path)
            else:
                skipped = True
                logger.warning("Skipping the unreadable shard %s (%s).", path, problem)
        if not readable[split]:
            raise InvalidInputError(
                f"Every shard of split {split!r} of {folder} is unreadable ({len(files)} skipped, see the "
                "warnings): fix or replace them."
            )
    return readable, builders.pop(), skipped


def load_local_folder(folder, config_name, streaming, cache_dir):
    """A local `--dataset_name` folder: its readable shards, or an image folder whose class folders hold images."""
    shards, builder, skipped = readable_shards(folder)
    if skipped:
        return load_prepared(builder, None, shards, streaming, cache_dir)
    if shards is None:
        check_class_folders(folder)
    return load_prepared(folder, config_name, None, streaming, cache_dir)


def load_prepared(path, config_name, data_files, streaming, cache_dir):
    """`datasets.load_dataset`; a file that fails while a map-style dataset is prepared is an `InvalidInputError`
    (`datasets` logs the file's name)."""
    try:
        return datasets.load_dataset(
            path, config_name, data_files=data_files, streaming=streaming, cache_dir=cache_dir
        )
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__
        raise InvalidInputError(
            f"Could not prepare the dataset {path}: {type(cause).__name__}: {' '.join(str(cause).split())} (the "
            "file is named in the log above). Fix or remove it."
        ) from error


def empty_class_folders(root):
    """Sub-folders without any image (`datasets` image extensions, recursively) beside sub-folders with images,
    anywhere under `root`: class folders that would silently not be classes. Hidden folders (".", "_") are left
    out."""
    extensions = tuple(ImageFolder.EXTENSIONS)
    holds_images, empty = {}, []
    for folder, subfolders, files in os.walk(root, topdown=False):
        subfolders = [name for name in subfolders if not name.startswith((".", "_"))]
        children = [holds_images.get(os.path.join(folder, name), False) for name in subfolders]
        if any(children):
            empty += [os.path.join(folder, name) for name, full in zip(subfolders, children) if not full]
        holds_images[folder] = any(children) or any(name.lower().endswith(extensions) for name in files)
    return sorted(empty)


def check_class_folders(root):
    """Raise an `InvalidInputError` naming the class folders of the image folder `root` that hold no image."""
    empty = empty_class_folders(root)
    if empty:
        shown = ", ".join(os.path.relpath(path, root) for path in empty[:10])
        raise InvalidInputError(
            f"The image folder {root} has {len(empty)} class folder(s) without images: {shown}. They would not be "
            "classes (the labels are the folders that hold images); add images (.png, .jpg, ... as `datasets` "
            "reads them) or remove the folders."
        )


def image_column_of(dataset, name=None):
    """The column holding the images: `name` if given, else the first `datasets.Image` column."""
    features = dataset.features
    if name is not None:
        if features is not None and name not in features:
            raise ValueError(f"--image_column_name {name!r} is not a column; columns: {list(features)}.")
        return name
    if features is not None:
        for column, feature in features.items():
            if isinstance(feature, datasets.Image):
                return column
        for column in IMAGE_COLUMN_NAMES:
            if column in features:
                return column
        raise ValueError(
            f"No image column (a `datasets.Image` feature) among {list(features)}; pass --image_column_name."
        )
    raise ValueError("The dataset does not declare its features; pass --image_column_name.")


def label_column_of(dataset, name=None):
    """The label column: `name` if given, else the first `ClassLabel` column, else a column named like a label."""
    features = dataset.features or {}
    if name is not None:
        if features and name not in features:
            raise ValueError(f"--label_column_name {name!r} is not a column; columns: {list(features)}.")
        return name
    for column, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return column
    for column in LABEL_COLUMN_NAMES:
        if column in features:
            return column
    raise ValueError(f"No label column (a `ClassLabel` feature) among {list(features)}; pass --label_column_name.")


def label_names_of(dataset, label_column):
    """Class names, from the `ClassLabel` feature (or the sorted label values of a map-style dataset)."""
    feature = (dataset.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(dataset, datasets.Dataset):
        return [str(value) for value in range(int(max(dataset[label_column])) + 1)]
    raise ValueError(
        f"Column {label_column!r} is not a `ClassLabel`, and a streamed dataset cannot be scanned for "
        "its classes: cast it to `datasets.ClassLabel(names=...)` first."
    )


def decode_image(value):
    """An image record (`{"bytes", "path"}`, a path, or a PIL image) -> RGB PIL image, fully decoded.

    Raises `UndecodableImageError` for anything that does not decode."""
    try:
        if isinstance(value, (bytes, bytearray)):
            value = {"bytes": bytes(value), "path": None}
        image = datasets.Image().decode_example(value)
        image.load()
        if image.width < 1 or image.height < 1:
            raise ValueError(f"empty image of size {image.size}")
        return image.convert("RGB")
    except Exception as error:  # PIL raises many types (OSError, UnidentifiedImageError, SyntaxError, ...)
        raise UndecodableImageError(f"{type(error).__name__}: {error}") from error


MASK_COLUMN_NAMES = ("mask", "label", "labels", "annotation", "segmentation", "semantic_mask", "object_mask")


def decode_mask(value):
    """A mask record (`{"bytes", "path"}`, a path, a PIL image or an array) -> PIL image in its own mode, or a
    2-D / 3-D numpy array for array records. Never converts colours."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, dict, bytes, bytearray)):
        if isinstance(value, (bytes, bytearray)):
            value = {"bytes": bytes(value), "path": None}
        mask = datasets.Image().decode_example(value)
        mask.load()
        return mask
    return np.asarray(value)


def normalize_palette(palette):
    """`palette`: a list of RGB colours (index = class id) or a dict {colour: class id}; colours as (r, g, b)
    sequences or "#rrggbb" strings. Returns {packed 0xRRGGBB int: class id}."""

    def pack(colour):
        if isinstance(colour, str):
            text = colour.lstrip("#")
            if len(text) != 6:
                raise ValueError(f"Palette colour {colour!r} is not '#rrggbb'.")
            colour = tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))
        red, green, blue = (int(c) for c in colour)
        if not all(0 <= c <= 255 for c in (red, green, blue)):
            raise ValueError(f"Palette colour {colour!r} has channels outside 0..255.")
        return (red << 16) | (green << 8) | blue

    if isinstance(palette, dict):
        return {pack(colour): int(class_id) for colour, class_id in palette.items()}
    return {pack(colour): class_id for class_id, colour in enumerate(palette)}


def colours_to_class_ids(rgb, palette):
    """uint8 [H, W, 3] colour mask -> int64 class ids through `palette` ({packed colour: id})."""
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    unknown = [c for c in colours.tolist() if c not in palette]
    if unknown:
        shown = ", ".join(f"#{c:06x}" for c in unknown[:5])
        raise ValueError(
            f"The colour mask has {len(unknown)} colour(s) not in the palette: {shown}. Add them to "
            "the palette (map unlabelled colours to the ignore index, e.g. 255)."
        )
    return np.asarray([palette[c] for c in colours.tolist()], dtype=np.int64)[inverse].reshape(packed.shape)


def mask_to_class_ids(mask, palette=None):
    """Class-id map int64 [H, W] of a mask.

    - "P" (palette) images: the palette *indices* are the class ids (the PASCAL VOC convention);
    - "L", "I", "I;16", "1" images and 2-D integer arrays: the pixel values;
    - "RGB"/"RGBA" images and [H, W, 3|4] arrays: colours mapped through `palette` (see `normalize_palette`); without
      a palette only grayscale stored as RGB (equal channels) is accepted, anything else is a `ValueError`.
    """
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGB", "RGBA"):
            array = np.asarray(mask.convert("RGB"))
        elif mask.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            array = np.asarray(mask)
        else:
            raise ValueError(
                f"Unsupported mask image mode {mask.mode!r}: use a palette (P), grayscale (L), "
                "16/32-bit integer (I;16, I) or RGB colour mask."
            )
    else:
        array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if palette is not None:
            return colours_to_class_ids(rgb.astype(np.uint8), normalize_palette(palette))
        if (rgb == rgb[..., :1]).all():
            return rgb[..., 0].astype(np.int64)
        raise ValueError(
            "The mask is an RGB colour image: pass a `palette` (one colour per class id, e.g. "
            "--palette palette.json) to map its colours to class ids, or save masks as palette (P) "
            "or grayscale (L) images of class ids."
        )
    if array.ndim != 2:
        raise ValueError(f"A mask must be [H, W] class ids (or an [H, W, 3] colour mask), got shape {array.shape}.")
    if array.dtype == np.bool_:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"Mask values must be integer class ids, got non-integer {array.dtype} values.")
    return array.astype(np.int64)


def reduce_mask_labels(class_ids, ignore_index=255):
    """ADE20k convention: class 0 (background / "other") becomes `ignore_index`, the others shift down by one."""
    reduced = class_ids - 1
    reduced[(class_ids == 0) | (class_ids == ignore_index)] = ignore_index
    return reduced


def check_class_ids(class_ids, num_labels, ignore_index=255):
    """Raise a `ValueError` naming the offending ids if any is outside `0..num_labels-1` and not `ignore_index`."""
    values = np.unique(class_ids)
    bad = [int(v) for v in values if (v < 0 or v >= num_labels) and v != ignore_index]
    if bad:
        raise ValueError(
            f"Mask class ids {bad[:10]} are outside 0..{num_labels - 1} (num_labels={num_labels}) and "
            f"not the ignore index {ignore_index}: fix --num_labels / --id2label, --ignore_index, "
            "--reduce_labels or --palette."
        )


def mask_column_of(dataset, image_column, name=None):
    """The mask column: `name` if given, else the first image/array column (not `image_column`) named like a mask
    (`MASK_COLUMN_NAMES` order), else the first other `datasets.Image` column. Class-label columns never qualify."""
    features = dataset.features or {}
    if name is not None:
        if features and name not in features:
            raise ValueError(f"--label_column_name {name!r} is not a column; columns: {list(features)}.")
        return name
    candidates = [
        column
        for column, feature in features.items()
        if column != image_column and not isinstance(feature, (datasets.Value, datasets.ClassLabel))
    ]
    for column in MASK_COLUMN_NAMES:
        if column in candidates:
            return column
    images = [column for column in candidates if isinstance(features[column], datasets.Image)]
    if images:
        return images[0]
    raise ValueError(f"No mask column among {list(features)}: pass --label_column_name (the column with the masks).")


__all__ = [
    "LABEL_COLUMN_NAMES",
    "IMAGE_COLUMN_NAMES",
    "UndecodableImageError",
    "check_class_folders",
    "empty_class_folders",
    "load_image_datasets",
    "image_column_of",
    "label_column_of",
    "label_names_of",
    "decode_image",
    "MASK_COLUMN_NAMES",
    "decode_mask",
    "normalize_palette",
    "colours_to_class_ids",
    "mask_to_class_ids",
    "reduce_mask_labels",
    "check_class_ids",
    "mask_column_of",
]
