"""Model cards and Hub publishing (`hf_hierseg.hub`), round trips against the local Hub of `hub_server.py`."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModel, ViTConfig, ViTModel, pipeline

from hf_hierseg import CastForImageClassification, CastForSemanticSegmentation, CastModel
from hf_hierseg.hub import (
    CITATION,
    DEFAULT_TAGS,
    add_remote_code,
    push_folder_to_hub,
    remote_code_files,
    strip_remote_code,
    write_model_card,
)
from hf_hierseg.image_processing_cast import CastImageProcessor

from cast_testing import CastModelTester


# huggingface_hub's own LFS upload passes `data=` to httpx; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    )
    return ViTModel(config).eval()


# Inputs: normalised-looking images and a grid of 10 px superpixels, 7 x 7 = 49 (labels 0..48).
TESTER = CastModelTester(superpixel_cell=10)


def assert_same_weights(expected, actual):
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(tensor, actual_state[name]), name


def go_offline(hub_server, monkeypatch):
    """Stop the server and switch huggingface_hub to offline mode: only the cache can answer now."""
    hub_server.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# -- model card ------------------------------------------------------------------------------------------


def test_model_card_metadata_and_sections(tmp_path):
    TESTER.create_model(CastForImageClassification).save_pretrained(tmp_path)
    readme = write_model_card(
        tmp_path,
        repo_id="someone/cast-tiny-deit",
        base_model="someone/cast-tiny-moco",
        datasets=["ILSVRC/imagenet-1k"],
        tags=["deit"],
        objective="DeiT supervised classification",
        training_summary={"steps": 12, "learning rate": 5e-4},
        metrics={"top-1 accuracy": 0.4567},
        extra={"Limitations": "Random weights, for tests."},
    )
    assert readme == tmp_path / "README.md"
    card = ModelCard.load(readme)
    assert card.data.license == "mit"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"  # from the architecture in config.json
    assert card.data.tags == [*DEFAULT_TAGS, "deit"]
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]
    assert card.data.base_model == "someone/cast-tiny-moco"
    text = card.text
    assert 'repo_id = "someone/cast-tiny-deit"' in text
    assert "AutoModel.from_pretrained(repo_id, trust_remote_code=True)" in text
    assert "AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)" in text
    assert "AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)" in text
    assert "| top-1 accuracy | 0.4567 |" in text
    assert "- **steps**: 12" in text and "Objective: DeiT supervised classification." in text
    assert "- **Classes**: 3" in text and "- **Blocks per level**: [1, 1, 1, 1]" in text
    assert "## Limitations\n\nRandom weights, for tests." in text
    assert CITATION in text and "Ke, Tsung-Wei and Mo, Sangwoo and Yu, Stella X." in CITATION


def test_model_card_snippet_runs_on_the_model(tmp_path):
    """The usage snippet's hierarchy painting works on a real CastModel output."""
    model = TESTER.create_model(CastModel)
    model.save_pretrained(tmp_path)
    text = write_model_card(tmp_path, repo_id="someone/cast-tiny").read_text()
    assert "pipeline_tag: image-feature-extraction" in text
    start = text.index("for level, segment_map in")
    snippet = text[start : text.index("```", start)]
    pixel_values, superpixels = TESTER.prepare_inputs(batch_size=1).values()
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, superpixels=superpixels)
    printed = []
    exec(
        snippet, {"torch": torch, "outputs": outputs, "inputs": {"superpixels": superpixels}, "print": printed.append}
    )
    counts = [int(line.split(": ")[1].split()[0]) for line in printed]
    assert len(counts) == 5  # levels 0 (superpixels) to 4
    assert counts == sorted(counts, reverse=True) and counts[0] <= 49 and counts[-1] <= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(repo_id="a/b/c"), "repo_id"),
        (dict(repo_id=""), "repo_id"),
        (dict(base_model="not a repo id"), "base_model"),
        (dict(datasets=["ok/name", "bad--name"]), "datasets"),
        (dict(pipeline_tag="hierarchical-segmentation"), "pipeline_tag"),
        (dict(metrics=[0.5]), "metrics"),
        (dict(tags=[1, 2]), "tags"),
    ],
)
def test_model_card_rejects_bad_input(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        write_model_card(tmp_path, **{"repo_id": "someone/model", **kwargs})
    assert not (tmp_path / "README.md").exists()


def test_model_card_needs_a_folder(tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        write_model_card(tmp_path / "missing", repo_id="someone/model")


@pytest.mark.parametrize(
    "repo_id, commit_message, message",
    [("a/b/c", "Add model", "repo_id"), ("someone/model", "  ", "commit_message")],
)
def test_push_rejects_bad_input(tmp_path, repo_id, commit_message, message):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=message):
        push_folder_to_hub(tmp_path, repo_id, commit_message)


def test_push_needs_a_non_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        push_folder_to_hub(tmp_path / "missing", "someone/model", "Add model")
    with pytest.raises(ValueError, match="folder"):
        push_folder_to_hub(tmp_path, "someone/model", "Add model")


# -- round trips through the local Hub -----------------------------------------------------------------------


def test_push_folder_round_trip(hub_server, tmp_path, monkeypatch):
    model = tiny_vit()
    folder = tmp_path / "tiny-vit"
    model.save_pretrained(folder)
    write_model_card(folder, repo_id="test-user/tiny-vit", objective="none (random weights)")
    (folder / "checkpoint-3").mkdir()  # a training state: must stay local
    (folder / "checkpoint-3" / "optimizer.bin").write_bytes(b"state")

    commit = push_folder_to_hub(folder, "tiny-vit", "Add tiny ViT")  # namespace from the token's user
    assert commit.repo_url.repo_id == "test-user/tiny-vit"
    published = hub_server.files("test-user/tiny-vit")
    local = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    assert {name: published[name] for name in local} == local
    assert not any(name.startswith("checkpoint-") for name in published)
    weights_oid = hashlib.sha256(local["model.safetensors"]).hexdigest()
    assert ("PUT", f"/__lfs__/{weights_oid}") in hub_server.hub.requests  # git-LFS upload, as on the Hub

    snapshot = snapshot_download("test-user/tiny-vit", cache_dir=tmp_path / "fresh_cache")
    assert commit.oid in snapshot
    assert snapshot.startswith(str(tmp_path / "fresh_cache"))
    for name, content in local.items():
        assert (Path(snapshot) / name).read_bytes() == content
    card = ModelCard.load("test-user/tiny-vit")
    assert card.data.pipeline_tag == "image-feature-extraction" and "cast" in card.data.tags

    loaded = ViTModel.from_pretrained("test-user/tiny-vit")
    assert_same_weights(model, loaded)

    requests_before = len(hub_server.hub.requests)
    go_offline(hub_server, monkeypatch)
    offline = ViTModel.from_pretrained("test-user/tiny-vit")
    assert_same_weights(model, offline)
    assert len(hub_server.hub.requests) == requests_before


def test_second_push_makes_a_new_commit(hub_server, tmp_path):
    folder = tmp_path / "model"
    tiny_vit().save_pretrained(folder)
    first = push_folder_to_hub(folder, "test-user/updated", "v1")
    (folder / "notes.txt").write_text("second version")
    second = push_folder_to_hub(folder, "test-user/updated", "v2")
    assert second.oid != first.oid
    assert HfApi().model_info("test-user/updated").sha == second.oid
    assert hub_server.files("test-user/updated", revision=first.oid).keys() == (
        hub_server.files("test-user/updated").keys() - {"notes.txt"}
    )
    lfs_uploads = [request for request in hub_server.hub.requests if request[0] == "PUT"]
    assert len(lfs_uploads) == 1  # unchanged weights are not uploaded again


def test_private_repo_needs_the_token(hub_server, tmp_path):
    tiny_vit().save_pretrained(tmp_path)
    push_folder_to_hub(tmp_path, "test-user/private-vit", "Add model", private=True)
    assert HfApi().model_info("test-user/private-vit").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("test-user/private-vit")


def test_local_hub_rejects_invalid_card_metadata(hub_server, tmp_path):
    """The local Hub validates README metadata like the real one, so card bugs show up in tests."""
    (tmp_path / "README.md").write_text("---\npipeline_tag: hierarchical-segmentation\n---\n# card\n")
    with pytest.raises(ValueError, match="pipeline_tag"):
        push_folder_to_hub(tmp_path, "test-user/bad-card", "Add card")


def test_transformers_push_to_hub(hub_server, tmp_path, monkeypatch):
    model = tiny_vit()
    model.push_to_hub("tiny-vit-direct", commit_message="Upload from push_to_hub")
    assert {"config.json", "model.safetensors", "README.md"} <= hub_server.files("test-user/tiny-vit-direct").keys()
    assert_same_weights(model, ViTModel.from_pretrained("test-user/tiny-vit-direct"))
    go_offline(hub_server, monkeypatch)
    assert_same_weights(model, ViTModel.from_pretrained("test-user/tiny-vit-direct"))


def test_cast_round_trip(hub_server, tmp_path, monkeypatch):
    model = TESTER.create_model(CastModel)
    folder = tmp_path / "cast-tiny"
    model.save_pretrained(folder)
    write_model_card(folder, repo_id="test-user/cast-tiny", objective="none (random weights)")
    push_folder_to_hub(folder, "test-user/cast-tiny", "Add tiny CAST")
    pixel_values, superpixels = TESTER.prepare_inputs().values()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, superpixels=superpixels)

    def check(loaded):
        assert isinstance(loaded, CastModel)
        assert_same_weights(model, loaded)
        with torch.no_grad():
            actual = loaded.eval()(pixel_values=pixel_values, superpixels=superpixels)
        assert torch.equal(actual.pooler_output, expected.pooler_output)
        for level_expected, level_actual in zip(expected.hierarchy, actual.hierarchy, strict=True):
            assert torch.equal(level_expected, level_actual)

    check(AutoModel.from_pretrained("test-user/cast-tiny"))
    go_offline(hub_server, monkeypatch)
    check(AutoModel.from_pretrained("test-user/cast-tiny"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_subprocess_uses_the_local_hub(hub_server, tmp_path):
    """The fixture's environment reaches child processes (remote-code tests load models in a fresh interpreter)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 24}))  # pushed as it is
    commit = push_folder_to_hub(tmp_path, "test-user/for-subprocess", "Add config")
    code = (
        "import json, huggingface_hub as hub\n"
        "path = hub.hf_hub_download('test-user/for-subprocess', 'config.json')\n"
        "print(json.dumps([path, json.load(open(path))]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path, config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config == {"model_type": "vit", "hidden_size": 24}
    assert path.startswith(str(tmp_path / "hf_hub_cache")) and commit.oid in path


# -- remote code of shared folders ---------------------------------------------------------------------------


def folder_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_push_shares_a_cast_folder_self_contained_and_leaves_it_plain(hub_server, tmp_path):
    model = TESTER.create_model(CastForSemanticSegmentation)
    folder = tmp_path / "cast-seg"
    model.save_pretrained(folder)
    TESTER.get_image_processor(do_center_crop=False).save_pretrained(folder)
    before = folder_bytes(folder)
    push_folder_to_hub(folder, "test-user/cast-seg", "Add tiny CAST segmenter")
    assert folder_bytes(folder) == before  # the local folder stays as saved

    published = hub_server.files("test-user/cast-seg")
    code = {path.name: path.read_bytes() for path in remote_code_files()}
    assert {name: published[name] for name in published if name.endswith(".py")} == code
    for name, content in before.items():
        if name not in ("config.json", "preprocessor_config.json"):
            assert published[name] == content, name
    config = json.loads(published["config.json"])
    saved = json.loads(before["config.json"])
    assert {key: value for key, value in config.items() if key not in ("auto_map", "custom_pipelines")} == {
        key: value for key, value in saved.items() if key != "auto_map"
    }
    assert config["auto_map"]["AutoModel"] == "modeling_cast.CastModel"
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_cast.CastForSemanticSegmentation"
    assert config["custom_pipelines"]["image-segmentation"]["pt"] == ["AutoModelForSemanticSegmentation"]
    processor = json.loads(published["preprocessor_config.json"])
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_cast.CastImageProcessor"}

    # The documented trade-off: a shared repo's custom_pipelines make transformers ask for trust_remote_code.
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("hierarchical-segmentation", model="test-user/cast-seg")


def test_add_and_strip_remote_code(tmp_path):
    folder = tmp_path / "cast"
    TESTER.create_model(CastModel).save_pretrained(folder)
    CastImageProcessor().save_pretrained(folder)
    weights = (folder / "model.safetensors").read_bytes()
    add_remote_code(folder)
    assert {path.name for path in folder.glob("*.py")} == {path.name for path in remote_code_files()}
    assert "custom_pipelines" in json.loads((folder / "config.json").read_text())

    deleted = strip_remote_code(folder)
    assert set(deleted) == {path.name for path in remote_code_files()}
    assert not list(folder.glob("*.py"))
    for name in ("config.json", "preprocessor_config.json"):
        values = json.loads((folder / name).read_text())
        assert "auto_map" not in values and "custom_pipelines" not in values, name
    assert (folder / "model.safetensors").read_bytes() == weights
    loaded, info = CastModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    assert isinstance(CastImageProcessor.from_pretrained(folder), CastImageProcessor)

    with pytest.raises(ValueError, match="CAST"):
        add_remote_code(tmp_path)  # no config.json
    tiny_vit().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="CAST"):
        add_remote_code(tmp_path / "vit")
    with pytest.raises(ValueError, match="config.json"):
        strip_remote_code(tmp_path / "missing")
