"""Smoke test of the throughput benchmark on tiny models, and exactness of the fast paths it motivated (no timing
assertions: timings depend on the machine)."""

import math

import numpy as np
import pytest
import torch

from hf_hierseg.apps.benchmark_throughput import (
    INFERENCE_CASES,
    SPLIT_PARTS,
    BenchmarkSettings,
    build_cases,
    cast_time_split,
    compute_bound_line,
    count_flops,
    format_report,
    linear_kernel,
    matmul_bound_line,
    measure_peak_memory,
    onednn_linear_available,
    run_benchmark,
    sampling_methods,
    stem_methods,
)
from hf_hierseg.graph_pooling import farthest_point_sampling, farthest_point_sampling_direct
from hf_hierseg.segment_ops import segment_sum_and_count

from cast_testing import CONFIG_DEFAULT, CastModelTester


TESTER = CastModelTester()
TINY_CAST = TESTER.get_config_kwargs(num_labels=CONFIG_DEFAULT, projection_dim=16, projection_hidden_dim=32)
TINY_VIT = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def tiny_settings(**overrides):
    values = dict(
        batch_sizes=(1, 2),
        repeats=1,
        threads=1,
        image_size=64,
        num_superpixels=49,
        train_batch_size=2,
        train_repeats=1,
        measure_memory=False,
        runtimes=("eager",),
        cast_config=TINY_CAST,
        vit_config=TINY_VIT,
    )
    values.update(overrides)
    return BenchmarkSettings(**values)


@pytest.fixture(scope="module")
def tiny_report():
    return run_benchmark(tiny_settings())


def test_report_has_every_measurement(tiny_report):
    report = tiny_report
    assert set(report.throughput) == {1, 2}
    for batch_size, cases in report.throughput.items():
        assert set(cases) == set(INFERENCE_CASES)
        for best, median, cpu in cases.values():
            assert 0 < best <= median and cpu > 0
        split = report.split[batch_size]
        assert all(split[part] >= 0 for part in SPLIT_PARTS if part != "other")
        assert sum(split[part] for part in SPLIT_PARTS) == pytest.approx(split["total"])
        assert split["processor"] > 0
        rates = report.matmul_rates[batch_size]
        assert rates["cast_tokens"] == [1 + 49, *(1 + k for k in TINY_CAST["num_clusters"][:-1])]
        assert rates["vit_tokens"] == 1 + 16 and set(rates["rates"]) == {*rates["cast_tokens"], 17}
        assert all(math.isfinite(rate) and rate > 0 for rate in rates["rates"].values())
        if onednn_linear_available():
            assert set(rates["onednn_rates"]) == set(rates["rates"])
            assert all(math.isfinite(rate) and rate > 0 for rate in rates["onednn_rates"].values())
    assert set(report.training) == {"ViT-S/16 supervised", "CAST-S supervised", "ViT-S/16 MoCo-v3", "CAST-S MoCo-v3"}
    assert all(best > 0 for best, _ in report.training.values())
    # The ratio is CAST's images/s over the ViT's, of the same kind.
    expected = report.throughput[2]["vit-forward"][0] / report.throughput[2]["cast-forward"][0]
    assert report.ratio(2, "cast-forward") == pytest.approx(expected)
    assert report.ratio(2, "vit-end-to-end") == pytest.approx(1.0)


def test_report_markdown(tiny_report):
    text = format_report(tiny_report, "python scripts/benchmark_throughput.py --quick")
    assert text.startswith("Command: `python scripts/benchmark_throughput.py --quick`")
    assert "| CAST-S end-to-end (eager) | 2 |" in text and "| ViT-S/16 forward (eager) | 1 |" in text
    assert "- CAST-S forward (eager), batch 2: " in text and "paper GMACs" in text and "CAST-S MoCo-v3" in text
    # Every target line says met or NOT met, and each one not met comes with what bounds it.
    target_rows = [line for line in text.splitlines() if line.startswith("- CAST-S ") and ">= " in line]
    assert len(target_rows) == 4 and all(row.endswith((": met", ": NOT met")) for row in target_rows)
    if any(row.endswith("NOT met") for row in target_rows):
        assert "What bounds the targets not met" in text and "aten ops per forward" in text
        assert "would run" in text and "GMAC/s against ViT-S's" in text
    if any("forward" in row and row.endswith("NOT met") for row in target_rows):
        assert "matmuls: one MLP linear on batch x n rows runs at" in text
    # Every table row has as many cells as its header.
    for block in text.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({row.count("|") for row in rows}) <= 1, block


def test_time_split_hooks_are_removed():
    settings = tiny_settings()
    case = build_cases(settings, ["cast-forward"])[0]
    model = case.model
    with torch.no_grad():
        pixel_values = torch.randn(2, 3, 64, 64)
        superpixels = torch.arange(64).div(8, rounding_mode="floor")
        superpixels = (superpixels[:, None] * 8 + superpixels[None, :]).expand(2, -1, -1)
        reference = model(pixel_values, superpixels).pooler_output
        with cast_time_split(model) as seconds:
            timed = model(pixel_values, superpixels).pooler_output
        assert seconds["blocks"] > 0 and seconds["fps"] > 0 and seconds["conv_stem"] > 0
        assert torch.equal(reference, timed)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    wrapped = stem_methods(model) + sampling_methods(model)  # the stem's methods and FPS, timed on the instances
    assert len(wrapped) == 2 + len(model.levels) and all(name not in vars(module) for module, name in wrapped)


def test_flops_match_a_hand_count():
    """The ViT count equals the closed form of its matmuls; CAST's parts add up to its total."""
    settings = tiny_settings()
    from hf_hierseg.apps.benchmark_throughput import benchmark_images

    flops = count_flops(settings, benchmark_images(1, 64))
    width, layers, tokens, mlp = 24, 2, 1 + (64 // 16) ** 2, 48
    patch = 2 * (64 // 16) ** 2 * (3 * 16 * 16) * width
    per_layer = 2 * tokens * width * (3 * width + width + 2 * mlp) + 2 * 2 * tokens * tokens * width
    assert flops["vit"] == patch + layers * per_layer
    parts = flops["cast_parts"]
    assert sum(parts.values()) == flops["cast"]
    assert parts["conv_stem"] > 0 and parts["blocks"] > 0 and parts["graph_pooling"] > 0 and parts["fps"] > 0


def test_compute_bound_from_flops_and_times():
    """4.6 against 3.2 GMACs: at equal rates CAST would run 1.44x the ViT; 40 ms against 60 ms per image are rates
    of 80 and 76.7 GMAC/s (104 %); 1.4x needs 97 % of the ViT's rate."""
    line = compute_bound_line({"cast": 6.4e9, "vit": 9.2e9}, cast_ms=40.0, vit_ms=60.0)
    assert "CAST-S does 3.20 GMACs per image, ViT-S 4.60" in line
    assert "would run 1.44x ViT-S at most" in line
    assert "it runs 80 GMAC/s against ViT-S's 77 (104 %; the target needs 97 %)" in line


def test_matmul_bound_from_rates():
    """Levels of 10 and 5 tokens with 1 and 2 blocks do equal work (10 rows each); at 100 and 50 GMAC/s that is 20 units
    in 0.3 time units, 66.7 GMAC/s: 67 % of the ViT's 100 at 10 tokens; with 1.5x fewer FLOPs, 1.00x at most."""
    rates = {"cast_tokens": [10, 5], "cast_blocks": [1, 2], "vit_tokens": 10, "rates": {"10": 100.0, "5": 50.0}}
    line = matmul_bound_line(rates, {"cast": 2.0, "vit": 3.0})
    assert (
        "runs at 100 / 50 GMAC/s for CAST-S's levels (n = 10 / 5 tokens, 1 / 2 blocks) and 100 for ViT-S's 10" in line
    )
    assert line.endswith("run at 67 % of ViT-S's rate, which alone bounds the forward ratio at about 1.00x")
    assert matmul_bound_line(rates).endswith("67 % of ViT-S's rate")
    rates["onednn_rates"] = {"10": 200.0, "5": 200.0}  # no slower on few rows: the same share as the ViT's
    assert matmul_bound_line(rates).endswith("runs the same shapes at 200 / 200 and 200 GMAC/s (100 %)")


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")
def test_both_linear_kernels_compute_the_linear():
    weight, bias, rows = torch.randn(12, 8), torch.randn(12), torch.randn(5, 8)
    expected = rows @ weight.T + bias
    for kernel in ("default", "onednn"):
        torch.testing.assert_close(linear_kernel(kernel, weight, bias, 5)(rows), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kernel must be"):
        linear_kernel("blas", weight, bias, 5)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.slow
def test_peak_memory_in_a_fresh_process():
    from hf_hierseg.apps.benchmark_throughput import benchmark_images

    settings = tiny_settings(batch_sizes=(1,))
    memory = measure_peak_memory(settings, benchmark_images(1, 64), ["cast-forward"])
    assert set(memory) == {"cast-forward"} and set(memory["cast-forward"]) == {1}
    assert math.isfinite(memory["cast-forward"][1]) and memory["cast-forward"][1] >= 0


@pytest.mark.slow
def test_quick_mode_with_every_runtime(capsys):
    """`--quick` on tiny models: eager, torch.compile and ONNX Runtime rows for both models, ratios and targets."""
    from hf_hierseg.apps.benchmark_throughput import benchmark_parser, run_benchmark_command

    args = benchmark_parser().parse_args(["--quick", "--no-flops", "--threads", "1"])
    tiny = dict(image_size=64, num_superpixels=49, cast_config=TINY_CAST, vit_config=TINY_VIT)
    assert run_benchmark_command(args, **tiny) == 0
    text = capsys.readouterr().out
    assert "NOT measured" not in text, text
    for family in ("CAST-S", "ViT-S/16"):
        for runtime in ("eager", "torch.compile", "ONNX Runtime"):
            for kind in ("forward", "end-to-end"):
                for batch in (1, 8):
                    assert f"| {family} {kind} ({runtime}) | {batch} |" in text
    for runtime in ("eager", "torch.compile"):
        assert f"- CAST-S forward ({runtime}), batch 8: " in text
        assert f"- CAST-S end-to-end ({runtime}), batch 1: " in text and ">= 1.0x" in text
    assert "- CAST-S forward (ONNX Runtime), batch 1: " in text and "no target" in text


def test_compile_per_batch_size_makes_one_graph_per_batch_size():
    """`--compile-per-batch-size` adds the runtime to the settings, the command and the report (rows and targets);
    it compiles one graph per batch size for each model, where CAST's one-graph runtime compiles once for all. The
    `eager` Dynamo backend keeps it quick: the graph count does not depend on the backend."""
    from torch._dynamo.utils import counters

    from hf_hierseg.apps.benchmark_throughput import benchmark_parser, format_command, settings_from_arguments

    asked = settings_from_arguments(benchmark_parser().parse_args(["--compile-per-batch-size"]))
    assert asked.runtimes == ("eager", "compiled", "compiled_per_batch", "onnx")
    assert "--compile-per-batch-size" in format_command(asked)
    default = settings_from_arguments(benchmark_parser().parse_args([]))
    assert "compiled_per_batch" not in default.runtimes and "--compile-per-batch-size" not in format_command(default)

    torch._dynamo.reset()
    graphs = {}
    for runtime in ("compiled", "compiled_per_batch"):
        runtime_settings = tiny_settings(
            runtimes=("eager", runtime),
            compile_backend="eager",
            measure_flops=False,
            measure_training=False,
            batch_sizes=(1, 2, 3),
        )
        before = counters["stats"]["unique_graphs"]
        report = run_benchmark(runtime_settings)
        graphs[runtime] = counters["stats"]["unique_graphs"] - before
        assert not report.failed, report.failed
        text = format_report(report)
        title = "torch.compile" if runtime == "compiled" else "torch.compile, per batch size"
        for batch in (1, 2, 3):
            assert f"| CAST-S forward ({title}) | {batch} |" in text
            assert f"- CAST-S forward ({title}), batch {batch}: " in text
    # The ViT: static at its first batch size, then dynamic (2 graphs); CAST: one unbacked graph. Per batch size: 3
    # each.
    assert graphs == {"compiled": 2 + 1, "compiled_per_batch": 3 + 3}


def test_static_forward_has_no_host_sync(monkeypatch):
    """The static-budget CAST forward, on the path a captured graph (and, for FPS, a GPU) takes, dispatches no op
    that reads a value on the host (GPU-ready: nothing waits for the device); the dynamic one does (its token count
    is read from the labels)."""
    from hf_hierseg import CastConfig, CastModel
    from hf_hierseg.apps.benchmark_throughput import dispatched_ops, host_syncs

    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64)
    superpixels = torch.arange(64).div(8, rounding_mode="floor")
    superpixels = (superpixels[:, None] * 8 + superpixels[None, :]).expand(2, -1, -1).contiguous()
    config = {key: value for key, value in TINY_CAST.items() if not key.startswith("projection")}
    dynamic = CastModel(CastConfig(**config)).eval()
    assert host_syncs(dispatched_ops(dynamic, pixel_values, superpixels))  # the check can see a sync
    static = CastModel(CastConfig(**config, num_segment_tokens=64)).eval()
    static.load_state_dict(dynamic.state_dict())
    # As under torch.compile / export: the eager-only value checks and the CPU-only FPS branch are skipped.
    monkeypatch.setattr("hf_hierseg.modeling_cast.is_capturing_graph", lambda: True)
    monkeypatch.setattr("hf_hierseg.graph_pooling.is_capturing_graph", lambda: True)
    counts = dispatched_ops(static, pixel_values, superpixels)
    assert sum(counts.values()) > 100 and host_syncs(counts) == {}


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchmarkSettings(batch_sizes=(0,))
    with pytest.raises(ValueError, match="repeats"):
        BenchmarkSettings(repeats=0)
    assert BenchmarkSettings(repeats=5).repeats_for(32) == 3 and BenchmarkSettings(repeats=20).repeats_for(32) == 5
    assert BenchmarkSettings(repeats=2).repeats_for(32) == 2
    assert BenchmarkSettings(repeats=5).repeats_for(8) == 5


# ---------------------------------------------------------------------------------------------------------------
# The fast paths give the reference results


def random_point_sets():
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        batch, num_points, dim = (
            3,
            int(torch.randint(2, 40, (), generator=generator)),
            int(torch.randint(1, 30, (), generator=generator)),
        )
        points = torch.randn(batch, num_points, dim, generator=generator, dtype=torch.float64)
        kind = trial % 5
        if kind == 1:  # exact duplicates of the start point (as padding filled with the mean token)
            points[:, num_points // 2 :] = points[:, :1].clone()
        elif kind == 2:  # integer grid: many exactly tied distances
            points = torch.randint(0, 3, (batch, num_points, dim), generator=generator).double()
        elif kind == 3:  # a large common offset: the Gram matrix formula cancels badly
            points = points + 1e5
        elif kind == 4:  # fewer distinct points than samples
            points[:, 2:] = 0.0
        num_samples = int(torch.randint(1, num_points + 1, (), generator=generator))
        yield points, num_samples, int(torch.randint(0, num_points, (), generator=generator))


def test_fast_farthest_point_sampling_equals_direct():
    for points, num_samples, start in random_point_sets():
        assert torch.equal(
            farthest_point_sampling(points, num_samples, start),
            farthest_point_sampling_direct(points, num_samples, start),
        )


def test_farthest_point_sampling_hand_example():
    """On a line 0, 1, 5, 6, 10 from 0: 10 (farthest), then 5 (distance 25 to both), then ties between 1 and 6
    (distance 1) go to the lower index."""
    points = torch.tensor([[[0.0], [1.0], [5.0], [6.0], [10.0]]], dtype=torch.float64)
    assert farthest_point_sampling(points, 4).tolist() == [[0, 4, 2, 1]]
    with pytest.raises(ValueError, match="Cannot sample"):
        farthest_point_sampling(points, 6)


def test_segment_sums_equal_a_loop():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 50, 4, generator=generator)
    labels = torch.randint(0, 7, (3, 50), generator=generator)
    sums, counts = segment_sum_and_count(features, labels, 9)
    for image in range(3):
        for label in range(9):
            chosen = labels[image] == label
            assert counts[image, label] == chosen.sum()
            np.testing.assert_allclose(sums[image, label].numpy(), features[image][chosen].sum(0).numpy(), atol=1e-5)


# -- the segmentation benchmark (`hf-hierseg benchmark segment`) -------------------------------------------------------


def test_segment_benchmark_reports_every_stage_with_ratios(tmp_path):
    from hf_hierseg.apps.benchmark_segment import (
        STAGES,
        SegmentBenchmarkSettings,
        format_segment_report,
        run_segment_benchmark,
    )

    TESTER.save_model_folder(tmp_path, processor=TESTER.get_image_processor(size={"shortest_edge": 64}))
    messages = []
    report = run_segment_benchmark(
        SegmentBenchmarkSettings(num_photos=3, batch_size=2, repeats=1, threads=1, model=str(tmp_path)),
        log=messages.append,
    )
    assert set(report["best_ms"]) == set(STAGES) and all(report["best_ms"][stage] > 0 for stage in STAGES)
    reference = report["best_ms"]["processor"] + report["best_ms"]["forward"]
    for stage in STAGES:
        assert report["ratio"][stage] == pytest.approx(report["best_ms"][stage] / reference)
        assert report["median_ms"][stage] >= report["best_ms"][stage] and report["cpu_ms"][stage] > 0
    assert report["targets"]["pipeline"] == {"max_ratio": 1.5, "met": report["ratio"]["pipeline"] <= 1.5}
    assert report["targets"]["segment"]["met"] == (report["ratio"]["segment"] <= 4.0)
    assert report["photos"]["count"] == 3 and len(messages) == 3  # the setting line and two rounds
    text = format_segment_report(report)
    for title in ("processor + forward", "post-processing", "writing (1 thread)", "pipeline", "hf-hierseg segment",
                  "  --outputs labels,json"):  # fmt: skip
        assert f"\n{title} " in text
    assert "target <= 1.5:" in text and "target <= 4:" in text and "PNG encoding (5 pictures)" in text
    assert set(report["writing_parts_ms"]) == {
        "overlay_labels",
        "draw_hierarchy",
        "encode_png",
        "dumps",
        "write_atomic",
    }
    assert report["writing_parts_ms"]["encode_png"] > 0
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SegmentBenchmarkSettings(batch_size=0)
