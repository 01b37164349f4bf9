"""Segment image files and write what `hf-hierseg segment` and `hf-hierseg demo` write, per image: overlay PNGs per
level, all levels side by side, and the hierarchy as JSON."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MissingInputError
from ..visualization import draw_hierarchy


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def expand_images(paths):
    """Image files from `paths` (folders give their images, sorted).

    Raises:
        MissingInputError: a path that does not exist, or no images at all.
    """
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise MissingInputError(f"no such image: {path}")
    if not images:
        raise MissingInputError("no images found")
    return images


def segment_record(path, result):
    """JSON-ready description of one image's hierarchy (no masks): per level, segments with parent, area, bbox."""
    levels = []
    for entry in result["levels"]:
        segments = []
        for segment in entry["segments"]:
            rows, cols = np.nonzero(entry["segmentation"] == segment["id"])
            bbox = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            segments.append({"id": segment["id"], "parent": segment["parent"], "area": segment["area"], "bbox": bbox})
        levels.append({"level": entry["level"], "num_segments": len(segments), "segments": segments})
    height, width = result["size"]
    return {"image": str(path), "height": height, "width": width, "levels": levels}


def write_segmentations(segmenter, images, out, levels=(1, 2, 3, 4), batch_size=1):
    """Segment image files with a `HierarchicalSegmentationPipeline` and write, per image, IMAGE_level<l>.png,
    IMAGE_hierarchy.png and IMAGE.json into `out`. Returns the JSON records (`segment_record`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = segmenter([str(path) for path in images], levels=levels, overlay=True, batch_size=batch_size)
    records = []
    for path, result in zip(images, results):
        for entry in result["levels"]:
            entry["overlay"].save(out / f"{path.stem}_level{entry['level']}.png")
        record = segment_record(path, result)
        titles = [f"level {level['level']}: {level['num_segments']} segments" for level in record["levels"]]
        draw_hierarchy(Image.open(path), [entry["segmentation"] for entry in result["levels"]], titles).save(
            out / f"{path.stem}_hierarchy.png"
        )
        (out / f"{path.stem}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        counts = ", ".join(f"level {level['level']}: {level['num_segments']}" for level in record["levels"])
        print(f"{path} -> {out / path.stem}.json ({counts})")
        records.append(record)
    return records


__all__ = ["IMAGE_SUFFIXES", "expand_images", "segment_record", "write_segmentations"]
