"""`hf-hierseg`: every subcommand has --help, the user's mistakes give one line (no traceback) while bugs keep
theirs, segment and embed write files, `python -m hf_hierseg` is the same command line, and it works from a wheel."""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser, ViTConfig, ViTModel

from hf_hierseg import CastModel, loading
from hf_hierseg.cli import DELEGATED_COMMANDS, DelegatedCommand, main
from hf_hierseg.image_processing_cast import CastImageProcessor


REPO_ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["segment", "embed", "convert", *DELEGATED_COMMANDS]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, size in enumerate([(90, 60), (64, 64)]):
        picture = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        paths.append(folder / f"picture{index}.png")
        picture.save(paths[-1])
    return paths


def run(argv, capsys):
    """(exit status, stdout, stderr) of `hf-hierseg argv` run in this process."""
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_top_level_help_lists_every_subcommand(capsys):
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize(
    "argv",
    [[name, "--help"] for name in SUBCOMMANDS]
    + [["evaluate", "classification", "--help"], ["evaluate", "segmentation", "--help"]]
    + [["benchmark", "throughput", "--help"], ["benchmark", "segment", "--help"]],
)
def test_every_subcommand_has_help(argv, capsys):
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert out.startswith("usage: hf-hierseg " + " ".join(argv[:-1]))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["segment"],
        ["segment", "a.png"],
        ["segment", "a.png", "--out", "out", "--levels", "9"],
        ["segment", "--out", "out"],
        ["segment", "a.png", "--dataset_name", "photos", "--out", "out"],
        ["segment", "a.png", "--out", "out", "--index-format", "csv"],
        ["embed", "a.png", "--out", "e.npy", "--batch-size", "0"],
        ["convert", "--output", "out"],
        ["train-moco", "--output_dir", "out", "--per_device_train_batch_size", "0"],
        ["train-supervised", "--unknown-flag"],
        ["finetune-lora", "--lora_r", "x"],
        ["evaluate"],
        ["evaluate", "regression"],
        ["evaluate", "classification", "--bogus"],
        ["benchmark", "--threads", "x"],
        ["benchmark", "segment", "--batch-size", "x"],
    ],
)
def test_wrong_arguments_give_one_line(argv, capsys):
    status, out, err = run(argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-hierseg") and "error:" in lines[0], err
    assert "Traceback" not in err + out


def test_failures_after_parsing_give_one_line(tmp_path, tiny_model_folder, images, capsys):
    cases = [
        ["segment", tmp_path / "missing.png", "--out", tmp_path / "out", "--model", tiny_model_folder],
        ["segment", images[0], "--out", tmp_path / "out", "--model", tmp_path],
        ["embed", images[0], "--out", tmp_path / "embeddings.txt", "--model", tiny_model_folder],
        ["convert", "--checkpoint", tmp_path / "missing.pth", "--output", tmp_path / "converted"],
    ]
    for argv in cases:
        status, out, err = run(argv, capsys)
        assert status == 1, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32)
    ViTModel(config).save_pretrained(folder)
    return folder


def test_the_users_mistakes_are_named_in_one_line(tmp_path, tiny_model_folder, vit_dir, images, capsys):
    """Each mistake gives exit status 1 and one line saying what is wrong."""
    segment = ["segment", images[0], "--out", tmp_path / "out"]
    cases = [
        (segment + ["--model", "/missing"], "The model folder /missing does not exist."),
        (segment + ["--model", tmp_path], f"The folder {tmp_path} holds no model: it has no config.json."),
        (segment + ["--model", images[0]], "is a file; a model is a folder"),
        (segment + ["--model", "someone/missing-model"], "the Hub model 'someone/missing-model' could not be found"),
        (segment + ["--model", vit_dir], "needs a CAST model or a CAST configuration (config.model_type 'cast')"),
        (segment + ["--model", tiny_model_folder, "--device", "potato"], "'potato' is not a torch device"),
        (["demo", "--out", tmp_path / "demo", "--device", "cuda:7"], "Device 'cuda:7' is not available"),
        (
            ["evaluate", "segmentation", "--model_name_or_path", tmp_path / "nothing", "--real_photos", "voc"],
            f"The model folder {tmp_path / 'nothing'} does not exist.",
        ),
        (
            [
                "evaluate",
                "classification",
                "--model_name_or_path",
                tiny_model_folder,
                "--dataset_name",
                tmp_path / "none",
            ],
            f"The dataset folder {tmp_path / 'none'} does not exist.",
        ),
        (["benchmark", "--repeats", "0"], "repeats must be >= 1, got 0."),
    ]
    for argv, message in cases:
        status, out, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert status == 1 and len(lines) == 1 and message in lines[0], (argv, err)
        assert lines[0].startswith(f"hf-hierseg {argv[0]}: error: ")
    assert not (tmp_path / "demo").exists()  # the device is checked before anything is written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, tiny_model_folder, images, capsys):
    status, _, err = run(
        ["segment", images[0], "--out", tmp_path, "--model", tiny_model_folder, "--device", "cuda"], capsys
    )
    assert (
        status == 1
        and err.strip() == "hf-hierseg segment: error: Device 'cuda' is not available on this machine (only cpu)."
    )


def test_bugs_keep_their_traceback(tmp_path, tiny_model_folder, images, monkeypatch, capsys):
    """An unexpected exception (a bug, not the user's mistake) is not turned into one line."""

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(loading, "load_model_and_processor", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["segment", str(images[0]), "--out", str(tmp_path), "--model", str(tiny_model_folder)])
    assert capsys.readouterr().err == ""


def test_no_process_wide_patching(capsys):
    error, argv0 = argparse.ArgumentParser.error, sys.argv[0]
    for argv in (["train-supervised", "--bogus"], ["evaluate", "classification", "--bogus"], ["benchmark", "--help"]):
        run(argv, capsys)
        assert argparse.ArgumentParser.error is error and sys.argv[0] == argv0


@dataclasses.dataclass
class DataArguments:
    dataset_name: str
    max_samples: int = 8


@dataclasses.dataclass
class TrainArguments:
    learning_rate: float = 1e-3
    fused: bool = False


def test_delegation_to_an_hf_argument_parser(capsys):
    """A delegated command whose parser is an `HfArgumentParser` gets its dataclasses, with one-line errors."""
    received = []
    command = DelegatedCommand(
        "a trainer", lambda: HfArgumentParser((DataArguments, TrainArguments)), lambda *args: received.append(args)
    )
    assert command.run("hf-hierseg train-x", ["--dataset_name", "d", "--learning_rate", "0.5", "--fused"]) == 0
    assert received == [(DataArguments("d", 8), TrainArguments(0.5, True))]
    with pytest.raises(SystemExit) as exit_:
        command.run("hf-hierseg train-x", ["--dataset_name", "d", "--max_samples", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("hf-hierseg train-x: error: argument --max_samples/--max-samples: invalid int value")
    with pytest.raises(SystemExit):
        command.run("hf-hierseg train-x", ["--help"])
    assert capsys.readouterr().out.startswith("usage: hf-hierseg train-x [-h] --dataset_name DATASET_NAME")


def test_segment_writes_overlays_and_the_hierarchy(tmp_path, tiny_model_folder, images, capsys):
    out = tmp_path / "segments"
    status, stdout, err = run(
        ["segment", *images, "--out", out, "--model", tiny_model_folder, "--batch-size", "2"], capsys
    )
    assert status == 0, err
    for path in images:
        width, height = Image.open(path).size
        for level in (1, 2, 3, 4):
            overlay = Image.open(out / f"{path.stem}_level{level}.png")
            assert overlay.size == (width, height) and overlay.mode == "RGB"
        grid = Image.open(out / f"{path.stem}_hierarchy.png")
        assert grid.mode == "RGB" and grid.width > grid.height  # four columns (levels) of two rows
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert (record["height"], record["width"]) == (height, width)
        assert [level["level"] for level in record["levels"]] == [1, 2, 3, 4]
        for index, level in enumerate(record["levels"]):
            segments = level["segments"]
            assert level["num_segments"] == len(segments) <= (16, 8, 4, 2)[index]
            assert sum(segment["area"] for segment in segments) == width * height
            for segment in segments:
                x0, y0, x1, y1 = segment["bbox"]
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                assert segment["area"] <= (x1 - x0) * (y1 - y0)
                if index < 3:
                    assert segment["parent"] in {s["id"] for s in record["levels"][index + 1]["segments"]}
                else:
                    assert segment["parent"] is None
    assert f"{images[0]} ->" in stdout


def test_segment_globs_outputs_and_mistakes(tmp_path, tiny_model_folder, images, capsys):
    out = tmp_path / "pictures"
    pattern = str(images[0].parent / "picture*.png")
    status, stdout, err = run(
        ["segment", pattern, "--out", out, "--model", tiny_model_folder, "--outputs", "pictures"], capsys
    )
    assert status == 0, err
    names = sorted(path.name for path in out.iterdir())
    expected = [
        f"picture{i}_{kind}.png" for i in (0, 1) for kind in ("hierarchy", "level1", "level2", "level3", "level4")
    ]
    assert names == sorted(expected + ["index.jsonl"])  # pictures only, and the index
    assert "process 0 of 1: 2 photos segmented, 0 complete from an earlier run, 0 undecodable" in err
    status, _, err = run(
        ["segment", pattern, "--out", out, "--model", tiny_model_folder, "--outputs", "pictures"], capsys
    )
    assert status == 0 and "0 photos segmented, 2 complete from an earlier run" in err
    choices = "overlays, hierarchy, labels, json, pictures, all"
    for argv, message in [
        (
            [pattern, "--outputs", "overlays,masks"],
            f"unknown output 'masks' in --outputs 'overlays,masks': choose from {choices}",
        ),
        ([tmp_path / "none-*.png"], f"no images match {tmp_path / 'none-*.png'}"),
    ]:
        status, _, err = run(["segment", *argv, "--out", out, "--model", tiny_model_folder], capsys)
        assert status == 1 and err.strip().splitlines() == [f"hf-hierseg segment: error: {message}"], err


def test_benchmark_help_names_its_kinds(capsys):
    status, out, _ = run(["benchmark", "--help"], capsys)
    assert status == 0 and out.startswith("usage: hf-hierseg benchmark [-h] [--batch-sizes")
    assert "`hf-hierseg benchmark segment`" in " ".join(out.split())


def test_embed_pooled_and_per_token(tmp_path, tiny_model_folder, images, capsys):
    status, _, err = run(["embed", *images, "--out", tmp_path / "pooled.npy", "--model", tiny_model_folder], capsys)
    assert status == 0, err
    pooled = np.load(tmp_path / "pooled.npy")
    assert pooled.shape == (2, 24)
    model = CastModel.from_pretrained(tiny_model_folder).eval()
    processor = CastImageProcessor.from_pretrained(tiny_model_folder)
    with torch.no_grad():
        expected = model(**processor(images=[Image.open(images[1])], return_tensors="pt")).pooler_output[0]
    np.testing.assert_allclose(pooled[1], expected.numpy(), rtol=1e-5, atol=1e-5)

    status, _, err = run(
        ["embed", *images, "--out", tmp_path / "tokens.safetensors", "--per-token", "--model", tiny_model_folder],
        capsys,
    )
    assert status == 0, err
    from safetensors import safe_open

    with safe_open(tmp_path / "tokens.safetensors", "np") as handle:
        assert handle.get_tensor("embeddings").shape == (2, 5, 24)
        assert json.loads(handle.metadata()["images"]) == [str(path) for path in images]


@pytest.mark.slow
def test_console_script(tmp_path):
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "hf-hierseg"]
    assert entry.value == "hf_hierseg.cli:main"
    script = Path(sys.executable).parent / "hf-hierseg"
    result = subprocess.run(
        [str(script), "segment", tmp_path / "missing.png", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    expected = f"hf-hierseg segment: error: no such image: {tmp_path / 'missing.png'}"
    assert result.stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_python_m_runs_the_same_command_line(tmp_path, capsys):
    _, expected, _ = run(["--help"], capsys)
    completed = subprocess.run(
        [sys.executable, "-m", "hf_hierseg", "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert completed.returncode == 0 and completed.stdout == expected
    completed = subprocess.run(
        [sys.executable, "-m", "hf_hierseg", "segment", "missing.png", "--out", "out"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == ["hf-hierseg segment: error: no such image: missing.png"]


@pytest.mark.slow
def test_evaluate_and_benchmark_work_from_a_wheel_outside_the_checkout(tmp_path):
    """Build a wheel from the sources, unpack it outside the checkout and run the command line from it alone (the
    bundled default model included)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "hf_hierseg", source / "hf_hierseg", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path / "dist",
            source,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_hierseg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "training_summary.json"):
        assert f"hf_hierseg/assets/default_model/{name}" in names
    for name in ("mean_iou", "boundary_fscore", "segment_matching", "top_k_accuracy"):
        assert f"hf_hierseg/evaluation/modules/{name}.py" in names
    assert "hf_hierseg/apps/evaluate.py" in names and not any(name.startswith("scripts/") for name in names)

    work = tmp_path / "work"
    work.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}

    def hf_hierseg(*arguments):
        return subprocess.run(
            [sys.executable, "-m", "hf_hierseg", *map(str, arguments)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=work,
            env=environment,
        )

    located = subprocess.run(
        [sys.executable, "-c", "import hf_hierseg; print(hf_hierseg.__file__)"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
        env=environment,
    )
    assert located.stdout.strip() == str(tmp_path / "site" / "hf_hierseg" / "__init__.py")
    evaluate = hf_hierseg("evaluate", "segmentation", "--help")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert evaluate.stdout.startswith("usage: hf-hierseg evaluate segmentation [-h] --model_name_or_path")
    benchmark = hf_hierseg("benchmark", "--help")
    assert benchmark.returncode == 0, benchmark.stderr[-3000:]
    assert benchmark.stdout.startswith("usage: hf-hierseg benchmark [-h] [--batch-sizes")
    # The bundled default model is in the wheel: segment an image with it.
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    picture.resize((64, 48), Image.BICUBIC).save(work / "picture.png")
    segment = hf_hierseg("segment", "picture.png", "--out", "out", "--levels", "1", "4")
    assert segment.returncode == 0, segment.stderr[-3000:]
    record = json.loads((work / "out" / "picture.json").read_text())
    assert (record["width"], record["height"]) == (64, 48) and [level["level"] for level in record["levels"]] == [1, 4]
