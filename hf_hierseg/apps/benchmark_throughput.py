"""Throughput benchmark: CAST against a transformers ViT of the same width, on the same machine in one run.

Measured (see `run_benchmark`):

- inference images/s of the model forward (inputs already processed: pixel values and SEEDS superpixels) and end to
  end (image processor + forward, from 8-bit images), with the ratio to the ViT, and the peak resident memory of
  each call, measured in a fresh process per model;
- where CAST's forward time goes: ConvStem, segment pooling, transformer blocks, farthest point sampling and the
  rest of graph pooling (forward hooks; on CPU every op is synchronous, so wall-clock hooks are exact);
- FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`, next to the paper's GMACs;
- training steps: a supervised step (cross-entropy, AdamW) and a MoCo-v3 step (two views through the base and the
  momentum encoder), CAST against the ViT.

Times are the best of `repeats` interleaved calls (the models alternate, so a load spike from other processes hits
both); the median is reported beside it.
"""

import argparse
import contextlib
import copy
import gc
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

from ..configuration_cast import CastConfig
from ..errors import InvalidInputError
from ..evaluation.synthetic import generate_example
from ..image_processing_cast import CastImageProcessor
from ..modeling_cast import CastForImageClassification, CastForSelfSupervisedPretraining, CastModel, moco_mlp
from ..training.moco import contrastive_loss


# GMACs per 224x224 image reported in the CAST paper (Table 1).
PAPER_GMACS = {"vit": 4.60, "cast": 3.12}
INFERENCE_CASES = ("vit-forward", "cast-forward", "vit-end-to-end", "cast-end-to-end")
CASE_TITLES = {
    "vit-forward": "ViT-S/16 forward",
    "cast-forward": "CAST-S forward",
    "vit-end-to-end": "ViT-S/16 end-to-end",
    "cast-end-to-end": "CAST-S end-to-end",
}
SPLIT_PARTS = ("conv_stem", "segment_pooling", "blocks", "fps", "graph_pooling", "other")
SPLIT_TITLES = {
    "conv_stem": "ConvStem",
    "segment_pooling": "segment pooling",
    "blocks": "blocks",
    "fps": "FPS",
    "graph_pooling": "graph pooling (rest)",
    "other": "other",
}


def vit_small_config(**overrides):
    """transformers ViT-S/16: width 384, 12 heads, depth 12, MLP 1536, 224 px, sdpa attention."""
    values = dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=1536,
        image_size=224,
        patch_size=16,
        attn_implementation="sdpa",
    )
    values.update(overrides)
    return ViTConfig(**values)


@dataclass
class BenchmarkSettings:
    """What to measure. `cast_config` / `vit_config` default to CAST-S and ViT-S/16; `repeats` is used for batch
    sizes up to 8 and scaled down (to at least 2) for larger batches."""

    batch_sizes: tuple = (1, 8, 32)
    repeats: int = 5
    threads: int = 2
    image_size: int = 224
    num_superpixels: int = 196
    train_batch_size: int = 8
    train_repeats: int = 2
    measure_memory: bool = True
    measure_training: bool = True
    seed: int = 0
    cast_config: dict | None = None  # CastConfig kwargs; None = CastConfig.from_preset("cast-small")
    vit_config: dict | None = None  # ViTConfig kwargs; None = vit_small_config()

    def __post_init__(self):
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidInputError(f"batch_sizes must be positive integers, got {self.batch_sizes}.")
        for name in ("repeats", "threads", "train_batch_size", "train_repeats", "image_size", "num_superpixels"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def repeats_for(self, batch_size):
        return max(min(2, self.repeats), round(self.repeats * min(1.0, 8 / batch_size)))

    def build_cast_config(self):
        if self.cast_config is None:
            return CastConfig.from_preset("cast-small", image_size=self.image_size)
        return CastConfig(**self.cast_config)

    def build_vit_config(self):
        return vit_small_config(image_size=self.image_size, **(self.vit_config or {}))


# ---------------------------------------------------------------------------------------------------------------
# Inputs and processors


def benchmark_images(count, image_size, seed=0):
    """`count` 8-bit RGB PIL images of the package's synthetic set (textured objects on textured backgrounds)."""
    return [generate_example(index, seed=seed, split="test", image_size=image_size)["image"] for index in range(count)]


def cast_processor(settings):
    """`CastImageProcessor` for images of the benchmark's size (resize and crop are identities), SEEDS with
    `num_superpixels` requested per image."""
    side = settings.image_size
    return CastImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        num_superpixels=settings.num_superpixels,
        superpixel_reference_size=side,
    )


def vit_processor(settings):
    return ViTImageProcessorPil(size={"height": settings.image_size, "width": settings.image_size})


def model_inputs(processed):
    """The tensors of a processor output that the models take."""
    return {key: processed[key] for key in ("pixel_values", "superpixels") if key in processed}


# ---------------------------------------------------------------------------------------------------------------
# Inference cases


class InferenceCase:
    """One timed call: the model forward on processed inputs, or processor + forward on 8-bit images."""

    def __init__(self, name, model, processor):
        self.name = name
        self.end_to_end = name.endswith("end-to-end")
        self.model = model
        self.processor = processor

    def prepare(self, images):
        return images if self.end_to_end else model_inputs(self.processor(images, return_tensors="pt"))

    @torch.inference_mode()
    def __call__(self, inputs):
        if self.end_to_end:
            inputs = model_inputs(self.processor(inputs, return_tensors="pt"))
        return self.model(**inputs)


def build_models(settings, families=("vit", "cast")):
    """Random-weight ViT and CAST backbones in eval mode, and their processors."""
    torch.manual_seed(settings.seed)
    built = {}
    if "vit" in families:
        built["vit"] = (ViTModel(settings.build_vit_config(), add_pooling_layer=False).eval(), vit_processor(settings))
    if "cast" in families:
        built["cast"] = (CastModel(settings.build_cast_config()).eval(), cast_processor(settings))
    return built


def build_cases(settings, names=INFERENCE_CASES):
    models = build_models(settings, {name.split("-")[0] for name in names})
    return [InferenceCase(name, *models[name.split("-")[0]]) for name in names]


def timed(function, *args):
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def measure_throughput(cases, images, batch_size, repeats):
    """{case: (best, median wall-clock seconds, best CPU seconds of this process)} per call on the first
    `batch_size` images; the cases alternate. CPU time is what the call itself consumed (all its threads), so it
    moves less than wall-clock time when other processes load the machine."""
    batch_images = images[:batch_size]
    inputs = {case.name: case.prepare(batch_images) for case in cases}
    warmed = set()
    for case in cases:  # one warm-up call per model (lazy init, oneDNN primitives for this shape)
        if id(case.model) not in warmed:
            case(inputs[case.name])
            warmed.add(id(case.model))
    seconds = {case.name: [] for case in cases}
    cpu_seconds = {case.name: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            cpu_start = time.process_time()
            seconds[case.name].append(timed(case, inputs[case.name]))
            cpu_seconds[case.name].append(time.process_time() - cpu_start)
    return {name: (min(values), statistics.median(values), min(cpu_seconds[name])) for name, values in seconds.items()}


# ---------------------------------------------------------------------------------------------------------------
# Peak memory (fresh process per case)


def _resident_kib(field_name):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def _release_free_memory():
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_memory_worker(name, settings, images):
    """Peak resident memory (MiB) of one call of case `name` above the resident memory just before it (model and
    inputs loaded), per batch size, in ascending order. Linux only (reads and resets VmHWM); run in a fresh process."""
    torch.set_num_threads(settings.threads)
    case = build_cases(settings, [name])[0]
    peaks = {}
    for batch_size in sorted(settings.batch_sizes):
        inputs = case.prepare(images[:batch_size])
        _release_free_memory()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the high-water mark to the current resident size
        before = _resident_kib("VmRSS")
        case(inputs)
        peaks[batch_size] = (_resident_kib("VmHWM") - before) / 1024
        del inputs
    return peaks


def _peak_memory_main():
    """Entry point of the measuring process: a pickled (name, settings, images) on stdin, JSON on stdout."""
    name, settings, images = pickle.load(sys.stdin.buffer)
    print(json.dumps(_peak_memory_worker(name, settings, images)))


def measure_peak_memory(settings, images, names=INFERENCE_CASES):
    """{case name: {batch size: MiB}}, each case measured in a fresh Python process; {} without /proc (not Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    command = [sys.executable, "-c", "from hf_hierseg.apps.benchmark_throughput import _peak_memory_main as m; m()"]
    results = {}
    for name in names:
        completed = subprocess.run(command, input=pickle.dumps((name, settings, images)), capture_output=True)
        if completed.returncode != 0:
            raise RuntimeError(f"Peak-memory process for {name} failed:\n{completed.stderr.decode()[-3000:]}")
        peaks = json.loads(completed.stdout.decode().strip().splitlines()[-1])
        results[name] = {int(batch): value for batch, value in peaks.items()}
    return results


# ---------------------------------------------------------------------------------------------------------------
# Time split of the CAST forward


@contextlib.contextmanager
def cast_time_split(model):
    """Accumulate wall-clock seconds of CAST's parts during the calls inside the block: yields a dict with
    `SPLIT_PARTS` keys (`other` is filled in by `split_forward`). Works on a `CastModel`."""
    seconds = dict.fromkeys(SPLIT_PARTS, 0.0)
    handles, patched = [], []

    def add_timer(module, part):
        def start(*_):
            module._benchmark_start = time.perf_counter()

        def stop(*_):
            seconds[part] += time.perf_counter() - module._benchmark_start

        handles.append(module.register_forward_pre_hook(start))
        handles.append(module.register_forward_hook(stop))

    add_timer(model.embeddings, "segment_pooling")  # the ConvStem is subtracted below
    add_timer(model.embeddings.patch_embeddings, "conv_stem")
    for level in model.levels:
        for block in level.blocks:
            add_timer(block, "blocks")
        add_timer(level.pooling, "graph_pooling")  # FPS is subtracted below
        sample_centroids = level.pooling.sample_centroids

        def timed_sampling(*args, _sample=sample_centroids):
            start = time.perf_counter()
            result = _sample(*args)
            seconds["fps"] += time.perf_counter() - start
            return result

        level.pooling.sample_centroids = timed_sampling
        patched.append(level.pooling)
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()
        for pooling in patched:
            del pooling.sample_centroids
        seconds["segment_pooling"] -= seconds["conv_stem"]
        seconds["graph_pooling"] -= seconds["fps"]


def split_forward(case, processed, images, repeats=1):
    """Milliseconds of each part of CAST's forward (best of `repeats` total time), plus `total` and the processor's
    time on the same images (`processor`)."""
    best = None
    for _ in range(repeats):
        with cast_time_split(case.model) as seconds:
            total = timed(case, processed)
        seconds["other"] = total - sum(seconds[part] for part in SPLIT_PARTS if part != "other")
        seconds["total"] = total
        if best is None or total < best["total"]:
            best = dict(seconds)
    best["processor"] = timed(case.processor, images)
    return {key: value * 1000 for key, value in best.items()}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def _module_flops(counts, pattern):
    regex = re.compile(pattern)
    return sum(sum(ops.values()) for name, ops in counts.items() if regex.search(name))


def count_flops(settings, images):
    """FLOPs of one image: `{"vit": total, "cast": total, "cast_parts": {part: flops}}`. The CAST parts are the
    ConvStem, the blocks, graph pooling without FPS and FPS's float64 Gram matrix. Counted with eager attention:
    the counter has no formula for the CPU sdpa kernel, and would leave attention's matmuls out."""
    models = build_models(settings)
    for model, _ in models.values():
        model.set_attn_implementation("eager")
    result = {}
    with torch.inference_mode():
        vit, processor = models["vit"]
        with FlopCounterMode(display=False) as counter:
            vit(**model_inputs(processor(images[:1], return_tensors="pt")))
        result["vit"] = counter.get_total_flops()

        cast, processor = models["cast"]
        inputs = model_inputs(processor(images[:1], return_tensors="pt"))
        fps_flops = []
        for level in cast.levels:
            sample_centroids = level.pooling.sample_centroids

            def counted_sampling(*args, _sample=sample_centroids):
                with FlopCounterMode(display=False) as inner:
                    picks = _sample(*args)
                fps_flops.append(inner.get_total_flops())
                return picks

            level.pooling.sample_centroids = counted_sampling
        try:
            with FlopCounterMode(display=False) as counter:
                cast(**inputs)
        finally:
            for level in cast.levels:
                del level.pooling.sample_centroids
    counts = counter.get_flop_counts()
    fps = sum(fps_flops)
    parts = {
        "conv_stem": _module_flops(counts, r"\.embeddings\.patch_embeddings$"),
        "blocks": _module_flops(counts, r"\.levels\.\d+\.blocks\.\d+$"),
        "graph_pooling": _module_flops(counts, r"\.levels\.\d+\.pooling$") - fps,
        "fps": fps,
    }
    parts["other"] = counter.get_total_flops() - sum(parts.values())
    result["cast"] = counter.get_total_flops()
    result["cast_parts"] = parts
    return result


# ---------------------------------------------------------------------------------------------------------------
# Training steps


class VitForMoco(nn.Module):
    """ViT backbone (its embedding: the CLS token after the final norm) with the same MoCo-v3 projector and
    predictor as `CastForSelfSupervisedPretraining`."""

    def __init__(self, config, projection_dim=256, projection_hidden_dim=4096):
        super().__init__()
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.projector = moco_mlp(3, config.hidden_size, projection_hidden_dim, projection_dim)
        self.predictor = moco_mlp(2, projection_dim, projection_hidden_dim, projection_dim)


class MocoStep(nn.Module):
    """Base encoder (with gradients) and momentum encoder (backbone + projector, EMA of the base) for both views,
    as `hf_hierseg.training.moco.CastMocoV3` but for any model with `projector` and `predictor` heads."""

    def __init__(self, model, backbone_name, temperature=0.2):
        super().__init__()
        self.model = model
        self.backbone_name = backbone_name
        self.momentum_backbone = copy.deepcopy(getattr(model, backbone_name)).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(model.projector).requires_grad_(False)
        self.temperature = temperature

    def embed(self, backbone, pixel_values, superpixels):
        if self.backbone_name == "vit":
            return backbone(pixel_values=pixel_values).last_hidden_state[:, 0]
        return backbone(pixel_values, superpixels, return_dict=True).pooler_output

    def forward(self, views):
        backbone = getattr(self.model, self.backbone_name)
        predictions = [self.model.predictor(self.model.projector(self.embed(backbone, *view))) for view in views]
        with torch.no_grad():
            keys = [self.momentum_projector(self.embed(self.momentum_backbone, *view)) for view in views]
        return contrastive_loss(predictions[0], keys[1], self.temperature) + contrastive_loss(
            predictions[1], keys[0], self.temperature
        )

    @torch.no_grad()
    def update_momentum(self, momentum=0.99):
        base = list(getattr(self.model, self.backbone_name).parameters()) + list(self.model.projector.parameters())
        target = list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters())
        for key_parameter, query_parameter in zip(target, base):
            key_parameter.mul_(momentum).add_(query_parameter, alpha=1.0 - momentum)


def _train_step(module, optimizer, compute_loss, after_step=None):
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    optimizer.step()
    if after_step is not None:
        after_step()


def measure_training(settings, images):
    """Best seconds per step (and the median) of a supervised and a MoCo-v3 step, ViT and CAST alternating.
    Returns {step name: (best, median)}."""
    batch_size = settings.train_batch_size
    torch.manual_seed(settings.seed)
    vit_config, cast_config = settings.build_vit_config(), settings.build_cast_config()
    vit_labelled, cast_labelled = copy.deepcopy(vit_config), copy.deepcopy(cast_config)
    vit_labelled.num_labels = cast_labelled.num_labels = 1000
    cast_inputs = model_inputs(cast_processor(settings)(images[:batch_size], return_tensors="pt"))
    second_view = {key: torch.flip(value, dims=(-1,)) for key, value in cast_inputs.items()}  # a mirrored view
    labels = torch.randint(0, 1000, (batch_size,))

    vit_classifier = ViTForImageClassification(vit_labelled).train()
    cast_classifier = CastForImageClassification(cast_labelled).train()
    vit_moco = MocoStep(VitForMoco(vit_config), "vit").train()
    cast_moco = MocoStep(CastForSelfSupervisedPretraining(cast_config), "cast").train()
    pixels = cast_inputs["pixel_values"]
    moco_views = [
        (cast_inputs["pixel_values"], cast_inputs["superpixels"]),
        (second_view["pixel_values"], second_view["superpixels"]),
    ]

    steps = {
        "ViT-S/16 supervised": (vit_classifier, lambda: vit_classifier(pixel_values=pixels, labels=labels).loss, None),
        "CAST-S supervised": (cast_classifier, lambda: cast_classifier(**cast_inputs, labels=labels).loss, None),
        "ViT-S/16 MoCo-v3": (vit_moco, lambda: vit_moco(moco_views), vit_moco.update_momentum),
        "CAST-S MoCo-v3": (cast_moco, lambda: cast_moco(moco_views), cast_moco.update_momentum),
    }
    optimizers = {
        name: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        for name, (module, _, _) in steps.items()
    }
    seconds = {name: [] for name in steps}
    for repeat in range(settings.train_repeats + 1):  # the first round warms up
        for name, (module, compute_loss, after_step) in steps.items():
            elapsed = timed(_train_step, module, optimizers[name], compute_loss, after_step)
            if repeat:
                seconds[name].append(elapsed)
    return {name: (min(values), statistics.median(values)) for name, values in seconds.items()}


# ---------------------------------------------------------------------------------------------------------------
# The run and its report


@dataclass
class BenchmarkReport:
    settings: BenchmarkSettings
    machine: dict
    throughput: dict = field(default_factory=dict)  # {batch: {case: (best s, median s, best CPU s)}}
    memory: dict = field(default_factory=dict)  # {case: {batch: MiB}}
    split: dict = field(default_factory=dict)  # {batch: {part: ms}}
    flops: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # {step: (best s, median s)}
    wall_seconds: float = 0.0

    def images_per_second(self, batch_size, case, statistic=0):
        """From the best (0) or median (1) wall-clock time, or from the best CPU time (2)."""
        return batch_size / self.throughput[batch_size][case][statistic]

    def ratio(self, batch_size, case, statistic=0, reference=None):
        """Images/s of `case` over the ViT's of the same kind (forward or end-to-end), or over `reference`."""
        if reference is None:
            reference = "vit-end-to-end" if case.endswith("end-to-end") else "vit-forward"
        return self.images_per_second(batch_size, case, statistic) / self.images_per_second(
            batch_size, reference, statistic
        )

    def to_dict(self):
        return asdict(self)


def machine_description(threads):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
            cpu = f"{names[0]} ({len(names)} logical cores)" if names else cpu
    return {
        "cpu": cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
    }


def load_average():
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return float("nan")


def run_benchmark(settings=None, log=None):
    """Run everything `settings` asks for (CPU). `log` receives progress lines."""
    settings = settings or BenchmarkSettings()
    log = log or (lambda line: None)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        report = BenchmarkReport(settings=settings, machine=machine_description(settings.threads))
        report.machine["load_average_start"] = load_average()
        images = benchmark_images(
            max(max(settings.batch_sizes), settings.train_batch_size), settings.image_size, settings.seed
        )
        cases = build_cases(settings)
        cast_forward = next(case for case in cases if case.name == "cast-forward")
        for batch_size in settings.batch_sizes:
            log(f"throughput, batch {batch_size}")
            report.throughput[batch_size] = measure_throughput(
                cases, images, batch_size, settings.repeats_for(batch_size)
            )
            log(f"time split, batch {batch_size}")
            processed = cast_forward.prepare(images[:batch_size])
            report.split[batch_size] = split_forward(cast_forward, processed, images[:batch_size])
        del cases, cast_forward
        log("FLOPs")
        report.flops = count_flops(settings, images)
        if settings.measure_training:
            log(f"training steps, batch {settings.train_batch_size}")
            report.training = measure_training(settings, images)
        if settings.measure_memory:
            log("peak memory (one process per case)")
            report.memory = measure_peak_memory(settings, images)
        report.machine["load_average_end"] = load_average()
        report.wall_seconds = time.perf_counter() - started
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _percent(part, total):
    return f"{100 * part / total:.1f} %" if total else "-"


def pooling_share(split):
    """Share of FPS + graph pooling in one time split."""
    return (split["fps"] + split["graph_pooling"]) / split["total"]


def target_lines(report):
    """The issue's targets per batch size, from wall-clock time (CPU time in brackets): forward >= 1.4x ViT-S,
    end-to-end >= 1.1x, FPS + graph pooling <= 10 % of the forward."""
    batches = list(report.settings.batch_sizes)

    def ratios(case, reference=None):
        return {
            batch: (report.ratio(batch, case, 0, reference), report.ratio(batch, case, 2, reference))
            for batch in batches
        }

    def verdict(values, passes):
        met = [str(batch) for batch in batches if passes(values[batch])]
        return f" ({'met at batch ' + ', '.join(met) if met else 'not met'})"

    def listed(values):
        return " / ".join(f"{values[batch][0]:.2f}x ({values[batch][1]:.2f}x)" for batch in batches)

    forward, end_to_end = ratios("cast-forward"), ratios("cast-end-to-end")
    versus_forward = ratios("cast-end-to-end", "vit-forward")
    pooling = {batch: pooling_share(report.split[batch]) for batch in batches}
    return [
        f"Targets at batch {' / '.join(map(str, batches))}, from wall-clock time (CPU time in brackets):",
        f"- CAST-S forward >= 1.4x ViT-S: {listed(forward)}" + verdict(forward, lambda v: v[0] >= 1.4),
        f"- CAST-S end-to-end >= 1.1x ViT-S end-to-end: {listed(end_to_end)}"
        + verdict(end_to_end, lambda v: v[0] >= 1.1)
        + f"; against the ViT-S forward alone: {listed(versus_forward)}",
        "- FPS + graph pooling <= 10 % of the CAST-S forward: "
        + " / ".join(f"{100 * pooling[batch]:.1f} %" for batch in batches)
        + verdict(pooling, lambda v: v <= 0.10),
    ]


def format_report(report, command=None):
    """Markdown: the command, the machine, and the inference, time-split, FLOPs and training tables."""
    settings, machine = report.settings, report.machine
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, transformers "
        f"{machine['transformers']}; 1-minute load average {machine['load_average_start']:.1f} at the start, "
        f"{machine.get('load_average_end', float('nan')):.1f} at the end; {report.wall_seconds:.0f} s in all.",
        f"Random weights, {settings.image_size} px, {settings.num_superpixels} SEEDS superpixels requested. "
        "Images/s from the best of the interleaved repeats (median in brackets); CPU ms/image: the process's CPU "
        "time per image (best call), less sensitive to other load. x ViT-S compares with the ViT row of the same "
        "kind (forward or end-to-end), from wall-clock time (CPU time in brackets). Peak memory: resident memory "
        "above the loaded model and inputs during one call, in a fresh process.",
        "",
        "| model | batch | images/s | CPU ms/image | x ViT-S | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for batch_size in settings.batch_sizes:
        for case in INFERENCE_CASES:
            best = report.images_per_second(batch_size, case)
            median = report.images_per_second(batch_size, case, 1)
            cpu_ms = 1000 / report.images_per_second(batch_size, case, 2)
            memory = report.memory.get(case, {}).get(batch_size)
            memory_text = f"{memory:.0f}" if memory is not None else "-"
            lines.append(
                f"| {CASE_TITLES[case]} | {batch_size} | {best:.2f} ({median:.2f}) | {cpu_ms:.0f} | "
                f"{report.ratio(batch_size, case):.2f} ({report.ratio(batch_size, case, 2):.2f}) | "
                f"{memory_text} |"
            )

    lines += ["", *target_lines(report)]

    lines += ["", "CAST-S forward, where the time goes (ms per call; hooks on the modules):", ""]
    lines += [
        "| batch | total | "
        + " | ".join(SPLIT_TITLES[part] for part in SPLIT_PARTS)
        + " | FPS + graph pooling | processor (SEEDS) |",
        "|---:|---:|" + "---:|" * (len(SPLIT_PARTS) + 2),
    ]
    for batch_size, split in report.split.items():
        total = split["total"]
        cells = [f"{split[part]:.0f} ({_percent(split[part], total)})" for part in SPLIT_PARTS]
        pooling = split["fps"] + split["graph_pooling"]
        lines.append(
            f"| {batch_size} | {total:.0f} | "
            + " | ".join(cells)
            + f" | {pooling:.0f} ({_percent(pooling, total)}) | {split['processor']:.0f} |"
        )

    if report.flops:
        flops, parts = report.flops, report.flops["cast_parts"]
        lines += [
            "",
            "FLOPs per image (`torch.utils.flop_counter`: matmuls, attention and convolutions; MACs = FLOPs / 2):",
            "",
            "| model | GFLOPs | GMACs | paper GMACs |",
            "|---|---:|---:|---:|",
            f"| ViT-S/16 | {flops['vit'] / 1e9:.2f} | {flops['vit'] / 2e9:.2f} | {PAPER_GMACS['vit']:.2f} |",
            f"| CAST-S | {flops['cast'] / 1e9:.2f} | {flops['cast'] / 2e9:.2f} | {PAPER_GMACS['cast']:.2f} |",
            "",
            f"ViT-S / CAST-S FLOPs: {flops['vit'] / flops['cast']:.2f}. CAST-S FLOPs by part: "
            + ", ".join(
                f"{SPLIT_TITLES[part]} {_percent(value, flops['cast'])}"
                for part, value in parts.items()
                if part != "other"
            )
            + " (FPS is its float64 Gram matrix).",
        ]

    if report.training:
        lines += [
            "",
            f"Training step, batch {settings.train_batch_size} (random labels; MoCo-v3: two views through "
            "the base and the momentum encoder, AdamW):",
            "",
            "| step | ms per step | images/s | x ViT-S |",
            "|---|---:|---:|---:|",
        ]
        for name, (best, median) in report.training.items():
            reference = report.training[name.replace("CAST-S", "ViT-S/16")][0]
            lines.append(
                f"| {name} | {best * 1000:.0f} ({median * 1000:.0f}) | "
                f"{settings.train_batch_size / best:.2f} | {reference / best:.2f} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line: `hf-hierseg benchmark` (also scripts/benchmark_throughput.py)


def benchmark_parser():
    parser = argparse.ArgumentParser(
        description="Throughput of CAST-S against a transformers ViT-S/16 on this machine: forward and end-to-end "
        "images/s, peak memory, the time split of CAST's forward, FLOPs and training steps. Prints a markdown report."
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="inference batch sizes")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per case (scaled down, to at least 2, for batches above 8)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps after one warm-up step")
    parser.add_argument("--no-training", action="store_true", help="skip the training-step comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument(
        "--quick", action="store_true", help="batch sizes 1 and 8, 2 repeats, 1 training step, no memory processes"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    return parser


def settings_from_arguments(args):
    """The `BenchmarkSettings` of `benchmark_parser`'s arguments."""
    return BenchmarkSettings(
        batch_sizes=(1, 8) if args.quick else tuple(args.batch_sizes),
        repeats=2 if args.quick else args.repeats,
        threads=args.threads,
        train_batch_size=args.train_batch_size,
        train_repeats=1 if args.quick else args.train_repeats,
        measure_memory=not (args.no_memory or args.quick),
        measure_training=not args.no_training,
    )


def format_command(settings):
    """The `hf-hierseg benchmark` command that measures what `settings` asks for (shown in the report)."""
    words = ["hf-hierseg", "benchmark", "--batch-sizes", *map(str, settings.batch_sizes)]
    words += ["--repeats", str(settings.repeats), "--threads", str(settings.threads)]
    words += ["--train-batch-size", str(settings.train_batch_size), "--train-repeats", str(settings.train_repeats)]
    words += [] if settings.measure_training else ["--no-training"]
    words += [] if settings.measure_memory else ["--no-memory"]
    return " ".join(words)


def run_benchmark_command(args):
    """Run `benchmark_parser`'s arguments: print the report (and write --json). Returns 0."""
    settings = settings_from_arguments(args)
    report = run_benchmark(settings, log=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    print(format_report(report, format_command(settings)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2, default=str)
    return 0


__all__ = [
    "BenchmarkReport",
    "BenchmarkSettings",
    "InferenceCase",
    "benchmark_parser",
    "build_cases",
    "cast_time_split",
    "count_flops",
    "format_command",
    "format_report",
    "measure_peak_memory",
    "measure_throughput",
    "measure_training",
    "run_benchmark",
    "run_benchmark_command",
    "settings_from_arguments",
    "split_forward",
    "vit_small_config",
]
