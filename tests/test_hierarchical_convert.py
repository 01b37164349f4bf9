"""Converting H-CAST checkpoints: detection by the level heads, class counts checked against the taxonomy (both
taxonomy formats), the kept / dropped report, named mistakes, and checkpoints and taxonomies read from Hub paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from hf_hierseg import CastForHierarchicalImageClassification, CastImageProcessor
from hf_hierseg.cli import main
from hf_hierseg.convert import (
    convert_checkpoint,
    convert_state,
    load_original_checkpoint,
    parse_hub_path,
    parse_overrides,
    read_taxonomy,
)
from hf_hierseg.errors import InvalidInputError, MissingInputError


pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TINY = ["--set", "num_attention_heads=4", "--set", "num_clusters=16,8,4,2"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fixtures(shared_dir):
    return shared_dir / "fixtures" / "original_hcast"


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


def test_converter_reports_every_key_and_the_taxonomy_check(tmp_path, fixtures, capsys):
    fixture = fixtures / "tiny_hcast_3level"
    output = tmp_path / "hcast"
    argv = ["--checkpoint", str(fixture / "checkpoint.pth"), "--taxonomy", str(fixture / "taxonomy.json")]
    assert main(["convert", *argv, "--output", str(output), *TINY]) == 0
    text = capsys.readouterr().out
    assert "source format: deit; saved as CastForHierarchicalImageClassification" in text
    assert (
        "H-CAST taxonomy: species (12) -> family (6) -> manufacturer (3); matches the level heads head [12], "
        "family_head [6], manufacturer_head [3]"
    ) in text
    for head, level in (("head", 0), ("family_head", 1), ("manufacturer_head", 2)):
        for tensor in ("weight", "bias"):
            assert f"keep  {head}.{tensor} -> classifier.{level}.{tensor}" in text
    checkpoint = torch.load(fixture / "checkpoint.pth", weights_only=True)
    assert len(checkpoint["model"]) == 192
    for key in checkpoint["model"]:
        assert f"keep  {key} ->" in text or f"drop  {key}  (" in text, f"{key} is neither kept nor dropped"
    assert "drop  blocks.0.norm1.weight  (duplicate of blocks1.0.norm1.weight" in text
    for key in ("optimizer", "lr_scheduler", "epoch", "accuracy", "scaler"):
        assert f"drop  {key}  (training state" in text
    assert "kept 144 tensors" in text  # 192 - 48 duplicated block keys

    model = AutoModelForImageClassification.from_pretrained(output)
    assert type(model) is CastForHierarchicalImageClassification
    assert model.config.hierarchy_level_names == ("species", "family", "manufacturer")
    assert model.config.hierarchy_id2label[2][1] == "manufacturer_01" and model.config.id2label[11] == "species_11"
    taxonomy = json.loads((fixture / "taxonomy.json").read_text())
    assert [list(path) for path in model.config.hierarchy_paths()] == taxonomy["paths"]
    processor = CastImageProcessor.from_pretrained(output)
    assert processor.superpixel_recipe == "supervised" and processor.crop_size == {"height": 64, "width": 64}
    weights = load_file(output / "model.safetensors")
    torch.testing.assert_close(weights["classifier.2.weight"], checkpoint["model"]["manufacturer_head.weight"])


@pytest.mark.slow
def test_script_converts_with_the_tree_json_format(tmp_path, fixtures):
    # H-CAST's data/*_tree.json: rows [fine, coarse], one per fine class; no names, so LABEL_<i> and rank<k>.
    fixture = fixtures / "tiny_hcast_2level"
    tree = write_json(tmp_path / "tiny_tree.json", json.loads((fixture / "taxonomy.json").read_text())["paths"])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert_original_cast.py"),
            "--checkpoint",
            str(fixture / "checkpoint.pth"),
            "--taxonomy",
            str(tree),
            "--output",
            str(tmp_path / "out"),
            *TINY,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "H-CAST taxonomy: rank0 (10) -> rank1 (4); matches the level heads head [10], family_head [4]" in (
        result.stdout
    )
    model = CastForHierarchicalImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.hierarchy_parents == ((1, 0, 1, 2, 0, 0, 3, 3, 2, 3),)
    assert model.config.hierarchy_id2label[1] == {i: f"LABEL_{i}" for i in range(4)}


def test_both_taxonomy_formats_give_the_same_tree(tmp_path, fixtures):
    for name in ("tiny_hcast_2level", "tiny_hcast_3level"):
        levels = read_taxonomy(fixtures / name / "taxonomy.json")
        paths = json.loads((fixtures / name / "taxonomy.json").read_text())["paths"]
        rows = read_taxonomy(write_json(tmp_path / f"{name}_tree.json", paths))
        assert rows["hierarchy_num_labels"] == levels["hierarchy_num_labels"]
        assert rows["hierarchy_parents"] == levels["hierarchy_parents"]
        assert read_taxonomy(write_json(tmp_path / f"{name}_paths.json", {"paths": paths})) == rows


def test_h_cast_checkpoint_needs_its_taxonomy(fixtures):
    checkpoint = load_original_checkpoint(fixtures / "tiny_hcast_3level" / "checkpoint.pth")
    with pytest.raises(InvalidInputError, match=r"H-CAST checkpoint \(3 label levels: head \[12\].*--taxonomy"):
        convert_state(checkpoint, None, parse_overrides(TINY[1::2]))


def test_class_counts_must_match_the_heads(tmp_path, fixtures, capsys):
    fixture = fixtures / "tiny_hcast_3level"
    wrong = fixtures / "tiny_hcast_2level" / "taxonomy.json"
    argv = ["convert", "--checkpoint", str(fixture / "checkpoint.pth"), "--taxonomy", str(wrong)]
    assert main([*argv, "--output", str(tmp_path / "out"), *TINY]) == 1
    error = capsys.readouterr().err.strip()
    assert error == (
        "hf-hierseg convert: error: The taxonomy has (10, 4) classes per level (finest first), but the checkpoint's "
        "heads have (12, 6, 3) (head [12], family_head [6], manufacturer_head [3]); use the taxonomy the model was "
        "trained with."
    )
    assert not (tmp_path / "out").exists()


def test_ema_copy_is_reported_dropped(fixtures):
    checkpoint = load_original_checkpoint(fixtures / "tiny_hcast_2level" / "checkpoint.pth")
    checkpoint["model_ema"] = {key: value.clone() for key, value in checkpoint["model"].items()}
    _, report = convert_state(
        checkpoint, None, parse_overrides(TINY[1::2]), read_taxonomy(fixtures / "tiny_hcast_2level" / "taxonomy.json")
    )
    assert report.dropped["model_ema"].startswith("EMA copy of the weights")
    assert "manufacturer_head.weight" not in report.kept and report.kept["family_head.bias"] == "classifier.1.bias"


def test_manufacturer_head_without_family_head_is_named(fixtures):
    checkpoint = load_original_checkpoint(fixtures / "tiny_hcast_3level" / "checkpoint.pth")
    del checkpoint["model"]["family_head.weight"], checkpoint["model"]["family_head.bias"]
    with pytest.raises(InvalidInputError, match="`manufacturer_head.\\*` but no `family_head.\\*`"):
        convert_state(checkpoint, None, parse_overrides(TINY[1::2]))


@pytest.mark.parametrize(
    "taxonomy, message",
    [
        ([[0, 1], [1, 0], [2, 1], [2, 0]], r"one row per finest class 0..3"),
        ([[0, 0, 0], [1, 0, 1], [2, 1, 1]], "Class 0 of level 1 has two parents"),
        ([[0, 1], [1, 1]], r"Classes \[0\] of level 1 are no class's parent"),
        ([[0, 1, 2], [1, 0]], "same number"),
        ([[0, -1], [1, 0]], "non-negative integer"),
        ({"levels": [{"num_classes": 2, "parent": [0, 0]}, {"num_classes": 1, "parent": [0]}]}, "coarsest"),
        ({"levels": [{"num_classes": 2}, {"num_classes": 1}]}, "needs `parent`"),
        ({"levels": [{"classes": ["a"], "num_classes": 2, "parent": [0, 0]}, {"num_classes": 1}]}, "num_classes"),
        (
            {"levels": [{"num_classes": 2, "parent": [0, 1]}, {"num_classes": 2}], "paths": [[0, 1], [1, 0]]},
            "`paths` disagree",
        ),
        ({"classes": ["a", "b"]}, "an object with `levels`"),
    ],
)
def test_taxonomy_mistakes_are_named(tmp_path, taxonomy, message):
    with pytest.raises(InvalidInputError, match=message):
        read_taxonomy(write_json(tmp_path / "taxonomy.json", taxonomy))


def test_taxonomy_files_that_cannot_be_read(tmp_path):
    with pytest.raises(MissingInputError, match="No taxonomy file"):
        read_taxonomy(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[[0, 1],")
    with pytest.raises(InvalidInputError, match="as JSON"):
        read_taxonomy(tmp_path / "broken.json")


# -- Hub paths ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, expected",
    [
        ("hf://twke/CAST/snapshots/abc/best_checkpoint.pth", ("twke/CAST", "snapshots/abc/best_checkpoint.pth", None)),
        ("hf://owner/repo@v1.0/ckpt.pth", ("owner/repo", "ckpt.pth", "v1.0")),
        ("hf://owner/repo@refs%2Fpr%2F3/a/b.pth", ("owner/repo", "a/b.pth", "refs/pr/3")),
    ],
)
def test_hub_paths_are_parsed(source, expected):
    assert parse_hub_path(source) == (*expected, "model")
    assert parse_hub_path(source.replace("hf://", "hf://datasets/"))[3] == "dataset"


@pytest.mark.parametrize("source", ["hf://owner/repo", "hf://ckpt.pth", "hf://owner//ckpt.pth"])
def test_malformed_hub_paths_are_named(source):
    with pytest.raises(InvalidInputError, match=r"hf://<owner>/<repo>\[@<revision>\]/<path in the repo>"):
        parse_hub_path(source)


def test_checkpoint_and_taxonomy_from_the_hub(tmp_path, fixtures, hub_server, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    fixture = fixtures / "tiny_hcast_3level"
    api = HfApi()
    api.create_repo("authors/hcast")
    api.upload_file(
        path_or_fileobj=fixture / "checkpoint.pth", path_in_repo="cub/best_checkpoint.pth", repo_id="authors/hcast"
    )
    api.upload_file(path_or_fileobj=fixture / "taxonomy.json", path_in_repo="cub/tree.json", repo_id="authors/hcast")

    overrides = parse_overrides(TINY[1::2])
    model, report = convert_checkpoint(
        "hf://authors/hcast@main/cub/best_checkpoint.pth",
        tmp_path / "out",
        None,
        overrides,
        taxonomy="hf://authors/hcast/cub/tree.json",
    )
    local, _ = convert_checkpoint(
        fixture / "checkpoint.pth", tmp_path / "local", None, overrides, taxonomy=fixture / "taxonomy.json"
    )
    for name, tensor in local.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert len(report.checks) == 1 and "matches the level heads" in report.checks[0]

    with pytest.raises(MissingInputError, match="Cannot read hf://authors/hcast/cub/missing.pth from the Hub"):
        load_original_checkpoint("hf://authors/hcast/cub/missing.pth")
    with pytest.raises(MissingInputError, match="Cannot read hf://authors/nothing/ckpt.pth"):
        load_original_checkpoint("hf://authors/nothing/ckpt.pth")
    # Offline, the file comes from the cache.
    hub_server.stop()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached = load_original_checkpoint("hf://authors/hcast/cub/best_checkpoint.pth")
    assert torch.equal(cached["model"]["family_head.weight"], local.classifier[1].weight)
    with pytest.raises(MissingInputError, match="Cannot read hf://authors/hcast/cub/missing.pth"):
        load_original_checkpoint("hf://authors/hcast/cub/missing.pth")
