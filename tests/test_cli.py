"""`hf-hierseg`: every subcommand has --help, mistakes give one line (no traceback), segment and embed write files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_hierseg import CastConfig, CastModel
from hf_hierseg.cli import DELEGATED_COMMANDS, main
from hf_hierseg.image_processing_cast import CastImageProcessor


SUBCOMMANDS = ["segment", "embed", "convert", *DELEGATED_COMMANDS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = CastConfig(
        hidden_size=24, num_attention_heads=4, depths=(1, 1, 1, 1), num_clusters=(16, 8, 4, 2), image_size=64
    )
    CastModel(config).save_pretrained(folder)
    CastImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


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
    + [["evaluate", "classification", "--help"], ["evaluate", "segmentation", "--help"]],
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
        ["embed", "a.png", "--out", "e.npy", "--batch-size", "0"],
        ["convert", "--output", "out"],
        ["train-moco", "--output_dir", "out", "--per_device_train_batch_size", "0"],
        ["train-supervised", "--unknown-flag"],
        ["finetune-lora", "--lora_r", "x"],
        ["evaluate"],
        ["evaluate", "regression"],
        ["evaluate", "classification", "--bogus"],
        ["benchmark", "--threads", "x"],
    ],
)
def test_wrong_arguments_give_one_line(argv, capsys):
    status, out, err = run(argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-hierseg") and "error:" in lines[0], err
    assert "Traceback" not in err + out


def test_failures_after_parsing_give_one_line(tmp_path, model_dir, images, capsys):
    cases = [
        ["segment", tmp_path / "missing.png", "--out", tmp_path / "out", "--model", model_dir],
        ["segment", images[0], "--out", tmp_path / "out", "--model", tmp_path],
        ["embed", images[0], "--out", tmp_path / "embeddings.txt", "--model", model_dir],
        ["convert", "--checkpoint", tmp_path / "missing.pth", "--output", tmp_path / "converted"],
    ]
    for argv in cases:
        status, out, err = run(argv, capsys)
        assert status == 1, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)


def test_segment_writes_overlays_and_the_hierarchy(tmp_path, model_dir, images, capsys):
    out = tmp_path / "segments"
    status, stdout, err = run(["segment", *images, "--out", out, "--model", model_dir, "--batch-size", "2"], capsys)
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


def test_embed_pooled_and_per_token(tmp_path, model_dir, images, capsys):
    status, _, err = run(["embed", *images, "--out", tmp_path / "pooled.npy", "--model", model_dir], capsys)
    assert status == 0, err
    pooled = np.load(tmp_path / "pooled.npy")
    assert pooled.shape == (2, 24)
    model = CastModel.from_pretrained(model_dir).eval()
    processor = CastImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model(**processor(images=[Image.open(images[1])], return_tensors="pt")).pooler_output[0]
    np.testing.assert_allclose(pooled[1], expected.numpy(), rtol=1e-5, atol=1e-5)

    status, _, err = run(
        ["embed", *images, "--out", tmp_path / "tokens.safetensors", "--per-token", "--model", model_dir], capsys
    )
    assert status == 0, err
    from safetensors import safe_open

    with safe_open(tmp_path / "tokens.safetensors", "np") as handle:
        assert handle.get_tensor("embeddings").shape == (2, 5, 24)
        assert json.loads(handle.metadata()["images"]) == [str(path) for path in images]


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
