"""`python scripts/check_device.py`: CAST on an accelerator (CUDA): parity, compile and throughput; skips cleanly
without one.

On a CUDA device it runs, with the bundled default model (static token budget) on the real demo photos:

1. parity: CPU float32 eager against the device in float32, eager and `torch.compile(fullgraph=True)` (largest
   embedding difference, hierarchy equal), and bfloat16 / float16 on the device against CPU float32 (segment-pair
   grouping agreement per level and embedding cosine, `evaluation.precision.grouping_agreement`);
2. host synchronisations: aten ops that read a value on the host during one eager device forward (one expected:
   the eager-only label-range check, which graph capture skips);
3. throughput on the device: CAST-S (static budget) against transformers ViT-S/16, forward (eager and compiled) at
   each batch size, and end to end with the next batch's SEEDS computed on the CPU while the device runs
   (`hf_hierseg.prefetch`).

Without CUDA it prints why it skips and returns 0.
"""

import argparse
import copy
import statistics
import time

import torch

from ..default_model import load_default
from ..evaluation.precision import grouping_agreement
from ..export import suggested_num_segment_tokens
from ..loading import static_model_and_processor
from ..modeling_cast import dynamic_batch_compilation
from ..prefetch import processed_batches
from .benchmark_throughput import (
    BenchmarkSettings,
    benchmark_images,
    build_models,
    dispatched_ops,
    host_syncs,
    model_inputs,
    static_cast_model,
)
from .demo import demo_photos


def cuda_unavailable_reason():
    """Why the check cannot run here (None when a CUDA device is present)."""
    if not torch.cuda.is_available():
        build = (
            "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        )
        return f"no CUDA device on this machine ({build}, torch {torch.__version__})"
    return None


def synchronized(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity_report(device, log):
    """CPU float32 against the device (float32 eager and compiled, bfloat16, float16) on the demo photos."""
    model, processor = load_default()
    model, processor = static_model_and_processor(
        model, processor, suggested_num_segment_tokens(processor, model.config)
    )
    photos, source = demo_photos()
    inputs = model_inputs(processor([image for _, image in photos], return_tensors="pt"))
    log(f"parity on {len(photos)} {source}; static budget {model.config.num_segment_tokens} tokens")
    with torch.no_grad():
        reference = model(**inputs)
        on_device = copy.deepcopy(model).to(device)
        device_inputs = {key: value.to(device).contiguous() for key, value in inputs.items()}
        results = {}
        eager = on_device(**device_inputs)
        compiled_model = torch.compile(on_device, fullgraph=True)
        with dynamic_batch_compilation(*device_inputs.values()):
            compiled = compiled_model(**device_inputs)
        for name, output in (("float32 eager", eager), ("float32 compiled", compiled)):
            difference = float((output.pooler_output.cpu() - reference.pooler_output).abs().max())
            hierarchy_equal = all(torch.equal(a.cpu(), b) for a, b in zip(output.hierarchy, reference.hierarchy))
            results[name] = {"max_embedding_difference": difference, "hierarchy_equal": hierarchy_equal}
            log(
                f"- {name} vs CPU float32: max |embedding difference| {difference:.2e}, hierarchy equal: {hierarchy_equal}"
            )
        for dtype in (torch.bfloat16, torch.float16):
            half = copy.deepcopy(model).to(device, dtype)
            agreement = grouping_agreement(model, half, inputs)
            results[str(dtype)] = agreement.as_dict()
            levels = " / ".join(f"{value:.3f}" for value in agreement.level_agreement)
            log(
                f"- {dtype} on {device} vs CPU float32: grouping agreement at levels 1-4 {levels}, min embedding "
                f"cosine {agreement.min_embedding_cosine:.4f}"
            )
        syncs = host_syncs_on_device(on_device, device_inputs)
        results["host_syncs"] = syncs
        log(f"- host synchronisations in one eager device forward (1 expected: the eager label-range check): {syncs}")
    return results


def host_syncs_on_device(model, inputs):
    """Host-sync ops of one eager device forward. The eager input check of a static-budget model reads the label
    range once by design (`_validate_static_labels`: one `aten::_local_scalar_dense`); graph capture skips it."""
    return host_syncs(dispatched_ops(model, **inputs))


def best_seconds(function, repeats, device):
    function()  # warm-up (compiles)
    synchronized(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronized(device)
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds)


def device_throughput(device, settings, log):
    """{batch: {case: images/s}} on `device`: CAST-S (static budget) and ViT-S/16, forward eager and compiled, and
    end to end (processor on the CPU, prefetched) with the eager models."""
    models = build_models(settings)
    vit, vit_processor = models["vit"]
    cast_static, cast_processor = static_cast_model(*models["cast"])
    vit, cast_static = vit.to(device), cast_static.to(device)
    compiled = {"vit": torch.compile(vit, fullgraph=True), "cast": torch.compile(cast_static, fullgraph=True)}
    images = benchmark_images(max(settings.batch_sizes), settings.image_size)
    results = {}
    for batch_size in settings.batch_sizes:
        batch = images[:batch_size]
        inputs = {
            "vit": {
                key: value.to(device) for key, value in model_inputs(vit_processor(batch, return_tensors="pt")).items()
            },
            "cast": {
                key: value.to(device)
                for key, value in model_inputs(cast_processor(batch, return_tensors="pt")).items()
            },
        }
        eager = {"vit": vit, "cast": cast_static}
        row = {}
        with torch.inference_mode():
            for family in ("vit", "cast"):
                for runtime, model in (("eager", eager[family]), ("compiled", compiled[family])):
                    best, _ = best_seconds(lambda m=model, x=inputs[family]: m(**x), settings.repeats, device)
                    row[f"{family}-{runtime}-forward"] = batch_size / best
            for family, processor in (("vit", vit_processor), ("cast", cast_processor)):

                def end_to_end(model=eager[family], processor=processor):
                    stream = [batch] * settings.stream_batches
                    for _, processed in processed_batches(processor, stream, lookahead=1):
                        model(**{key: value.to(device) for key, value in model_inputs(processed).items()})

                best, _ = best_seconds(end_to_end, max(1, settings.repeats // 2), device)
                row[f"{family}-eager-end-to-end"] = batch_size * settings.stream_batches / best
        results[batch_size] = row
        ratios = ", ".join(
            f"{name.split('-', 1)[1]} {row[name]:.0f} img/s ({row[name] / row[name.replace('cast', 'vit')]:.2f}x ViT-S)"
            for name in row
            if name.startswith("cast")
        )
        log(f"- batch {batch_size}: CAST-S {ratios}")
    return results


def run_device_check(device="cuda", batch_sizes=(1, 8, 32), repeats=10, log=print):
    """Run the checks on `device` (see the module docstring). Returns {"skipped": reason} without CUDA, else the
    results."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        log(f"Skipping the device check: {reason}. Nothing to do on a CPU-only machine (exit status 0).")
        return {"skipped": reason}
    device = torch.device(device)
    log(f"Device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    results = {"device": torch.cuda.get_device_name(device), "parity": parity_report(device, log)}
    settings = BenchmarkSettings(
        batch_sizes=batch_sizes, repeats=repeats, measure_memory=False, measure_training=False
    )
    log(f"throughput on {device} (images/s, best of {repeats}):")
    results["throughput"] = device_throughput(device, settings, log)
    return results


def check_device_parser():
    parser = argparse.ArgumentParser(
        description="CAST on a CUDA device: parity with the CPU (float32 eager and compiled, bf16 / fp16 agreement), "
        "host synchronisations, and throughput against ViT-S/16. Skips cleanly (exit 0) without CUDA."
    )
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=10)
    return parser


def run_check_device_command(args):
    run_device_check(args.device, tuple(args.batch_sizes), args.repeats)
    return 0


__all__ = ["check_device_parser", "cuda_unavailable_reason", "run_check_device_command", "run_device_check"]
