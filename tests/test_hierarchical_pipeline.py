"""The `hierarchical-image-classification` pipeline on a real photo, with the package and through remote code (a
Python that cannot import `hf_hierseg`), and what a shared H-CAST folder names for it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from hf_hierseg import (
    CastForHierarchicalImageClassification,
    CastModel,
    HierarchicalImageClassificationPipeline,
)
from hf_hierseg.hub import add_remote_code, shared_files
from hf_hierseg.pipelines import whole_image_size
from hf_hierseg.segment_ops import resize_label_maps

from cast_testing import TAXONOMY_NAMES as NAMES
from cast_testing import TAXONOMY_PARENTS as PARENTS
from cast_testing import CastModelTester


# mask_padding_tokens: an image's result does not depend on its batch partners (batch_size tests).
TESTER = CastModelTester(mask_padding_tokens=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hcast")
    model = TESTER.create_model(CastForHierarchicalImageClassification, TESTER.get_hierarchical_config())
    # Push the heads apart, so that scores and the predicted path are not near ties.
    with torch.no_grad():
        for head in model.classifier:
            head.weight.mul_(40.0)
    model.save_pretrained(path)
    TESTER.get_image_processor().save_pretrained(path)
    return path


def expected_result(model, processor, image):
    """Scores, path and segment maps computed by hand from the model's outputs on the whole-image view."""
    inputs = processor(images=[image], return_tensors="pt", **whole_image_size(processor))
    with torch.no_grad():
        outputs = model(**inputs)
    maps = outputs.hierarchy_maps(inputs["superpixels"])
    size = (image.height, image.width)
    levels = []
    for level, logits in enumerate(outputs.logits_per_level):
        probabilities = logits[0].softmax(-1)
        cast_level = model.config.hierarchy_cast_levels[level]
        levels.append(
            {
                "probabilities": probabilities,
                "id": int(probabilities.argmax()),
                "segmentation": resize_label_maps(maps[cast_level - 1][0], size).numpy(),
            }
        )
    return levels


def test_labels_scores_and_segments_on_a_real_photo(folder, voc_photo):
    runner = pipeline("hierarchical-image-classification", model=str(folder))
    assert type(runner) is HierarchicalImageClassificationPipeline
    assert type(runner.model) is CastForHierarchicalImageClassification
    result = runner(voc_photo, top_k=3)
    expected = expected_result(runner.model, runner.image_processor, voc_photo)

    assert result["size"] == (375, 500)
    assert [entry["name"] for entry in result["levels"]] == ["species", "genus", "family"]
    assert [entry["cast_level"] for entry in result["levels"]] == [2, 3, 4]
    predicted = [entry["id"] for entry in result["levels"]]
    assert predicted == [level["id"] for level in expected]
    assert result["labels"] == [NAMES[level][i] for level, i in enumerate(predicted)]
    assert result["consistent"] == (
        PARENTS[0][predicted[0]] == predicted[1] and PARENTS[1][predicted[1]] == predicted[2]
    )
    for entry, want in zip(result["levels"], expected, strict=True):
        assert entry["score"] == pytest.approx(float(want["probabilities"].max()), abs=1e-6)
        assert [t["id"] for t in entry["top_k"]] == want["probabilities"].argsort(descending=True)[:3].tolist()
        assert entry["top_k"][0] == {"label": entry["label"], "id": entry["id"], "score": entry["score"]}
        # The segments the level's CLS token attended to: hierarchy level cast_level - 1, on the whole photo.
        np.testing.assert_array_equal(entry["segmentation"], want["segmentation"])
        assert [s["id"] for s in entry["segments"]] == np.unique(want["segmentation"]).tolist()
        assert sum(s["area"] for s in entry["segments"]) == 375 * 500
        for segment in entry["segments"]:
            assert segment["mask"].size == (500, 375) and segment["mask"].mode == "L"
            assert (np.asarray(segment["mask"]) > 0).sum() == segment["area"]
    # Finer levels read finer segmentations (superpixels merge level by level).
    counts = [len(entry["segments"]) for entry in result["levels"]]
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2]


def parents_through(species, genus, family):
    """Parents putting `species` under `genus` and `genus` under `family`; every genus and family keeps a child."""
    species_parents = [0] * 6
    for index, child in enumerate(i for i in range(6) if i != species):
        species_parents[child] = index % 3
    species_parents[species] = genus
    genus_parents = [1 - family] * 3
    genus_parents[genus] = family
    return tuple(species_parents), tuple(genus_parents)


def test_the_consistency_flag_follows_the_taxonomy(folder, voc_photo):
    runner = pipeline("hierarchical-image-classification", model=str(folder))
    species, genus, family = (entry["id"] for entry in runner(voc_photo)["levels"])
    for parents, consistent in (
        (parents_through(species, genus, family), True),
        (parents_through(species, (genus + 1) % 3, family), False),  # the predicted species under another genus
        (parents_through(species, genus, 1 - family), False),  # the predicted genus under the other family
    ):
        model = CastForHierarchicalImageClassification.from_pretrained(
            folder, config=TESTER.get_hierarchical_config(hierarchy_parents=parents)
        ).eval()
        result = HierarchicalImageClassificationPipeline(model=model, image_processor=TESTER.get_image_processor())(
            voc_photo
        )
        assert [entry["id"] for entry in result["levels"]] == [species, genus, family]  # parents change no logit
        assert result["consistent"] is consistent, parents


def test_lists_and_batches_give_the_same_results(folder, voc_photo, tmp_path):
    runner = pipeline("hierarchical-image-classification", model=str(folder))
    other = voc_photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((200, 150))
    path = tmp_path / "voc.png"
    voc_photo.save(path)
    single = [runner(str(path)), runner(other)]
    batched = runner([str(path), other], batch_size=2)
    for one, batch in zip(single, batched, strict=True):
        assert one["labels"] == batch["labels"] and one["size"] == batch["size"]
        for a, b in zip(one["levels"], batch["levels"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            np.testing.assert_array_equal(a["segmentation"], b["segmentation"])


def test_mistakes_are_named(folder, voc_photo, tmp_path):
    runner = pipeline("hierarchical-image-classification", model=str(folder))
    with pytest.raises(ValueError, match="`top_k` must be a positive integer"):
        runner(voc_photo, top_k=0)
    with pytest.raises(ValueError, match=r"Unknown arguments for hierarchical-image-classification: \['levels'\]"):
        runner(voc_photo, levels=2)
    backbone = TESTER.create_model(CastModel)
    with pytest.raises(ValueError, match="needs a hierarchical classifier"):
        HierarchicalImageClassificationPipeline(model=backbone, image_processor=TESTER.get_image_processor())


def test_shared_folder_names_the_hierarchical_class_and_pipeline(folder):
    config = json.loads(shared_files(folder)["config.json"])
    assert config["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_cast.CastForHierarchicalImageClassification"
    )
    assert config["auto_map"]["AutoModel"] == "modeling_cast.CastModel"
    entry = config["custom_pipelines"]["hierarchical-image-classification"]
    assert entry == {
        "impl": "pipelines.HierarchicalImageClassificationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "type": "image",
    }
    assert {"hierarchical-segmentation", "image-segmentation"} <= set(config["custom_pipelines"])
    assert "custom_pipelines" not in json.loads((folder / "config.json").read_text())  # the folder stays plain


# Runs in `python -I` with `hf_hierseg` blocked: the pipeline and the model from the shared folder's code.
CHILD = r"""
import importlib.abc, json, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_hierseg" or name.startswith("hf_hierseg."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, BlockPackage())
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, pipeline

spec = json.loads(sys.argv[1])
runner = pipeline("hierarchical-image-classification", model=spec["shared"], trust_remote_code=True)
result = runner(spec["image"], top_k=2)
plain = AutoModelForImageClassification.from_pretrained(spec["plain"], trust_remote_code=True).eval()
report = {
    "pipeline": type(runner).__module__ + "." + type(runner).__name__,
    "model": type(runner.model).__module__ + "." + type(runner.model).__name__,
    "plain_model": type(plain).__module__ + "." + type(plain).__name__,
    "labels": result["labels"],
    "consistent": result["consistent"],
    "scores": [entry["score"] for entry in result["levels"]],
    "top_k": [entry["top_k"] for entry in result["levels"]],
}
tensors = {f"level{entry['level']}": torch.from_numpy(entry["segmentation"]) for entry in result["levels"]}
save_file(tensors, spec["output"])
print(json.dumps(report))
"""


@pytest.mark.slow
def test_pipeline_through_remote_code_without_the_package(folder, voc_photo, tmp_path):
    import shutil

    shared = tmp_path / "shared"
    shutil.copytree(folder, shared)
    add_remote_code(shared)
    image = tmp_path / "voc.png"
    voc_photo.save(image)
    spec = {"shared": str(shared), "plain": str(folder), "image": str(image), "output": str(tmp_path / "out.st")}
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,  # a prompt would fail instead of waiting
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    for key in ("pipeline", "model", "plain_model"):
        assert report[key].startswith("transformers_modules."), key
    assert report["pipeline"].endswith(".pipelines.HierarchicalImageClassificationPipeline")
    assert report["model"].endswith(".modeling_cast.CastForHierarchicalImageClassification")
    assert report["plain_model"].endswith(".modeling_cast.CastForHierarchicalImageClassification")

    expected = pipeline("hierarchical-image-classification", model=str(folder))(str(image), top_k=2)
    assert report["labels"] == expected["labels"] and report["consistent"] == expected["consistent"]
    assert report["scores"] == pytest.approx([entry["score"] for entry in expected["levels"]], abs=1e-6)
    assert [[t["id"] for t in top] for top in report["top_k"]] == [
        [t["id"] for t in entry["top_k"]] for entry in expected["levels"]
    ]
    maps = load_file(tmp_path / "out.st")
    for entry in expected["levels"]:
        np.testing.assert_array_equal(maps[f"level{entry['level']}"].numpy(), entry["segmentation"])
