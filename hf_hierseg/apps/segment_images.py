"""What `hf-hierseg segment` and `hf-hierseg demo` write for one photo, and how: the files of each output kind, the
JSON record of the hierarchy, fast lossless PNG encoding, atomic writes and the test of a photo's completeness.

Output kinds (`--outputs`), per photo with output name KEY:

- `overlays`: KEY_level<l>.png, the segments of level l over the photo (RGB);
- `hierarchy`: KEY_hierarchy.png, all levels side by side (boundaries and mean colours);
- `labels`: KEY_level<l>_labels.png, the segment id of every pixel (16-bit grayscale PNG, ids as in the JSON);
- `json`: KEY.json, per level the segments with parent, area and bounding box (written last).

Every file is written to a temporary name and renamed when complete, so a killed run leaves no partial file under
an output name, and a photo is complete when all its files exist (`missing_outputs`).
"""

import glob
import hashlib
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np

from ..errors import InvalidInputError, MissingInputError
from ..visualization import draw_hierarchy, overlay_labels


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
OUTPUT_KINDS = ("overlays", "hierarchy", "labels", "json")
DEFAULT_OUTPUTS = ("overlays", "hierarchy", "json")
OUTPUT_ALIASES = {"pictures": ("overlays", "hierarchy"), "all": OUTPUT_KINDS}
# PNG settings: "up" filter and Huffman-only deflate encode a photo-sized overlay about 10x faster than PIL's default
# (zlib level 6, adaptive filters) for files about 25% larger; lossless either way.
PNG_PARAMETERS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
]  # fmt: skip


def expand_images(paths):
    """Image files from `paths`: files, folders (their images, sorted) and glob patterns (`*`, `?`, `[...]`, `**`
    for sub-folders; matches sorted).

    Raises:
        MissingInputError: a path that does not exist, a pattern that matches no image, or no images at all.
    """
    images = []
    for text in map(str, paths):
        path = Path(text)
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matches = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise MissingInputError(f"no images match {text}")
            images += matches
        else:
            raise MissingInputError(f"no such image: {path}")
    if not images:
        raise MissingInputError("no images found")
    return images


def parse_outputs(text):
    """The output kinds of a comma-separated `--outputs` value (`OUTPUT_KINDS`, or `pictures` / `all`), in
    `OUTPUT_KINDS` order."""
    kinds = set()
    for word in (part.strip() for part in str(text).split(",")):
        if word in OUTPUT_ALIASES:
            kinds.update(OUTPUT_ALIASES[word])
        elif word in OUTPUT_KINDS:
            kinds.add(word)
        else:
            choices = ", ".join(OUTPUT_KINDS + tuple(OUTPUT_ALIASES))
            raise InvalidInputError(f"unknown output {word!r} in --outputs {text!r}: choose from {choices}")
    return tuple(kind for kind in OUTPUT_KINDS if kind in kinds)


def output_key(text):
    """A file-name-safe output name for a photo id (path stem, dataset key)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "image"


def hashed_key(name):
    """The output name of a photo id whose stem may repeat: the stem and a short hash of the whole id."""
    return f"{output_key(Path(str(name)).stem)}-{hashlib.sha1(str(name).encode()).hexdigest()[:8]}"


def unique_keys(names):
    """Output names for `names` (photo ids, e.g. paths): `output_key` of each stem, `hashed_key` where stems
    repeat, so every photo gets its own files."""
    stems = [output_key(Path(str(name)).stem) for name in names]
    counts = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else hashed_key(name) for stem, name in zip(stems, names)]


def output_files(key, outputs, levels):
    """The file names one photo gets, the JSON (the record of the photo) last."""
    names = []
    if "labels" in outputs:
        names += [f"{key}_level{level}_labels.png" for level in levels]
    if "overlays" in outputs:
        names += [f"{key}_level{level}.png" for level in levels]
    if "hierarchy" in outputs:
        names.append(f"{key}_hierarchy.png")
    if "json" in outputs:
        names.append(f"{key}.json")
    return names


def missing_outputs(out, key, outputs, levels):
    """The names of `output_files` not (yet) in `out`; none for a photo recorded as undecodable in its JSON."""
    out = Path(out)
    missing = [name for name in output_files(key, outputs, levels) if not (out / name).is_file()]
    if missing and "json" in outputs and f"{key}.json" not in missing:
        if "error" in read_record(out / f"{key}.json"):
            return []
    return missing


def read_record(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_atomic(path, data):
    """Write `data` (bytes or str) to `path` through a temporary file renamed when complete."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(temporary, path)


def encode_png(picture):
    """Lossless PNG bytes of an 8-bit RGB `uint8 [H, W, 3]` (or PIL) picture, or of a 16-bit `uint16 [H, W]` map."""
    array = np.asarray(picture)
    if array.ndim == 3:
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array, PNG_PARAMETERS)
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {array.shape} and dtype {array.dtype}")
    return encoded.tobytes()


def segment_record(source, result):
    """JSON-ready description of one photo's hierarchy (no masks): per level, segments with parent, area, bbox."""
    levels = [
        {
            "level": entry["level"],
            "num_segments": len(entry["segments"]),
            "segments": [
                {key: segment[key] for key in ("id", "parent", "area", "bbox")} for segment in entry["segments"]
            ],
        }
        for entry in result["levels"]
    ]
    height, width = result["size"]
    return {"image": str(source), "height": height, "width": width, "levels": levels}


def render_outputs(key, source, image, result, outputs):
    """`{file name: bytes}` of one photo's outputs (`result` of a `HierarchicalSegmentationPipeline`, masks not
    needed; `image` the RGB photo), the JSON last. Returns also the photo's JSON record."""
    files = {}
    entries = result["levels"]
    if "labels" in outputs:
        for entry in entries:
            segmentation = entry["segmentation"]
            if segmentation.size and segmentation.max() > np.iinfo(np.uint16).max:
                raise ValueError(f"{source}: segment ids above 65535 do not fit a 16-bit label PNG")
            files[f"{key}_level{entry['level']}_labels.png"] = encode_png(segmentation.astype(np.uint16))
    if "overlays" in outputs:
        for entry in entries:
            files[f"{key}_level{entry['level']}.png"] = encode_png(overlay_labels(image, entry["segmentation"]))
    record = segment_record(source, result)
    if "hierarchy" in outputs:
        titles = [f"level {level['level']}: {level['num_segments']} segments" for level in record["levels"]]
        picture = draw_hierarchy(image, [entry["segmentation"] for entry in entries], titles)
        files[f"{key}_hierarchy.png"] = encode_png(picture)
    if "json" in outputs:
        files[f"{key}.json"] = json.dumps(record, indent=1) + "\n"
    return files, record


def write_outputs(out, files):
    """Write `render_outputs`' files into `out`, each atomically, in order (the JSON last)."""
    for name, data in files.items():
        write_atomic(Path(out) / name, data)


__all__ = [
    "DEFAULT_OUTPUTS",
    "IMAGE_SUFFIXES",
    "OUTPUT_KINDS",
    "encode_png",
    "expand_images",
    "hashed_key",
    "missing_outputs",
    "output_files",
    "output_key",
    "parse_outputs",
    "render_outputs",
    "segment_record",
    "unique_keys",
    "write_atomic",
    "write_outputs",
]
