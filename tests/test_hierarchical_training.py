"""H-CAST training on the shared assembly: labels per level (columns or derived through the taxonomy), Mixup / CutMix
with one lambda for all levels, the objective's loss, evaluation, runs from scratch and from a CAST classifier,
resume, and named mistakes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_hierseg import CastForHierarchicalImageClassification, CastForImageClassification
from hf_hierseg.cli import main
from hf_hierseg.errors import InvalidInputError
from hf_hierseg.evaluation.synthetic import write_synthetic_dataset
from hf_hierseg.modeling_cast import hierarchy_targets
from hf_hierseg.training.hierarchical import (
    HierarchicalArguments,
    HierarchicalObjective,
    HierarchyBatches,
    HierarchyLabels,
    hierarchical_parser,
    train_hierarchical,
)
from hf_hierseg.training.loop import read_metrics
from hf_hierseg.training.supervised import mixup_cutmix

from cast_testing import CONFIG_DEFAULT, CastModelTester


# The synthetic shapes (house, mushroom, snowman, arrow, dumbbell, hammer) in three families.
FAMILY_OF_SHAPE = (1, 0, 0, 1, 2, 2)
TAXONOMY = {
    "levels": [
        {"name": "shape", "num_classes": 6, "parent": list(FAMILY_OF_SHAPE)},
        {"name": "family", "classes": ["rounded", "pointed", "bar"], "parent": None},
    ]
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models; fixtures made with one thread


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    data = write_synthetic_dataset(folder / "data", num_images=24, num_test_images=8, image_size=32, format="parquet")
    taxonomy = folder / "taxonomy.json"
    taxonomy.write_text(json.dumps(TAXONOMY))
    return data, taxonomy


TESTER = CastModelTester(image_size=32)
TINY = TESTER.config_overrides()


def tiny_model(**kwargs):
    """A 6 -> 3 H-CAST (shapes -> families) in training mode."""
    taxonomy = dict(hierarchy_num_labels=(6, 3), hierarchy_parents=(FAMILY_OF_SHAPE,), hierarchy_label_smoothing=0.1)
    config = TESTER.get_config(num_labels=CONFIG_DEFAULT, **taxonomy, **kwargs)
    return TESTER.create_model(CastForHierarchicalImageClassification, config, train=True)


def run_arguments(data, taxonomy, output_dir, *extra):
    return [
        "--dataset_name",
        str(data),
        "--taxonomy",
        str(taxonomy),
        "--config_name",
        "cast-small",
        "--config_overrides",
        *TINY,
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--max_train_steps",
        "3",
        "--logging_steps",
        "1",
        "--report_to",
        "jsonl",
        *extra,
    ]


# -- labels per level --------------------------------------------------------------------------------------------


class Identity:
    def __call__(self, image, rng):
        return {"pixel_values": torch.zeros(3, 8, 8), "superpixels": torch.zeros(8, 8, dtype=torch.long)}


def test_labels_from_the_finest_label_or_from_columns(shapes):
    import datasets

    records = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (8, 8))] * 3,
            "label": [0, 4, 2],
            "fine": [0, 4, 2],
            "coarse": [2, 2, 0],  # the first disagrees with the taxonomy (house is pointed, 1)
        }
    ).cast_column("image", datasets.Image())
    paths = tuple((shape, family) for shape, family in enumerate(FAMILY_OF_SHAPE))
    derived = HierarchyBatches(records, Identity(), 3, "image", "label", paths=paths, shuffle=False)
    batch = next(iter(derived))
    assert batch["labels"].tolist() == [[0, 1], [4, 2], [2, 0]]  # coarse from the taxonomy
    columns = HierarchyBatches(
        records, Identity(), 3, "image", "fine", paths=paths, label_columns=("fine", "coarse"), shuffle=False
    )
    assert next(iter(columns))["labels"].tolist() == [[0, 2], [4, 2], [2, 0]]  # as the columns say
    targets = HierarchyLabels(paths, column_names=("fine",))
    with pytest.raises(InvalidInputError, match="one column per taxonomy level"):
        targets.column(records, "image")
    with pytest.raises(InvalidInputError, match=r"no column\(s\) \['order'\]"):
        HierarchyLabels(paths, column_names=("fine", "order")).column(records, "image")


# -- the objective -----------------------------------------------------------------------------------------------


class SingleProcess:
    process_index = 0


def test_mixup_shares_one_lambda_across_levels():
    model = tiny_model().eval()
    objective = HierarchicalObjective(model, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, seed=3)
    generator = torch.Generator().manual_seed(0)
    superpixels = torch.arange(16).reshape(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
    batch = {
        "pixel_values": torch.randn(4, 3, 32, 32, generator=generator),
        "superpixels": superpixels.expand(4, -1, -1),
        "labels": torch.tensor([[0, 1], [1, 0], [4, 2], [5, 2]]),
    }
    for step in range(3):
        loss, metrics = objective.compute_loss(model, batch, step, 0, SingleProcess())
        # The same draws by hand: the images mixed once, both levels' smoothed targets mixed with its lambda.
        rng = np.random.default_rng([3, step, 0, 0])
        mixed, finest, lam, _ = mixup_cutmix(batch["pixel_values"], batch["labels"][:, 0], 6, rng, 0.8, 1.0)
        assert metrics["mix_lambda"] == lam
        shape_targets, family_targets = hierarchy_targets(batch["labels"], (6, 3), 0.1)
        torch.testing.assert_close(lam * shape_targets + (1 - lam) * shape_targets.flip(0), finest)
        mixed_targets = torch.cat(
            [
                lam * shape_targets + (1 - lam) * shape_targets.flip(0),
                lam * family_targets + (1 - lam) * family_targets.flip(0),
            ],
            dim=1,
        )
        with torch.no_grad():
            expected = model(pixel_values=mixed, superpixels=batch["superpixels"], labels=mixed_targets).loss
        torch.testing.assert_close(loss.detach(), expected)


def test_without_mixing_the_model_smooths_integer_labels():
    model = tiny_model().eval()
    objective = HierarchicalObjective(model, label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0)
    superpixels = torch.arange(16).reshape(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1).expand(2, -1, -1)
    batch = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "superpixels": superpixels,
        "labels": torch.tensor([[0, 1], [4, 2]]),
    }
    loss, metrics = objective.compute_loss(model, batch, 0, 0, SingleProcess())
    with torch.no_grad():
        outputs = model(**batch)
    torch.testing.assert_close(loss.detach(), outputs.loss)
    shape_right = (outputs.logits_per_level[0].argmax(-1) == batch["labels"][:, 0]).float()
    family_right = (outputs.logits_per_level[1].argmax(-1) == batch["labels"][:, 1]).float()
    assert metrics["train_accuracy_level0"] == shape_right.mean().item()
    assert metrics["train_full_path_accuracy"] == (shape_right * family_right).mean().item()
    assert objective.card_details()["taxonomy"] == "rank0 (6) -> rank1 (3)"


# -- runs --------------------------------------------------------------------------------------------------------


def test_run_from_scratch_saves_an_h_cast_model_with_its_taxonomy(shapes, tmp_path, capsys):
    data, taxonomy = shapes
    output = tmp_path / "hcast"
    assert main(["train-hierarchical", *run_arguments(data, taxonomy, output)]) == 0
    model = CastForHierarchicalImageClassification.from_pretrained(output)
    config = model.config
    assert config.hierarchy_level_names == ("shape", "family") and config.hierarchy_parents == (FAMILY_OF_SHAPE,)
    # The taxonomy file names no shapes: the dataset's ClassLabel does.
    assert config.hierarchy_id2label[0][5] == "hammer" and config.hierarchy_id2label[1][2] == "bar"
    assert config.hierarchy_label_smoothing == 0.1 and config.tree_path_kl_weight == 0.5
    assert config.hierarchy_cast_levels == (3, 4)
    results = json.loads((output / "all_results.json").read_text())
    for key in ("eval_accuracy_shape", "eval_accuracy_family", "eval_full_path_accuracy", "eval_tree_consistency"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["eval_samples"] == 8 and results["train_steps"] == 3
    assert results["eval_full_path_accuracy"] <= min(results["eval_accuracy_shape"], results["eval_accuracy_family"])
    lines = read_metrics(output / "metrics.jsonl")
    assert all("mix_lambda" in line for line in lines if "loss" in line)
    card = (output / "README.md").read_text()
    assert "taxonomy**: shape (6) -> family (3)" in card and "pipeline_tag: image-classification" in card


def test_flat_baseline_and_columns_from_the_command_line(shapes, tmp_path):
    data, taxonomy = shapes
    output = tmp_path / "flat"
    extra = ["--hierarchy_cast_levels", "4", "4", "--mixup", "0", "--cutmix", "0", "--tree_path_kl_weight", "0"]
    assert main(["train-hierarchical", *run_arguments(data, taxonomy, output, *extra)]) == 0
    config = CastForHierarchicalImageClassification.from_pretrained(output).config
    assert config.hierarchy_cast_levels == (4, 4) and config.tree_path_kl_weight == 0.0
    lines = [line for line in read_metrics(output / "metrics.jsonl") if "loss" in line]
    assert lines and all("train_full_path_accuracy" in line for line in lines)


def test_starts_from_a_cast_classifier_with_new_level_heads(shapes, tmp_path):
    data, taxonomy = shapes
    classifier = TESTER.create_model(CastForImageClassification, train=True, num_labels=10)
    classifier.save_pretrained(tmp_path / "classifier")
    parser_args = run_arguments(data, taxonomy, tmp_path / "out", "--learning_rate", "0")
    start = parser_args.index("--config_name")
    parser_args[start : start + 2 + 1 + len(TINY)] = ["--model_name_or_path", str(tmp_path / "classifier")]
    train_hierarchical(*hierarchical_parser().parse_args_into_dataclasses(args=parser_args))
    trained = CastForHierarchicalImageClassification.from_pretrained(tmp_path / "out")
    # Learning rate 0: the backbone is the classifier's, the level heads are new (6 and 3 classes).
    for name, tensor in classifier.cast.state_dict().items():
        if "running_" not in name and "num_batches_tracked" not in name:  # BatchNorm statistics move in training
            torch.testing.assert_close(trained.cast.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert [head.out_features for head in trained.classifier] == [6, 3]


def test_mistakes_are_named(shapes, tmp_path):
    data, taxonomy = shapes
    no_taxonomy = run_arguments(data, taxonomy, tmp_path / "a")
    del no_taxonomy[2:4]
    with pytest.raises(InvalidInputError, match="Give the taxonomy with --taxonomy"):
        train_hierarchical(*hierarchical_parser().parse_args_into_dataclasses(args=no_taxonomy))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([[0, 0], [1, 0], [2, 1], [3, 1]]))  # 4 shapes, but the data have 6
    arguments = hierarchical_parser().parse_args_into_dataclasses(args=run_arguments(data, wrong, tmp_path / "b"))
    with pytest.raises(InvalidInputError, match=r"Label [45] is not a finest class of the taxonomy \(0..3\)"):
        train_hierarchical(*arguments)
    with pytest.raises(InvalidInputError, match="--tree_path_kl_weight must be >= 0"):
        HierarchicalArguments(tree_path_kl_weight=-1.0)


@pytest.mark.slow
def test_run_resumed_from_its_middle_checkpoint_ends_with_the_same_weights(shapes, tmp_path):
    import shutil

    data, taxonomy = shapes
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--checkpointing_steps", "2", "--max_train_steps", "4", "--checkpoints_total_limit", "5"]
    assert main(["train-hierarchical", *run_arguments(data, taxonomy, straight, *common)]) == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after step 2
    assert (
        main(
            [
                "train-hierarchical",
                *run_arguments(data, taxonomy, resumed, *common, "--resume_from_checkpoint", "latest"),
            ]
        )
        == 0
    )
    summaries = [json.loads((folder / "train_summary_rank0.json").read_text()) for folder in (straight, resumed)]
    assert summaries[0]["parameter_fingerprint"] == summaries[1]["parameter_fingerprint"]
    losses = [
        [line["loss"] for line in read_metrics(folder / "metrics.jsonl") if "loss" in line]
        for folder in (straight, resumed)
    ]
    assert losses[1] == losses[0][2:]
