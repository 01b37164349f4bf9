"""Throughput benchmark: CAST against a transformers ViT of the same width, on the same machine in one run.

Measured (see `run_benchmark`):

- inference images/s of the model forward (inputs already processed: pixel values and SEEDS superpixels) and end to
  end (image processor + forward, from 8-bit images, the next batch's superpixels computed while the model runs:
  `hf_hierseg.prefetch`), with the ratio to the ViT, for three runtimes of each model: eager PyTorch,
  `torch.compile(fullgraph=True)` and ONNX Runtime (an export with `torch.onnx.export(dynamo=True)`). CAST's compiled
  and ONNX runtimes use the static token budget (`num_segment_tokens` = the superpixels the processor returns), its
  eager runtime the default (dynamic) model, with the same weights. Asked for (`--compile-per-batch-size`), a fourth
  runtime compiles both models once per batch size (static shapes, Inductor's layout optimisation on), beside the
  one graph for every batch size;
- the peak resident memory of each eager call, measured in a fresh process per model;
- where CAST's forward time goes: ConvStem, segment pooling, transformer blocks, farthest point sampling and the
  rest of graph pooling (forward hooks; on CPU every op is synchronous, so wall-clock hooks are exact), and the
  number of aten ops one forward dispatches (the per-op overhead that bounds small batches);
- FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`, next to the paper's GMACs;
- training steps: a supervised step (cross-entropy, AdamW) and a MoCo-v3 step (two views through the base and the
  momentum encoder), CAST against the ViT.

Times are the best of `repeats` interleaved calls (the models alternate, so a load spike from other processes hits
both); the median is reported beside it.
"""

import argparse
import collections
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
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

from ..configuration_cast import CastConfig
from ..errors import InvalidInputError
from ..evaluation.synthetic import generate_example
from ..image_processing_cast import CastImageProcessor
from ..loading import static_model_and_processor
from ..modeling_cast import (
    CastForImageClassification,
    CastForSelfSupervisedPretraining,
    CastModel,
    dynamic_batch_compilation,
    moco_mlp,
)
from ..prefetch import processed_batches
from ..training.moco import contrastive_loss


# GMACs per 224x224 image reported in the CAST paper (Table 1).
PAPER_GMACS = {"vit": 4.60, "cast": 3.12}
FAMILIES = ("vit", "cast")
FAMILY_TITLES = {"vit": "ViT-S/16", "cast": "CAST-S"}
RUNTIMES = ("eager", "compiled", "compiled_per_batch", "onnx")
# Measured unless skipped; "compiled_per_batch" (one graph per batch size) only when asked for.
DEFAULT_RUNTIMES = ("eager", "compiled", "onnx")
RUNTIME_TITLES = {
    "eager": "eager",
    "compiled": "torch.compile",
    "compiled_per_batch": "torch.compile, per batch size",
    "onnx": "ONNX Runtime",
}
KINDS = ("forward", "end-to-end")
# The targets: CAST / ViT images/s of the same runtime and kind, at least this, per batch size (None: any).
FORWARD_TARGET = 1.4
END_TO_END_TARGETS = {1: 1.0, None: 1.1}
TARGET_RUNTIMES = ("eager", "compiled", "compiled_per_batch")
# Host synchronisations: an op that reads a tensor's value on the host.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::unique")
SPLIT_PARTS = ("conv_stem", "segment_pooling", "blocks", "fps", "graph_pooling", "other")
SPLIT_TITLES = {
    "conv_stem": "ConvStem",
    "segment_pooling": "segment pooling",
    "blocks": "blocks",
    "fps": "FPS",
    "graph_pooling": "graph pooling (rest)",
    "other": "other",
}


def case_name(family, runtime, kind):
    """`cast-forward`, `vit-end-to-end` (eager), `cast-compiled-forward`, `vit-onnx-end-to-end`, ..."""
    return f"{family}-{kind}" if runtime == "eager" else f"{family}-{runtime}-{kind}"


def parse_case_name(name):
    """(family, runtime, kind) of `case_name`."""
    family, _, rest = name.partition("-")
    runtime = next((runtime for runtime in RUNTIMES[1:] if rest.startswith(runtime + "-")), "eager")
    kind = rest[len(runtime) + 1 :] if runtime != "eager" else rest
    return family, runtime, kind


def case_title(name):
    family, runtime, kind = parse_case_name(name)
    return f"{FAMILY_TITLES[family]} {kind} ({RUNTIME_TITLES[runtime]})"


INFERENCE_CASES = tuple(case_name(family, "eager", kind) for kind in KINDS for family in FAMILIES)


def vit_small_config(**overrides):
    """transformers ViT-S/16: width 384, 6 heads, depth 12, MLP 1536, 224 px, sdpa attention."""
    values = dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
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
    sizes up to 8 and scaled down (to at least 3, or `repeats` if fewer) for larger batches. `runtimes`: of
    `RUNTIMES`; end to end, each timed call runs `stream_batches` batches, the next one's superpixels computed while
    the model runs."""

    batch_sizes: tuple = (1, 8, 32)
    repeats: int = 5
    threads: int = 2
    image_size: int = 224
    num_superpixels: int = 196
    train_batch_size: int = 8
    train_repeats: int = 2
    measure_memory: bool = True
    measure_training: bool = True
    measure_flops: bool = True
    runtimes: tuple = DEFAULT_RUNTIMES
    compile_backend: str = "inductor"  # torch.compile's backend for the compiled runtimes
    stream_batches: int = 3
    seed: int = 0
    cast_config: dict | None = None  # CastConfig kwargs; None = CastConfig.from_preset("cast-small")
    vit_config: dict | None = None  # ViTConfig kwargs; None = vit_small_config()

    def __post_init__(self):
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        self.runtimes = tuple(self.runtimes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidInputError(f"batch_sizes must be positive integers, got {self.batch_sizes}.")
        for name in (
            "repeats", "threads", "train_batch_size", "train_repeats", "image_size", "num_superpixels",
            "stream_batches",
        ):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        unknown = [runtime for runtime in self.runtimes if runtime not in RUNTIMES]
        if unknown or "eager" not in self.runtimes:
            raise InvalidInputError(f"runtimes must include 'eager' and be among {RUNTIMES}, got {self.runtimes}.")

    def repeats_for(self, batch_size):
        return max(min(3, self.repeats), round(self.repeats * min(1.0, 8 / batch_size)))

    def build_cast_config(self, num_segment_tokens=None):
        values = dict(self.cast_config or {})
        if num_segment_tokens is not None:
            values["num_segment_tokens"] = num_segment_tokens
        if self.cast_config is None:
            return CastConfig.from_preset("cast-small", image_size=self.image_size, **values)
        return CastConfig(**values)

    def build_vit_config(self):
        return vit_small_config(image_size=self.image_size, **(self.vit_config or {}))

    def case_names(self):
        return [case_name(f, r, k) for k in KINDS for r in RUNTIMES if r in self.runtimes for f in FAMILIES]


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
# Runtimes and inference cases


@dataclass
class Runtime:
    """One model in one runtime: `forward(inputs)` runs processed inputs; `model` is the eager module (also for the
    compiled and ONNX runtimes, the module they were made from); `setup_seconds`: compile or export time."""

    family: str
    name: str
    forward: object
    processor: object
    model: object
    setup_seconds: float = 0.0


class InferenceCase:
    """One timed call: the model forward on processed inputs, or processor + forward on 8-bit images (a stream of
    `stream_batches` copies of the batch, the next batch processed in a worker thread while the model runs)."""

    def __init__(self, name, runtime, stream_batches=1):
        self.name = name
        self.family, self.runtime_name, kind = parse_case_name(name)
        self.end_to_end = kind == "end-to-end"
        self.runtime = runtime
        self.model = runtime.model
        self.processor = runtime.processor
        self.stream_batches = stream_batches if self.end_to_end else 1

    def prepare(self, images):
        return images if self.end_to_end else model_inputs(self.processor(images, return_tensors="pt"))

    @torch.inference_mode()
    def __call__(self, inputs):
        if not self.end_to_end:
            return self.runtime.forward(inputs)
        stream = [inputs] * self.stream_batches
        for _, processed in processed_batches(self.processor, stream, lookahead=1):
            outputs = self.runtime.forward(model_inputs(processed))
        return outputs


def eager_forward(model):
    def forward(inputs):
        return model(**inputs)

    return forward


def static_cast_model(model, processor):
    """A copy of the eager CAST model with the static token budget that the processor's labels fit (the number of
    SEEDS superpixels it returns), and the processor capped to it (`loading.static_model_and_processor`)."""
    from ..export import suggested_num_segment_tokens

    budget = suggested_num_segment_tokens(processor, model.config)
    return static_model_and_processor(copy.deepcopy(model), processor, budget)


def compiled_runtime(static_model, processor, family, runtime="compiled", backend="inductor"):
    """`torch.compile(fullgraph=True)`; CAST compiles once for every batch size (`dynamic_batch_compilation` at the
    first call), the ViT recompiles at its second batch size (then dynamic), which the warm-up call absorbs. With
    `runtime="compiled_per_batch"`, both compile one static graph per batch size (`dynamic=False`, the warm-up call
    of each batch size compiles it), with Inductor's default options (layout optimisation on). `backend`:
    torch.compile's."""
    start = time.perf_counter()
    per_batch_size = runtime == "compiled_per_batch"
    compiled = torch.compile(static_model, fullgraph=True, dynamic=False if per_batch_size else None, backend=backend)
    first_call = [family == "cast" and not per_batch_size]

    def forward(inputs):
        # The processor's pixel values are a strided view of HWC arrays; the graph compiled for unbacked batch
        # sizes asserts the strides it was traced with, so every call gets contiguous inputs.
        inputs = {key: value.contiguous() for key, value in inputs.items()}
        if first_call and first_call.pop():
            with dynamic_batch_compilation(*inputs.values()):
                return compiled(**inputs)
        return compiled(**inputs)

    return Runtime(family, runtime, forward, processor, static_model, time.perf_counter() - start)


def onnx_runtime(static_model, processor, family, folder, threads):
    from ..export import OnnxRunner, export_cast_onnx, export_module_onnx

    path = os.path.join(folder, f"{family}.onnx")
    start = time.perf_counter()
    if family == "cast":
        export_cast_onnx(static_model, path)
        names = ("pixel_values", "superpixels")
    else:
        side = static_model.config.image_size
        example = {"pixel_values": torch.randn(2, 3, side, side)}
        export_module_onnx(static_model, example, path, ["last_hidden_state"])
        names = ("pixel_values",)
    # Idle threads sleep: spinning ones would take the CPU from the case timed next (ViT-S eager, after CAST-S's ONNX
    # run, at batch 1: 7.0 images/s with spinning threads, 15.0 without, in two runs of this benchmark).
    runner = OnnxRunner(path, providers=["CPUExecutionProvider"], num_threads=threads, allow_spinning=False)
    seconds = time.perf_counter() - start

    def forward(inputs):
        return runner.run(**{name: inputs[name] for name in names})

    return Runtime(family, "onnx", forward, processor, static_model, seconds)


def build_models(settings, families=FAMILIES):
    """Random-weight ViT and CAST backbones in eval mode, and their processors: {family: (model, processor)}."""
    torch.manual_seed(settings.seed)
    built = {}
    if "vit" in families:
        built["vit"] = (ViTModel(settings.build_vit_config(), add_pooling_layer=False).eval(), vit_processor(settings))
    if "cast" in families:
        built["cast"] = (CastModel(settings.build_cast_config()).eval(), cast_processor(settings))
    return built


def build_runtimes(settings, families=FAMILIES, runtimes=None, folder=None, log=None):
    """({(family, runtime): Runtime}, {(family, runtime): why it could not be built}). ONNX needs `folder` for the
    exported files."""
    log = log or (lambda line: None)
    runtimes = settings.runtimes if runtimes is None else runtimes
    built, failed = {}, {}
    for family, (model, processor) in build_models(settings, families).items():
        eager = Runtime(family, "eager", eager_forward(model), processor, model)
        built[family, "eager"] = eager
        static, static_processor = static_cast_model(model, processor) if family == "cast" else (model, processor)
        for runtime in runtimes:
            if runtime == "eager":
                continue
            log(f"{runtime}: {FAMILY_TITLES[family]}")
            try:
                if runtime in ("compiled", "compiled_per_batch"):
                    built[family, runtime] = compiled_runtime(
                        static, static_processor, family, runtime, settings.compile_backend
                    )
                else:
                    built[family, runtime] = onnx_runtime(static, static_processor, family, folder, settings.threads)
            except Exception as error:  # reported in the table: one runtime failing must not stop the others
                failed[family, runtime] = failure_text(error)
    return built, failed


def build_benchmark_cases(settings, names=None, folder=None, log=None):
    """(the `InferenceCase`s named, default every case of `settings`; {(family, runtime): why it failed to build})."""
    names = list(names or settings.case_names())
    families = {parse_case_name(name)[0] for name in names}
    needed = {parse_case_name(name)[1] for name in names}
    built, failed = build_runtimes(settings, families, [r for r in RUNTIMES if r in needed], folder, log)
    cases = [
        InferenceCase(name, built[parse_case_name(name)[:2]], settings.stream_batches)
        for name in names
        if parse_case_name(name)[:2] in built
    ]
    return cases, failed


def build_cases(settings, names=INFERENCE_CASES):
    """The eager `InferenceCase`s named."""
    return build_benchmark_cases(settings, names)[0]


def timed(function, *args):
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def failure_text(error):
    """One line naming an error and its cause (torch.onnx wraps torch.export's error in a long preamble)."""
    cause = error.__cause__ or error
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {message[0][:300] if message else ''}"


def measure_throughput(cases, images, batch_size, repeats, warmup_seconds=None, failed=None):
    """{case: (best, median wall-clock seconds, best CPU seconds of this process)} per batch of `batch_size` images
    (an end-to-end call's time over its `stream_batches`); the cases alternate. The first call of each case (a
    compile for the compiled runtimes, oneDNN primitives for this shape) is a warm-up, its seconds put in the dict
    `warmup_seconds` when given. A case whose warm-up raises is left out, the reason in `failed[case]` (when given;
    else the error propagates). CPU time is what the call itself consumed (all its threads), so it moves less than
    wall-clock time when other processes load the machine."""
    batch_images = images[:batch_size]
    inputs = {case.name: case.prepare(batch_images) for case in cases}
    working = []
    for case in cases:
        try:
            seconds = timed(case, inputs[case.name])
        except Exception as error:  # e.g. a graph break under fullgraph=True: reported, the others go on
            if failed is None:
                raise
            failed[case.name] = failure_text(error)
            continue
        working.append(case)
        if warmup_seconds is not None:
            warmup_seconds[case.name] = seconds
    seconds = {case.name: [] for case in working}
    cpu_seconds = {case.name: [] for case in working}
    for _ in range(repeats):
        for case in working:
            cpu_start = time.process_time()
            seconds[case.name].append(timed(case, inputs[case.name]) / case.stream_batches)
            cpu_seconds[case.name].append((time.process_time() - cpu_start) / case.stream_batches)
    return {name: (min(values), statistics.median(values), min(cpu_seconds[name])) for name, values in seconds.items()}


class DispatchedOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (`counts`: {"aten::name": calls})."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[f"aten::{func._schema.name.split('::')[-1]}"] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(function, *args, **kwargs):
    """{aten op: calls} of one `function(*args, **kwargs)` (no grad)."""
    with torch.inference_mode(), DispatchedOps() as counter:
        function(*args, **kwargs)
    return dict(counter.counts)


def host_syncs(counts):
    """The ops of `dispatched_ops` that read a tensor's value on the host, {op: calls}."""
    return {op: calls for op, calls in counts.items() if op in HOST_SYNC_OPS}


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


def stem_methods(model):
    """The ConvStem's methods the CAST forward calls (its 3x3 stages, and the 1x1 projection on the segment means):
    (module, method name) pairs. `CastEmbeddings` calls them directly, so no forward hook of the stem sees them."""
    stem = model.embeddings.patch_embeddings
    return [(stem, "convolutions"), (stem, "project")]


def sampling_methods(model):
    """Graph pooling's farthest point sampling at every level: (module, method name) pairs."""
    return [(level.pooling, "sample_centroids") for level in model.levels]


@contextlib.contextmanager
def wrapped_methods(methods, wrapper):
    """Replace each (module, name) of `methods` by `wrapper(bound_method)` on the instance inside the block (the
    class's method is untouched, and is what the instance calls again afterwards)."""
    patched = []
    try:
        for module, name in methods:
            setattr(module, name, wrapper(getattr(module, name)))
            patched.append((module, name))
        yield
    finally:
        for module, name in patched:
            delattr(module, name)


@contextlib.contextmanager
def cast_time_split(model):
    """Accumulate wall-clock seconds of CAST's parts during the calls inside the block: yields a dict with
    `SPLIT_PARTS` keys (`other` is filled in by `split_forward`). Works on a `CastModel`."""
    seconds = dict.fromkeys(SPLIT_PARTS, 0.0)
    handles = []

    def add_timer(module, part):
        def start(*_):
            module._benchmark_start = time.perf_counter()

        def stop(*_):
            seconds[part] += time.perf_counter() - module._benchmark_start

        handles.append(module.register_forward_pre_hook(start))
        handles.append(module.register_forward_hook(stop))

    def timer(part):
        def wrap(method):
            def timed_method(*args, **kwargs):
                start = time.perf_counter()
                result = method(*args, **kwargs)
                seconds[part] += time.perf_counter() - start
                return result

            return timed_method

        return wrap

    add_timer(model.embeddings, "segment_pooling")  # the ConvStem is subtracted below
    for level in model.levels:
        for block in level.blocks:
            add_timer(block, "blocks")
        add_timer(level.pooling, "graph_pooling")  # FPS is subtracted below
    try:
        with wrapped_methods(stem_methods(model), timer("conv_stem")):
            with wrapped_methods(sampling_methods(model), timer("fps")):
                yield seconds
    finally:
        for handle in handles:
            handle.remove()
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
        stem_flops, fps_flops = [], []

        def flop_counter(totals):
            def wrap(method):
                def counted_method(*args, **kwargs):
                    with FlopCounterMode(display=False) as inner:
                        result = method(*args, **kwargs)
                    totals.append(inner.get_total_flops())
                    return result

                return counted_method

            return wrap

        with wrapped_methods(stem_methods(cast), flop_counter(stem_flops)):
            with wrapped_methods(sampling_methods(cast), flop_counter(fps_flops)):
                with FlopCounterMode(display=False) as counter:
                    cast(**inputs)
    counts = counter.get_flop_counts()
    fps = sum(fps_flops)
    parts = {
        "conv_stem": sum(stem_flops),
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
    warmup: dict = field(default_factory=dict)  # {batch: {case: seconds of the first call}}
    setup_seconds: dict = field(default_factory=dict)  # {"family-runtime": compile / export seconds}
    failed: dict = field(default_factory=dict)  # {"family-runtime": why it could not be built}
    memory: dict = field(default_factory=dict)  # {case: {batch: MiB}}
    split: dict = field(default_factory=dict)  # {batch: {part: ms}}
    ops: dict = field(default_factory=dict)  # {family: {"ops": aten ops per forward, "host_syncs": {op: n}}}
    flops: dict = field(default_factory=dict)
    # {batch: {"cast_tokens": [n per level], "cast_blocks": [blocks per level], "vit_tokens": n, "rates": {n: GMAC/s}}}
    matmul_rates: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # {step: (best s, median s)}
    wall_seconds: float = 0.0

    def cases(self, batch_size=None):
        batch_size = next(iter(self.throughput)) if batch_size is None else batch_size
        return list(self.throughput.get(batch_size, {}))

    def images_per_second(self, batch_size, case, statistic=0):
        """From the best (0) or median (1) wall-clock time, or from the best CPU time (2)."""
        return batch_size / self.throughput[batch_size][case][statistic]

    def reference_case(self, case):
        """The ViT case of the same runtime and kind."""
        _, runtime, kind = parse_case_name(case)
        return case_name("vit", runtime, kind)

    def ratio(self, batch_size, case, statistic=0, reference=None):
        """Images/s of `case` over the ViT's of the same runtime and kind (forward or end-to-end), or over
        `reference`; None when that case was not measured."""
        reference = reference or self.reference_case(case)
        if case not in self.throughput[batch_size] or reference not in self.throughput[batch_size]:
            return None
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


def onednn_linear_available():
    """Whether this torch build has oneDNN's linear on prepacked weights (`torch.ops.mkldnn._linear_pointwise`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear_kernel(kernel, weight, bias, num_rows):
    """`rows -> rows @ weight.T + bias` by `kernel`: "default", PyTorch's `F.linear` (its float32 BLAS: MKL on x86), or
    "onednn", oneDNN's linear on the weight prepacked for `num_rows` rows (the op Inductor's freezing uses for
    bfloat16 Linear layers; PyTorch does not use it for float32)."""
    if kernel == "default":
        return lambda rows: torch.nn.functional.linear(rows, weight, bias)
    if kernel == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, num_rows)
        return lambda rows: torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    raise ValueError(f"kernel must be 'default' or 'onednn', got {kernel!r}.")


def matmul_rates(settings, batch_size, token_counts, repeats=10, kernel="default"):
    """{n: GMAC/s} of one linear of the MLP's shape (hidden -> mlp_ratio x hidden, CAST-S's and ViT-S's alike) on
    `batch_size` x n rows, per token count n (best of `repeats`), by `linear_kernel`'s `kernel`: how fast the blocks'
    matmuls run at the token counts of CAST's levels against the ViT's."""
    config = settings.build_cast_config()
    hidden = config.hidden_size
    weight, bias = torch.randn(int(config.mlp_ratio * hidden), hidden), torch.randn(int(config.mlp_ratio * hidden))
    rates = {}
    with torch.inference_mode():
        for count in token_counts:
            rows = torch.randn(batch_size * count, hidden)
            linear = linear_kernel(kernel, weight, bias, rows.shape[0])
            linear(rows)
            seconds = min(timed(linear, rows) for _ in range(repeats))
            rates[count] = rows.shape[0] * weight.numel() / seconds / 1e9
    return rates


def block_token_counts(settings):
    """(tokens per level the CAST blocks see, blocks per level, the ViT's tokens), CLS included; CAST's first level
    with the superpixels requested."""
    config, vit_config = settings.build_cast_config(), settings.build_vit_config()
    cast_tokens = [1 + settings.num_superpixels] + [1 + clusters for clusters in config.num_clusters[:-1]]
    vit_tokens = 1 + (vit_config.image_size // vit_config.patch_size) ** 2
    return cast_tokens, list(config.depths), vit_tokens


def measure_matmul_rates(settings, batch_size):
    """`BenchmarkReport.matmul_rates` of one batch size."""
    cast_tokens, blocks, vit_tokens = block_token_counts(settings)
    counts = sorted({*cast_tokens, vit_tokens}, reverse=True)
    rates = matmul_rates(settings, batch_size, counts)
    onednn = matmul_rates(settings, batch_size, counts, kernel="onednn") if onednn_linear_available() else {}
    return {
        "cast_tokens": cast_tokens, "cast_blocks": blocks, "vit_tokens": vit_tokens, "rates": rates,
        "onednn_rates": onednn,
    }  # fmt: skip


def rates_by_token_count(rates_by_count):
    """{n: GMAC/s} with int keys (a report read back from JSON has them as strings)."""
    return {int(count): value for count, value in rates_by_count.items()}


def block_rate_share(rates_by_count, counts, blocks, vit_count):
    """CAST's blocks' matmul rate (the rates of its levels weighted by their multiply-adds, which scale with blocks x
    tokens) as a share of the ViT's rate. `rates_by_count`: {n: GMAC/s}, keys ints or their strings (JSON)."""
    rate = rates_by_token_count(rates_by_count)
    work = [depth * count for depth, count in zip(blocks, counts)]  # multiply-adds per level, up to a factor
    cast_rate = sum(work) / sum(macs / rate[count] for macs, count in zip(work, counts))
    return cast_rate / rate[vit_count]


def matmul_bound_line(rates, flops=None):
    """The matmul-size bound on the forward ratio at one batch size (`measure_matmul_rates`'s): the rates per token
    count, CAST's blocks' rate as a share of the ViT's (`block_rate_share`), with `flops` the forward ratio that share
    alone allows, and oneDNN's rates where they were measured."""
    counts, blocks, vit_count = rates["cast_tokens"], rates["cast_blocks"], rates["vit_tokens"]

    def listed(rates_by_count):
        rate = rates_by_token_count(rates_by_count)
        return " / ".join(f"{rate[count]:.0f}" for count in counts), f"{rate[vit_count]:.0f}"

    share = block_rate_share(rates["rates"], counts, blocks, vit_count)
    cast_rates, vit_rate = listed(rates["rates"])
    line = (
        f"matmuls: one MLP linear on batch x n rows runs at {cast_rates} GMAC/s for CAST-S's levels (n = "
        f"{' / '.join(map(str, counts))} tokens, {' / '.join(map(str, blocks))} blocks) and {vit_rate} for ViT-S's "
        f"{vit_count}: CAST-S's block matmuls run at {100 * share:.0f} % of ViT-S's rate"
    )
    if flops:
        line += f", which alone bounds the forward ratio at about {flops['vit'] / flops['cast'] * share:.2f}x"
    if rates.get("onednn_rates"):
        onednn_share = block_rate_share(rates["onednn_rates"], counts, blocks, vit_count)
        cast_rates, vit_rate = listed(rates["onednn_rates"])
        line += (
            f"; oneDNN's linear on prepacked weights (not what PyTorch uses for float32) runs the same shapes at "
            f"{cast_rates} and {vit_rate} GMAC/s ({100 * onednn_share:.0f} %)"
        )
    return line


def count_forward_ops(cases, images):
    """{family: {"ops": aten ops of one eager forward at batch 1, "host_syncs": {op: calls}}}."""
    result = {}
    for case in cases:
        if case.runtime_name == "eager" and not case.end_to_end and case.family not in result:
            counts = dispatched_ops(case.runtime.forward, case.prepare(images[:1]))
            result[case.family] = {"ops": sum(counts.values()), "host_syncs": host_syncs(counts)}
    return result


def recompile_budget(settings):
    """A context raising Dynamo's limit of graphs per code object (8) to what `settings` may compile: transformers'
    output wrapper is one code object for both models, and the per-batch-size runtime adds a graph per batch size of
    each."""
    graphs = 8 + len(FAMILIES) * len(settings.runtimes) * len(settings.batch_sizes)
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, graphs))


def run_benchmark(settings=None, log=None):
    """Run everything `settings` asks for (CPU). `log` receives progress lines."""
    settings = settings or BenchmarkSettings()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with recompile_budget(settings):
            return measure_everything(settings, log or (lambda line: None))
    finally:
        torch.set_num_threads(previous_threads)


def measure_everything(settings, log):
    """`run_benchmark`'s measurements, with the threads and the recompile limit set."""
    started = time.perf_counter()
    report = BenchmarkReport(settings=settings, machine=machine_description(settings.threads))
    report.machine["load_average_start"] = load_average()
    images = benchmark_images(
        max(max(settings.batch_sizes), settings.train_batch_size), settings.image_size, settings.seed
    )
    with tempfile.TemporaryDirectory(prefix="hf-hierseg-benchmark-") as folder:
        cases, failed = build_benchmark_cases(settings, folder=folder, log=log)
    report.failed = {f"{family}-{runtime}": why for (family, runtime), why in failed.items()}
    for case in cases:
        report.setup_seconds[f"{case.family}-{case.runtime_name}"] = case.runtime.setup_seconds
    cast_forward = next(case for case in cases if case.name == "cast-forward")
    report.ops = count_forward_ops(cases, images)
    cases = [case for case in cases if f"{case.family}-{case.runtime_name}" not in report.failed]
    for batch_size in settings.batch_sizes:
        log(f"throughput, batch {batch_size}")
        report.warmup[batch_size], failed_cases = {}, {}
        report.throughput[batch_size] = measure_throughput(
            cases, images, batch_size, settings.repeats_for(batch_size), report.warmup[batch_size], failed_cases
        )
        for name, why in failed_cases.items():
            family, runtime, _ = parse_case_name(name)
            report.failed.setdefault(f"{family}-{runtime}", f"at batch {batch_size}: {why}")
        cases = [case for case in cases if f"{case.family}-{case.runtime_name}" not in report.failed]
        report.matmul_rates[batch_size] = measure_matmul_rates(settings, batch_size)
        log(f"time split, batch {batch_size}")
        processed = cast_forward.prepare(images[:batch_size])
        report.split[batch_size] = split_forward(cast_forward, processed, images[:batch_size])
    del cases, cast_forward
    if settings.measure_flops:
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


def _percent(part, total):
    return f"{100 * part / total:.1f} %" if total else "-"


def pooling_share(split):
    """Share of FPS + graph pooling in one time split."""
    return (split["fps"] + split["graph_pooling"]) / split["total"]


def end_to_end_target(batch_size):
    return END_TO_END_TARGETS.get(batch_size, END_TO_END_TARGETS[None])


def target_results(report):
    """[(case, batch, ratio from wall-clock time, ratio from CPU time, target)] for the issue's targets: CAST-S
    forward >= 1.4x ViT-S at every batch size, end-to-end >= 1.1x (>= 1.0x at batch 1), eager and compiled, each
    against the ViT of the same runtime; ONNX Runtime rows have no target (target None)."""
    results = []
    for runtime in report.settings.runtimes:
        for kind in KINDS:
            case = case_name("cast", runtime, kind)
            for batch_size in report.settings.batch_sizes:
                ratio = report.ratio(batch_size, case)
                if ratio is None:
                    continue
                target = None
                if runtime in TARGET_RUNTIMES:
                    target = FORWARD_TARGET if kind == "forward" else end_to_end_target(batch_size)
                results.append((case, batch_size, ratio, report.ratio(batch_size, case, 2), target))
    return results


def target_lines(report):
    """The targets, met / NOT met per case and batch size, from wall-clock time (CPU time in brackets)."""
    lines = ["Targets (CAST-S images/s over ViT-S/16's, same runtime and kind; wall-clock, CPU time in brackets):"]
    for case, batch_size, ratio, cpu_ratio, target in target_results(report):
        verdict = "no target" if target is None else f">= {target:.1f}x: {'met' if ratio >= target else 'NOT met'}"
        lines.append(f"- {case_title(case)}, batch {batch_size}: {ratio:.2f}x ({cpu_ratio:.2f}x), {verdict}")
    batches = list(report.settings.batch_sizes)
    pooling = {batch: pooling_share(report.split[batch]) for batch in batches if batch in report.split}
    lines.append(
        "- FPS + graph pooling share of the eager CAST-S forward: "
        + " / ".join(f"{100 * pooling[batch]:.1f} %" for batch in pooling)
        + f" at batch {' / '.join(map(str, pooling))}"
    )
    return lines


def bound_lines(report):
    """What bounds each target not met: per image, the forward and the processor (SEEDS for CAST) of both models,
    what the end-to-end ratio would be with the processor fully hidden behind the forward (the forward ratio) or not
    at all, the arithmetic bound (FLOPs) and the matmul-size bound (`matmul_bound_line`) of the forward, and the per-op
    overhead at small batch (aten ops per forward, ms per op)."""
    missed = [(case, batch) for case, batch, ratio, _, target in target_results(report) if target and ratio < target]
    if not missed:
        return []
    lines = ["What bounds the targets not met (ms per image, from the best calls):"]
    for batch_size in sorted({batch for _, batch in missed}):
        throughput = report.throughput[batch_size]
        split = report.split.get(batch_size, {})
        for runtime in sorted({parse_case_name(case)[1] for case, batch in missed if batch == batch_size}):
            cast, vit = case_name("cast", runtime, "forward"), case_name("vit", runtime, "forward")
            if cast not in throughput or vit not in throughput:
                continue
            cast_ms, vit_ms = (1000 * throughput[name][0] / batch_size for name in (cast, vit))
            cast_e2e = 1000 * throughput[case_name("cast", runtime, "end-to-end")][0] / batch_size
            vit_e2e = 1000 * throughput[case_name("vit", runtime, "end-to-end")][0] / batch_size
            seeds_ms = split.get("processor", float("nan")) / batch_size
            lines.append(
                f"- batch {batch_size}, {RUNTIME_TITLES[runtime]}: forward CAST-S {cast_ms:.1f} vs ViT-S {vit_ms:.1f} "
                f"({vit_ms / cast_ms:.2f}x); end to end CAST-S {cast_e2e:.1f} vs ViT-S {vit_e2e:.1f}, of which "
                f"CAST's processor (SEEDS) alone takes {seeds_ms:.1f} ms per image: with it fully hidden behind the "
                f"forward the end-to-end ratio would be at most the forward ratio; not hidden at all, "
                f"{vit_e2e / (cast_ms + seeds_ms):.2f}x"
            )
            if report.flops:
                lines.append("  " + compute_bound_line(report.flops, cast_ms, vit_ms))
        forward_missed = any(parse_case_name(case)[2] == "forward" for case, batch in missed if batch == batch_size)
        if forward_missed and batch_size in report.matmul_rates:
            lines.append(f"- batch {batch_size}, " + matmul_bound_line(report.matmul_rates[batch_size], report.flops))
    if report.ops and 1 in report.throughput and {"cast", "vit"} <= set(report.ops):
        cast_ops, vit_ops = report.ops["cast"]["ops"], report.ops["vit"]["ops"]
        cast_ms = 1000 * report.throughput[1]["cast-forward"][0]
        vit_ms = 1000 * report.throughput[1]["vit-forward"][0]
        lines.append(
            f"- per-op overhead at batch 1 (eager): CAST-S dispatches {cast_ops} aten ops per forward "
            f"({cast_ms / cast_ops * 1000:.0f} us per op on average), ViT-S {vit_ops} ({vit_ms / vit_ops * 1000:.0f} us "
            f"per op); host synchronisations in CAST-S's eager forward: {report.ops['cast']['host_syncs'] or 'none'}"
        )
    return lines


def compute_bound_line(flops, cast_ms, vit_ms):
    """The arithmetic bound on the forward ratio: from the FLOPs per image of both models (`count_flops`) and their
    forward ms per image, the ratio CAST-S would reach at ViT-S's rate of multiply-adds and the rates measured."""
    cast_gmacs, vit_gmacs = flops["cast"] / 2e9, flops["vit"] / 2e9
    cast_rate, vit_rate = cast_gmacs / (cast_ms / 1000), vit_gmacs / (vit_ms / 1000)
    return (
        f"compute: CAST-S does {cast_gmacs:.2f} GMACs per image, ViT-S {vit_gmacs:.2f}, so at ViT-S's rate CAST-S "
        f"would run {vit_gmacs / cast_gmacs:.2f}x ViT-S at most; it runs {cast_rate:.0f} GMAC/s against ViT-S's "
        f"{vit_rate:.0f} ({100 * cast_rate / vit_rate:.0f} %; the target needs "
        f"{100 * FORWARD_TARGET * cast_gmacs / vit_gmacs:.0f} %)"
    )


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
        "runtime and kind (forward or end-to-end), from wall-clock time (CPU time in brackets). End to end: "
        f"{settings.stream_batches} batches per timed call, the next batch's processor run in a worker thread "
        "while the model runs (`hf_hierseg.prefetch`). Compiled and ONNX CAST-S use the static token budget. "
        "First call: the warm-up (compiling for torch.compile). Peak memory (eager): resident memory above the "
        "loaded model and inputs during one call, in a fresh process.",
        "",
        "| model | batch | images/s | CPU ms/image | x ViT-S | first call (s) | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for batch_size in settings.batch_sizes:
        for case in report.cases(batch_size):
            best = report.images_per_second(batch_size, case)
            median = report.images_per_second(batch_size, case, 1)
            cpu_ms = 1000 / report.images_per_second(batch_size, case, 2)
            memory = report.memory.get(case, {}).get(batch_size)
            memory_text = f"{memory:.0f}" if memory is not None else "-"
            ratio, cpu_ratio = report.ratio(batch_size, case), report.ratio(batch_size, case, 2)
            ratio_text = f"{ratio:.2f} ({cpu_ratio:.2f})" if ratio is not None else "-"
            warmup = report.warmup.get(batch_size, {}).get(case)
            warmup_text = f"{warmup:.1f}" if warmup is not None else "-"
            lines.append(
                f"| {case_title(case)} | {batch_size} | {best:.2f} ({median:.2f}) | {cpu_ms:.0f} | {ratio_text} | "
                f"{warmup_text} | {memory_text} |"
            )
    if report.setup_seconds:
        lines += [
            "",
            "Setup (s): "
            + ", ".join(
                f"{FAMILY_TITLES[name.split('-')[0]]} {RUNTIME_TITLES[name.split('-')[1]]} {seconds:.1f}"
                for name, seconds in report.setup_seconds.items()
                if not name.endswith("-eager")
            )
            + " (ONNX: export and session; torch.compile compiles at the first call, in the first-call column).",
        ]
    for name, why in report.failed.items():
        family, runtime = name.split("-", 1)
        lines += ["", f"NOT measured: {FAMILY_TITLES[family]} {RUNTIME_TITLES[runtime]}: {why}"]

    lines += ["", *target_lines(report)]
    bounds = bound_lines(report)
    if bounds:
        lines += ["", *bounds]

    lines += ["", "CAST-S forward (eager), where the time goes (ms per call; hooks on the modules):", ""]
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

QUICK = dict(batch_sizes=(1, 8), repeats=2, stream_batches=2, measure_training=False, measure_memory=False)


def benchmark_parser():
    parser = argparse.ArgumentParser(
        description="Throughput of CAST-S against a transformers ViT-S/16 on this machine, eager, torch.compile and "
        "ONNX Runtime: forward and end-to-end images/s with the ratios and the targets (met / NOT met, and what "
        "bounds those not met), peak memory, the time split of CAST's forward, FLOPs and training steps. Prints a "
        "markdown report."
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="inference batch sizes")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per case (scaled down, to at least 3, for batches above 8)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and ONNX Runtime's threads)")
    parser.add_argument(
        "--stream-batches", type=int, default=3, help="batches per end-to-end call (the next one prefetched)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runtime")
    parser.add_argument(
        "--compile-per-batch-size",
        action="store_true",
        help="also measure torch.compile with one static graph per batch size (dynamic=False, Inductor's defaults: "
        "layout optimisation on), both models; a compile per batch size",
    )
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime runtime (and the exports)")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps after one warm-up step")
    parser.add_argument("--no-training", action="store_true", help="skip the training-step comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch sizes 1 and 8, 2 repeats, 2 batches per end-to-end call, no training steps and no memory "
        "processes (eager, compiled and ONNX still measured unless --no-compile / --no-onnx)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    return parser


def settings_from_arguments(args, **overrides):
    """The `BenchmarkSettings` of `benchmark_parser`'s arguments (`overrides`: other fields, e.g. tiny configs)."""
    wanted = {
        "eager": True,
        "compiled": not args.no_compile,
        "compiled_per_batch": args.compile_per_batch_size,
        "onnx": not args.no_onnx,
    }
    values = dict(
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
        threads=args.threads,
        stream_batches=args.stream_batches,
        train_batch_size=args.train_batch_size,
        train_repeats=args.train_repeats,
        measure_memory=not args.no_memory,
        measure_training=not args.no_training,
        measure_flops=not args.no_flops,
        runtimes=tuple(runtime for runtime in RUNTIMES if wanted[runtime]),
    )
    if args.quick:
        values.update(QUICK)
    values.update(overrides)
    return BenchmarkSettings(**values)


def format_command(settings):
    """The `hf-hierseg benchmark` command that measures what `settings` asks for (shown in the report)."""
    words = ["hf-hierseg", "benchmark", "--batch-sizes", *map(str, settings.batch_sizes)]
    words += ["--repeats", str(settings.repeats), "--threads", str(settings.threads)]
    words += ["--stream-batches", str(settings.stream_batches)]
    words += ["--train-batch-size", str(settings.train_batch_size), "--train-repeats", str(settings.train_repeats)]
    words += [] if "compiled" in settings.runtimes else ["--no-compile"]
    words += ["--compile-per-batch-size"] if "compiled_per_batch" in settings.runtimes else []
    words += [] if "onnx" in settings.runtimes else ["--no-onnx"]
    words += [] if settings.measure_training else ["--no-training"]
    words += [] if settings.measure_memory else ["--no-memory"]
    words += [] if settings.measure_flops else ["--no-flops"]
    return " ".join(words)


def run_benchmark_command(args, **overrides):
    """Run `benchmark_parser`'s arguments: print the report (and write --json). Returns 0."""
    settings = settings_from_arguments(args, **overrides)
    report = run_benchmark(settings, log=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    print(format_report(report, format_command(settings)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2, default=str)
    return 0


__all__ = [
    "BenchmarkReport",
    "BenchmarkSettings",
    "DispatchedOps",
    "InferenceCase",
    "benchmark_parser",
    "block_rate_share",
    "build_benchmark_cases",
    "build_cases",
    "cast_time_split",
    "count_flops",
    "dispatched_ops",
    "format_command",
    "format_report",
    "host_syncs",
    "linear_kernel",
    "matmul_bound_line",
    "matmul_rates",
    "measure_peak_memory",
    "measure_throughput",
    "measure_training",
    "onednn_linear_available",
    "run_benchmark",
    "run_benchmark_command",
    "sampling_methods",
    "settings_from_arguments",
    "split_forward",
    "stem_methods",
    "target_results",
    "vit_small_config",
    "wrapped_methods",
]
