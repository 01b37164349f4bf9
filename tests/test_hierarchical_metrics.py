"""Hierarchical classification metrics against values computed by hand, the offline `evaluate` module, and the
evaluation command on a small labelled dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_hierseg import CastForHierarchicalImageClassification, CastImageProcessor
from hf_hierseg.cli import main
from hf_hierseg.errors import InvalidInputError
from hf_hierseg.evaluation import hierarchical_accuracy, metric_path
from hf_hierseg.evaluation.hierarchical_eval import evaluate_hierarchical, level_labels

from cast_testing import CONFIG_DEFAULT, CastModelTester


REPO_ROOT = Path(__file__).resolve().parents[1]

# Taxonomy rows [fine, coarse]: 0 -> 1, 1 -> 0, 2 -> 2, 3 -> 2.
PATHS = [[0, 1], [1, 0], [2, 2], [3, 2]]
# sample 0: (0, 1) right at both levels, a path;
# sample 1: (1, 1) fine right, coarse wrong (true 0), not a path (1's parent is 0);
# sample 2: (2, 2) right, a path;
# sample 3: (3, 0) both wrong (true (2, 2)), not a path.
PREDICTIONS = [[0, 1], [1, 1], [2, 2], [3, 0]]
REFERENCES = [[0, 1], [1, 0], [2, 2], [2, 2]]


def test_hierarchical_accuracy_by_hand():
    result = hierarchical_accuracy(np.array(PREDICTIONS), np.array(REFERENCES), PATHS)
    assert result["top1_accuracy_per_level"] == [3 / 4, 2 / 4]
    assert result["full_path_accuracy"] == 2 / 4  # samples 0 and 2
    assert result["tree_consistency"] == 2 / 4 and result["tice"] == 2 / 4  # samples 0 and 2 are paths
    assert result["num_samples"] == 4


def test_consistent_but_wrong_and_three_levels():
    # Three levels, 0 -> 0 -> 0, 1 -> 1 -> 0, 2 -> 2 -> 1. Sample 0 predicts the path of 1 for a 0: consistent,
    # wrong at levels 0 and 1, right at level 2. Sample 1 is right everywhere. Sample 2 mixes two paths.
    paths = [[0, 0, 0], [1, 1, 0], [2, 2, 1]]
    predictions = torch.tensor([[1, 1, 0], [2, 2, 1], [2, 1, 0]])
    references = torch.tensor([[0, 0, 0], [2, 2, 1], [2, 2, 1]])
    result = hierarchical_accuracy(predictions, references, paths)
    assert result["top1_accuracy_per_level"] == [2 / 3, 1 / 3, 2 / 3]
    assert result["full_path_accuracy"] == 1 / 3
    assert result["tree_consistency"] == 2 / 3 and result["tice"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "predictions, references, paths, error, message",
    [
        ([[0, 1]], [[0, 1], [1, 0]], PATHS, ValueError, "one shape"),
        ([0, 1], [0, 1], PATHS, ValueError, r"\[num_samples, num_levels\]"),
        ([[0.5, 1]], [[0, 1]], PATHS, TypeError, "integer class ids"),
        ([[0, 1]], [[0, 1]], [[0, 1, 2]], ValueError, "rows of 2 class ids"),
        ([[0, 1]], [[0, 1]], [], ValueError, "rows of 2 class ids"),
    ],
)
def test_bad_inputs_are_named(predictions, references, paths, error, message):
    with pytest.raises(error, match=message):
        hierarchical_accuracy(np.array(predictions), np.array(references), paths)


def test_level_labels_from_columns_or_the_taxonomy():
    assert level_labels({"label": 3}, PATHS) == [3, 2]
    assert level_labels({"fine": 1, "coarse": 0}, PATHS, label_columns=["fine", "coarse"]) == [1, 0]
    with pytest.raises(InvalidInputError, match="not a finest class"):
        level_labels({"label": 7}, PATHS)
    with pytest.raises(InvalidInputError, match="one label column per taxonomy level"):
        level_labels({"fine": 1}, PATHS, label_columns=["fine"])
    with pytest.raises(InvalidInputError, match=r"no label column\(s\) \['coarse'\]"):
        level_labels({"fine": 1}, PATHS, label_columns=["fine", "coarse"])


_EVALUATE_SCRIPT = """
import json, evaluate
from hf_hierseg.evaluation import metric_path
metric = evaluate.load(metric_path("hierarchical_accuracy"))
metric.add_batch(predictions=[[0, 1], [1, 1]], references=[[0, 1], [1, 0]])
metric.add_batch(predictions=[[2, 2], [3, 0]], references=[[2, 2], [2, 2]])
print(json.dumps(metric.compute(paths=[[0, 1], [1, 0], [2, 2], [3, 2]])))
"""


@pytest.mark.slow
def test_evaluate_module_offline(tmp_path):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    completed = subprocess.run(
        [sys.executable, "-c", _EVALUATE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["top1_accuracy_per_level"] == [3 / 4, 2 / 4]
    assert result["full_path_accuracy"] == 0.5 and result["tree_consistency"] == 0.5 and result["num_samples"] == 4
    assert metric_path("hierarchical_accuracy").endswith("hierarchical_accuracy.py")


# -- the evaluation ----------------------------------------------------------------------------------------------


TESTER = CastModelTester()


def tiny_hcast():
    """A 4 -> 3 H-CAST (shapes -> families)."""
    taxonomy = dict(hierarchy_num_labels=(4, 3), hierarchy_parents=((1, 0, 2, 2),))
    config = TESTER.get_config(num_labels=CONFIG_DEFAULT, hierarchy_level_names=("shape", "family"), **taxonomy)
    return TESTER.create_model(CastForHierarchicalImageClassification, config)


def tiny_dataset(folder, count=6):
    """An imagefolder with a `metadata.jsonl` holding a finest label and a coarse label column (the taxonomy's
    coarse class, except for image 0, whose coarse column names another class)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        picture = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((72, 72), Image.BICUBIC)
        picture.save(folder / f"{index}.png")
        fine = index % 4
        coarse = PATHS[fine][1] if index else (PATHS[fine][1] + 1) % 3
        rows.append({"file_name": f"{index}.png", "fine": fine, "coarse": coarse})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_evaluation_matches_the_metric_on_the_models_predictions(tmp_path, capsys):
    model = tiny_hcast()
    model.save_pretrained(tmp_path / "model")
    processor = CastImageProcessor(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64})
    processor.save_pretrained(tmp_path / "model")
    rows = tiny_dataset(tmp_path / "data" / "test")
    paths = [list(path) for path in model.config.hierarchy_paths()]
    assert paths == [[0, 1], [1, 0], [2, 2], [3, 2]]

    # By hand: the argmax of each level on the same processed images.
    from hf_hierseg.evaluation.classification_eval import classification_processor

    view = classification_processor(64, 0.875, tmp_path / "model")
    images = [Image.open(tmp_path / "data" / "test" / row["file_name"]).convert("RGB") for row in rows]
    with torch.no_grad():
        outputs = model(**view(images=images, return_tensors="pt"))
    predictions = np.stack([logits.argmax(-1).numpy() for logits in outputs.logits_per_level], axis=1)
    expected = hierarchical_accuracy(predictions, np.array([paths[row["fine"]] for row in rows]), paths)
    examples = [{"image": image, "label": row["fine"]} for image, row in zip(images, rows)]
    assert evaluate_hierarchical(model, examples, view, paths, batch_size=4) == expected

    output_json = tmp_path / "scores.json"
    argv = ["evaluate", "hierarchical", "--model_name_or_path", str(tmp_path / "model")]
    argv += ["--dataset_name", str(tmp_path / "data"), "--split", "test", "--label_column", "fine"]
    assert main([*argv, "--output_json", str(output_json)]) == 0
    table = capsys.readouterr().out
    assert "| model | images | top-1 shape | top-1 family | full path | consistency | TICE |" in table
    saved = json.loads(output_json.read_text())
    assert saved["results"]["full_path_accuracy"] == pytest.approx(expected["full_path_accuracy"])
    assert saved["results"]["tree_consistency"] == pytest.approx(expected["tree_consistency"])
    assert saved["results"]["level_names"] == ["shape", "family"]

    # Labels from two columns: the references are the columns (image 0's coarse label is not its taxonomy parent).
    assert main([*argv[:-2], "--label_columns", "fine", "coarse", "--output_json", str(output_json)]) == 0
    references = np.array([[row["fine"], row["coarse"]] for row in rows])
    by_columns = json.loads(output_json.read_text())["results"]
    assert by_columns["top1_accuracy_per_level"] == pytest.approx(
        hierarchical_accuracy(predictions, references, paths)["top1_accuracy_per_level"]
    )


def test_evaluation_of_a_model_without_taxonomy_is_named(tmp_path, capsys):
    from hf_hierseg import CastForImageClassification

    TESTER.create_model(CastForImageClassification, num_labels=CONFIG_DEFAULT).save_pretrained(tmp_path / "flat")
    tiny_dataset(tmp_path / "data" / "test", count=2)
    argv = ["evaluate", "hierarchical", "--model_name_or_path", str(tmp_path / "flat")]
    assert main([*argv, "--dataset_name", str(tmp_path / "data"), "--label_column", "fine"]) == 1
    assert "is not a hierarchical classifier" in capsys.readouterr().err
