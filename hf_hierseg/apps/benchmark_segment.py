"""What segmenting photos costs, stage by stage, measured in one run on the same photos (`hf-hierseg benchmark
segment`, `scripts/benchmark_segment.py`):

- processor: `CastImageProcessor` on each batch, as the pipeline calls it (the whole photo resized to the crop
  size; superpixels in the processor's thread pool);
- forward: the model on the processed batch;
- post-processing: the pipeline's work after the forward (the levels painted, the segments' areas / boxes /
  parents in one set of reductions per batch, each photo's maps resized, its result assembled; masks lazy);
- writing: rendering, encoding and writing `hf-hierseg segment`'s default outputs (an overlay per level, the
  hierarchy picture, the JSON) of each photo, in one thread;
- pipeline: `HierarchicalSegmentationPipeline(photos, batch_size=...)`, end to end from PIL photos;
- segment: what `hf-hierseg segment PHOTOS --out DIR` runs (`bulk_segment.segment_collection`) on the photos saved
  as PNG files, default outputs, into a fresh folder: the model loaded before (start-up excluded); and the same
  with `--outputs labels,json` (label maps and JSON only);
- the parts of writing (cProfile of one writing round): overlays, hierarchy picture, PNG encoding, JSON, files.

Each stage reports wall-clock milliseconds per photo (best of `repeats` rounds, the stages alternating in every
round, and the median) and the CPU time of the whole process per photo (all threads), with the ratio to
processor + forward. On a machine shared with other work, compare the ratios of one run, not absolute times.
"""

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InvalidInputError
from ..evaluation import real_photos
from ..evaluation.synthetic import generate_example
from ..image_processing_cast import hierarchy_level_maps, segment_statistics
from ..loading import load_model_and_processor
from ..pipelines import HierarchicalSegmentationPipeline, whole_image_size
from .benchmark_throughput import load_average, machine_description
from .bulk_segment import file_records, segment_collection
from .segment_images import DEFAULT_OUTPUTS, render_outputs, write_outputs


STAGES = ("processor", "forward", "post_processing", "writing", "pipeline", "segment", "segment_labels")
STAGE_TITLES = {
    "processor": "processor",
    "forward": "forward",
    "post_processing": "post-processing",
    "writing": "writing (1 thread)",
    "pipeline": "pipeline",
    "segment": "hf-hierseg segment",
    "segment_labels": "  --outputs labels,json",
}
TARGETS = {"pipeline": 1.5, "segment": 4.0}  # x (processor + forward), issue 19
# The parts of writing one photo's default outputs, by the function doing them (cProfile cumulative time).
WRITING_PARTS = {
    "overlay_labels": "overlays (4 levels)",
    "draw_hierarchy": "hierarchy picture",
    "encode_png": "PNG encoding (5 pictures)",
    "dumps": "JSON",
    "write_atomic": "files (temporary + rename)",
}


@dataclass
class SegmentBenchmarkSettings:
    """What to measure: `num_photos` real photos (the ImageNet photos of the foolbox wheel, cached by
    `evaluation.real_photos`; synthetic images where they are unavailable), `batch_size`, `repeats` rounds,
    `threads` for torch (None: torch's default), `model` (None: the bundled default model)."""

    num_photos: int = 12
    batch_size: int = 4
    repeats: int = 3
    threads: int | None = None
    model: str | None = None
    profile: bool = False

    def __post_init__(self):
        for name in ("num_photos", "batch_size", "repeats"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.threads is not None and int(self.threads) < 1:
            raise InvalidInputError(f"threads must be >= 1, got {self.threads}.")


def benchmark_photos(count):
    """`(photos, source)`: `count` RGB PIL photos (ImageNet photos, repeated if more are asked for)."""
    try:
        photos = [photo["image"] for photo in real_photos.load_imagenet_photos()]
        source = "ImageNet photos of the foolbox wheel"
    except real_photos.RealPhotosUnavailableError as error:
        photos = [generate_example(index, split="test", image_size=512)["image"] for index in range(count)]
        source = f"SYNTHETIC 512x512 images (real photos unavailable: {str(error).splitlines()[0]})"
    return [photos[index % len(photos)] for index in range(count)], source


class Stages:
    """The timed stages, sharing one model, processor and pipeline."""

    def __init__(self, model, processor, photos, batch_size, work_dir):
        self.model = model
        self.processor = processor
        self.photos = photos
        self.batch_size = batch_size
        self.work_dir = Path(work_dir)
        self.segmenter = HierarchicalSegmentationPipeline(model=model, image_processor=processor, device=model.device)
        self.batches = [photos[start : start + batch_size] for start in range(0, len(photos), batch_size)]
        self.paths = []
        (self.work_dir / "photos").mkdir(parents=True, exist_ok=True)
        for index, photo in enumerate(photos):
            self.paths.append(self.work_dir / "photos" / f"photo{index:04d}.png")
            photo.save(self.paths[-1])
        self.inputs = self.outputs = self.results = None
        self.round = 0

    def processor_stage(self):
        self.inputs = [
            self.processor(batch, return_tensors="pt", **whole_image_size(self.processor)) for batch in self.batches
        ]

    @torch.inference_mode()
    def forward_stage(self):
        self.outputs = [self.model(**inputs) for inputs in self.inputs]

    def post_processing_stage(self):
        self.results = []
        for batch, inputs, outputs in zip(self.batches, self.inputs, self.outputs):
            target_size = torch.tensor([[photo.height, photo.width] for photo in batch])
            label_maps = hierarchy_level_maps(outputs, inputs["superpixels"])
            statistics_ = segment_statistics(label_maps, target_size.tolist())
            model_outputs = {"label_maps": label_maps, **statistics_, "target_size": target_size, "image": batch}
            for index in range(len(batch)):
                item = {key: value[index : index + 1] for key, value in model_outputs.items()}
                self.results.append(self.segmenter.postprocess(item))

    def writing_stage(self):
        out = self.fresh_folder("written")
        for index, (photo, result) in enumerate(zip(self.photos, self.results)):
            files, _ = render_outputs(f"photo{index:04d}", str(self.paths[index]), photo, result, DEFAULT_OUTPUTS)
            write_outputs(out, files)

    def pipeline_stage(self):
        self.pipeline_results = self.segmenter(self.photos, batch_size=self.batch_size)

    def segment_stage(self, outputs=DEFAULT_OUTPUTS, name="segment"):
        segment_collection(
            self.segmenter,
            file_records(self.paths),
            self.fresh_folder(name),
            outputs=outputs,
            batch_size=self.batch_size,
        )

    def segment_labels_stage(self):
        self.segment_stage(("labels", "json"), "segment-labels")

    def fresh_folder(self, name):
        folder = self.work_dir / f"{name}-{self.round}"
        folder.mkdir(parents=True)
        return folder


def run_segment_benchmark(settings=None, log=None):
    """Measure every stage (see the module docstring). Returns a JSON-ready report."""
    settings = settings or SegmentBenchmarkSettings()
    log = log or (lambda message: None)
    if settings.threads is not None:
        torch.set_num_threads(int(settings.threads))
    model, processor = load_model_and_processor(settings.model)
    photos, source = benchmark_photos(settings.num_photos)
    log(f"{len(photos)} photos ({source}), batch {settings.batch_size}, {settings.repeats} rounds")
    seconds = {stage: [] for stage in STAGES}
    cpu_seconds = {stage: [] for stage in STAGES}
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="benchmark-segment-") as work_dir:
        stages = Stages(model, processor, photos, settings.batch_size, work_dir)
        for round_ in range(settings.repeats + 1):  # round 0 warms up (lazy init, oneDNN primitives, caches)
            stages.round = round_
            for stage in STAGES:
                run = getattr(stages, f"{stage}_stage")
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if round_ > 0:
                    seconds[stage].append(wall / len(photos))
                    cpu_seconds[stage].append(cpu / len(photos))
            log(f"round {round_}: " + ", ".join(f"{s} {seconds[s][-1] * 1e3:.1f} ms" for s in STAGES if seconds[s]))
        stages.round += 1
        writing_parts = profile_parts(stages.writing_stage, WRITING_PARTS, len(photos))
        if settings.profile:
            for stage in ("pipeline", "segment"):
                stages.round += 1
                profiles[stage] = profile_text(getattr(stages, f"{stage}_stage"))
    best = {stage: min(values) for stage, values in seconds.items()}
    reference = best["processor"] + best["forward"]
    return {
        "settings": asdict(settings),
        "photos": {"count": len(photos), "source": source, "sizes": sorted({photo.size for photo in photos})},
        "machine": machine_description(torch.get_num_threads()),
        "load_average": load_average(),
        "best_ms": {stage: value * 1e3 for stage, value in best.items()},
        "median_ms": {stage: statistics.median(values) * 1e3 for stage, values in seconds.items()},
        "cpu_ms": {stage: min(values) * 1e3 for stage, values in cpu_seconds.items()},
        "ratio": {stage: value / reference for stage, value in best.items()},
        "targets": {
            stage: {"max_ratio": target, "met": best[stage] / reference <= target} for stage, target in TARGETS.items()
        },  # fmt: skip
        "writing_parts_ms": writing_parts,
        "profiles": profiles,
    }


def profile_parts(function, parts, count):
    """Milliseconds per item (of `count`) spent in each function named in `parts` during one call of `function`
    (cProfile cumulative time, the calling thread)."""
    profiler = cProfile.Profile()
    profiler.runcall(function)
    totals = dict.fromkeys(parts, 0.0)
    for (_, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if name in totals:
            totals[name] += cumulative
    return {name: seconds * 1e3 / count for name, seconds in totals.items()}


def profile_text(function, lines=25):
    """cProfile of one call (the calling thread only), the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.runcall(function)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()


def format_segment_report(report):
    best, median, cpu, ratio = report["best_ms"], report["median_ms"], report["cpu_ms"], report["ratio"]
    settings, photos = report["settings"], report["photos"]
    sizes = ", ".join(f"{w}x{h}" for w, h in photos["sizes"])
    lines = [
        f"Segmenting {photos['count']} photos ({photos['source']}; {sizes}), batch {settings['batch_size']}, "
        f"best of {settings['repeats']} rounds; {report['machine']['cpu']}, torch threads "
        f"{report['machine']['threads']}, load average {report['load_average']:.2f}",
        "",
        f"{'stage':<28}{'ms/photo':>10}{'median':>10}{'CPU ms':>10}{'x (proc + fwd)':>16}",
    ]

    def row(title, stage=None, value=None, share=None, median_value=None, cpu_value=None):
        value = best[stage] if stage else value
        median_value = median[stage] if stage else median_value
        cpu_value = cpu[stage] if stage else cpu_value
        share = ratio[stage] if stage else share
        cells = [f"{title:<28}", f"{value:>10.1f}", f"{median_value:>10.1f}", f"{cpu_value:>10.1f}", f"{share:>16.2f}"]
        target = report["targets"].get(stage) if stage else None
        if target:
            cells.append(f"   target <= {target['max_ratio']:g}: {'met' if target['met'] else 'NOT met'}")
        lines.append("".join(cells))

    row("processor", "processor")
    row("forward", "forward")
    reference = best["processor"] + best["forward"]
    row(
        "processor + forward",
        value=reference,
        share=1.0,
        median_value=median["processor"] + median["forward"],
        cpu_value=cpu["processor"] + cpu["forward"],
    )
    for stage in ("post_processing", "writing", "pipeline", "segment", "segment_labels"):
        row(STAGE_TITLES[stage], stage)
    parts = report.get("writing_parts_ms", {})
    if parts:
        lines += ["", "writing one photo's default outputs, by part (cProfile, one thread, ms/photo):"]
        lines += [f"  {WRITING_PARTS[name]:<30}{value:>8.1f}" for name, value in parts.items()]
    lines += [
        "",
        "pipeline = processor + forward + post-processing, the preprocessing in threads; hf-hierseg segment adds "
        "decoding the files and writing (overlays, hierarchy picture, JSON) in a pool of threads beside the model; "
        "CPU ms is the whole process's CPU time (all threads) per photo.",
    ]
    for stage, text in report.get("profiles", {}).items():
        lines += ["", f"Profile of the {STAGE_TITLES[stage]} (main thread):", text.rstrip()]
    return "\n".join(lines)


def benchmark_segment_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-photos", type=int, default=12, help="photos (default: 12)")
    parser.add_argument("--batch-size", type=int, default=4, help="photos per model call (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round (default: 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--model", help="model folder or Hub id (default: the bundled default model)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile tables of pipeline and segment")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    return parser


def run_benchmark_segment_command(args):
    settings = SegmentBenchmarkSettings(
        num_photos=args.num_photos,
        batch_size=args.batch_size,
        repeats=args.repeats,
        threads=args.threads,
        model=args.model,
        profile=args.profile,
    )
    report = run_segment_benchmark(settings, log=lambda message: print(message, file=sys.stderr))
    print(format_segment_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


__all__ = [
    "STAGES",
    "SegmentBenchmarkSettings",
    "format_segment_report",
    "run_segment_benchmark",
    "benchmark_segment_parser",
    "run_benchmark_segment_command",
]
