"""Throughput of `CastImageProcessor` at 224 px: images per second with 1 worker and with all cores, and the share
of the time spent in SEEDS.

    python scripts/benchmark_processor.py --num_images 64 --input_size 256 341

The inputs are synthetic photo-sized images (smooth colour fields with edges and noise; `--images DIR` reads real
ones instead); the processor runs its default pipeline (resize 256, centre crop 224, SEEDS, normalisation).
"""

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np
import PIL.Image

from ..image_processing_cast import CastImageProcessor
from ..superpixels import batch_superpixels, denormalize_to_uint8, scaled_num_superpixels


def synthetic_photos(count, height, width, seed=0):
    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        image[: height // 2, rng.integers(width // 4, width) :] -= 70
        image += rng.integers(-12, 13, image.shape, dtype=np.int16)
        photos.append(PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)))
    return photos


def best_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def processor_benchmark_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--input_size", type=int, nargs=2, default=(256, 341), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--images", type=Path, help="folder of real images to use instead of synthetic ones")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    return parser


def run_processor_benchmark(args):
    """Run `processor_benchmark_parser`'s arguments: print images/s and the share of SEEDS. Returns 0."""

    if args.images is not None:
        paths = sorted(path for path in args.images.iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
        images = [PIL.Image.open(path).convert("RGB") for path in paths[: args.num_images]]
    else:
        images = synthetic_photos(args.num_images, *args.input_size)
    cores = os.cpu_count() or 1
    print(f"{len(images)} images, {cores} cores, OpenCV {cv2.__version__}")

    for workers in sorted({1, cores}):
        processor = CastImageProcessor(num_workers=workers)
        seconds = best_time(lambda: processor(images, return_tensors="pt"), args.repeats)
        print(
            f"processor, {workers} worker(s): {len(images) / seconds:7.1f} images/s "
            f"({1000 * seconds / len(images):.1f} ms/image)"
        )
        if workers == 1:
            one_worker_seconds = seconds

    # SEEDS alone on the same 224x224 crops, one worker.
    pixel_values = CastImageProcessor(superpixel_method="grid")(images, return_tensors="np")["pixel_values"]
    crops = list(denormalize_to_uint8(pixel_values))
    count = scaled_num_superpixels(224, 224)
    seeds_seconds = best_time(lambda: batch_superpixels(crops, "seeds", count, num_workers=1), args.repeats)
    print(
        f"SEEDS alone, 1 worker: {len(images) / seeds_seconds:7.1f} images/s; share of the processor's time: "
        f"{100 * seeds_seconds / one_worker_seconds:.0f}%"
    )
    return 0


__all__ = ["best_time", "processor_benchmark_parser", "run_processor_benchmark", "synthetic_photos"]
