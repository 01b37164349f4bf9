"""The converter: formats, kept/dropped report, duplicates, contradictions, unsafe pickles."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_hierseg import CastForImageClassification, CastForSelfSupervisedPretraining, CastModel
from hf_hierseg.convert import convert_checkpoint, convert_state, load_original_checkpoint, parse_overrides


TINY = ["num_attention_heads=4", "num_clusters=16,8,4,2"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fixtures(shared_dir):
    return shared_dir / "fixtures" / "original_cast"


@pytest.fixture
def deit_checkpoint(fixtures):
    return load_original_checkpoint(fixtures / "tiny_deit" / "checkpoint.pth")


@pytest.fixture
def moco_checkpoint(fixtures):
    return load_original_checkpoint(fixtures / "tiny_moco" / "checkpoint_0000.pth.tar")


def test_script_lists_kept_and_dropped_keys(tmp_path, fixtures):
    output = tmp_path / "tiny_moco"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert_original_cast.py"),
            "--checkpoint",
            str(fixtures / "tiny_moco" / "checkpoint_0000.pth.tar"),
            "--output",
            str(output),
            "--set",
            "num_attention_heads=4",
            "--set",
            "num_clusters=16,8,4,2",
            "--set",
            "image_size=64",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    text = result.stdout
    assert "source format: moco; saved as CastForSelfSupervisedPretraining" in text
    checkpoint = torch.load(fixtures / "tiny_moco" / "checkpoint_0000.pth.tar", weights_only=True)
    for key in checkpoint["state_dict"]:
        assert key in text, f"{key} is neither reported kept nor dropped"
    for key in ("optimizer", "epoch", "scaler"):
        assert f"drop  {key}" in text
    assert "module.momentum_encoder.cls_token" in text and "momentum encoder" in text
    model = CastForSelfSupervisedPretraining.from_pretrained(output)
    assert model.config.num_clusters == (16, 8, 4, 2) and model.config.image_size == 64
    assert "projector.0.weight" in load_file(output / "model.safetensors")


def test_script_error_is_one_line(tmp_path):
    bogus = tmp_path / "bogus.pth"
    torch.save({"weight": torch.zeros(2)}, bogus)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert_original_cast.py"),
            "--checkpoint",
            str(bogus),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Not a CAST checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_deit_checkpoint_becomes_classifier(deit_checkpoint):
    model, report = convert_state(deit_checkpoint, None, parse_overrides(TINY))
    assert isinstance(model, CastForImageClassification) and report.source_format == "deit"
    assert model.config.num_labels == 10 and model.config.position_embedding_type == "learned"
    assert report.kept["head.weight"] == "classifier.weight"
    assert report.kept["pos_embed"] == "cast.embeddings.position_embeddings"


def test_bare_state_dict_and_linear_probe_format(deit_checkpoint, tmp_path):
    bare = dict(deit_checkpoint["model"])
    model, report = convert_state(bare, None, parse_overrides(TINY))
    assert report.source_format == "state_dict" and isinstance(model, CastForImageClassification)
    probe = {"epoch": 3, "state_dict": {"module." + k: v for k, v in bare.items()}}
    model2, report2 = convert_state(probe, None, parse_overrides(TINY))
    assert report2.source_format == "linear-probe"
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    headless = {k: v for k, v in bare.items() if not k.startswith("head.")}
    backbone, _ = convert_state(headless, None, parse_overrides(TINY))
    assert type(backbone) is CastModel


def test_saved_directory_reloads_identically(tmp_path, fixtures, shared_dir):
    model, _ = convert_checkpoint(fixtures / "tiny_deit" / "checkpoint.pth", tmp_path, None, parse_overrides(TINY))
    reloaded = CastForImageClassification.from_pretrained(tmp_path).eval()
    inputs = load_file(fixtures / "tiny_deit" / "inputs.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_diverging_duplicate_blocks_are_refused(deit_checkpoint):
    state = dict(deit_checkpoint["model"])
    state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"] + 1
    with pytest.raises(ValueError, match="twin"):
        convert_state({"model": state}, None, parse_overrides(TINY))


def test_preset_that_contradicts_the_tensors(deit_checkpoint):
    with pytest.raises(ValueError, match="hidden_size=24.*hidden_size=384"):
        convert_state(deit_checkpoint, "cast-small", None)
    with pytest.raises(ValueError, match="image_size"):
        convert_state(deit_checkpoint, None, parse_overrides(TINY + ["image_size=224"]))
    with pytest.raises(ValueError, match="depths"):
        convert_state(deit_checkpoint, None, parse_overrides(TINY + ["depths=2,1,1,1"]))


def test_heads_that_do_not_divide_the_width(deit_checkpoint):
    with pytest.raises(ValueError, match="num_attention_heads"):
        convert_state(deit_checkpoint, None, parse_overrides(["num_attention_heads=5", "num_clusters=16,8,4,2"]))


def test_not_a_cast_checkpoint_lists_expectations():
    with pytest.raises(ValueError, match="cls_token.*patch_embed"):
        convert_state({"model": {"conv.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="expected a dict"):
        convert_state([torch.zeros(1)])


def test_argparse_namespace_needs_opt_in(tmp_path, deit_checkpoint):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": deit_checkpoint["model"], "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match="allow_argparse_namespace"):
        load_original_checkpoint(path)
    loaded = load_original_checkpoint(path, allow_argparse_namespace=True)
    _, report = convert_state(loaded, None, parse_overrides(TINY))
    assert "args" in report.dropped


def test_other_pickled_objects_stay_refused(tmp_path, deit_checkpoint):
    path = tmp_path / "evil.pth"
    torch.save({"model": deit_checkpoint["model"], "extra": Path("x")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_original_checkpoint(path, allow_argparse_namespace=True)


def test_parse_overrides_types():
    assert parse_overrides(["num_clusters=32,16,8,4", "mask_padding_tokens=true", "image_size=96"]) == {
        "num_clusters": (32, 16, 8, 4),
        "mask_padding_tokens": True,
        "image_size": 96,
    }
    with pytest.raises(ValueError, match="unknown config field"):
        parse_overrides(["width=3"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["image_size"])


def test_converted_folder_has_processor_and_publishes(tmp_path, fixtures, hub_server):
    from huggingface_hub import snapshot_download
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_hierseg import CastImageProcessor
    from hf_hierseg.convert import publish_converted

    output = tmp_path / "tiny_deit"
    model, report = convert_checkpoint(fixtures / "tiny_deit" / "checkpoint.pth", output, None, parse_overrides(TINY))
    processor = CastImageProcessor.from_pretrained(output)
    assert processor.crop_size == {"height": 64, "width": 64} and processor.superpixel_recipe == "supervised"
    publish_converted(output, "cast-test/tiny-deit", report)
    local = snapshot_download("cast-test/tiny-deit")
    card = (Path(local) / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "DeiT-style supervised" in card
    reloaded = AutoModelForImageClassification.from_pretrained(local).eval()
    inputs = load_file(fixtures / "tiny_deit" / "inputs.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert type(AutoImageProcessor.from_pretrained(local)) is CastImageProcessor
