"""The CPU-scale reproduction (hf_hierseg.apps.reproduce) and the decisive part-whole run (hf_hierseg.apps.part_whole)
on tiny settings: one training step per model."""

import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTForImageClassification, ViTModel

from hf_hierseg import CastForImageClassification, CastForSelfSupervisedPretraining
from hf_hierseg.apps.benchmark_throughput import VitForMoco
from hf_hierseg.apps.part_whole import (
    OBJECTIVES,
    PartWholeSettings,
    VitMocoObjective,
    adjusted_rand_index,
    colour_clusters,
    object_instances,
    part_whole_run,
)
from hf_hierseg.apps.part_whole import prepare_data as part_whole_prepare_data
from hf_hierseg.apps.reproduce import (
    MASKS,
    ReproductionSettings,
    SuperpixelFreeClassifier,
    prepare_data,
    reproduce_small,
    vit_config,
)
from hf_hierseg.errors import InvalidInputError
from hf_hierseg.evaluation.baselines import make_vit_like
from hf_hierseg.training.loop import read_metrics


TINY = ReproductionSettings(
    num_train_images=8,
    num_test_images=4,
    hidden_size=24,
    num_attention_heads=4,
    graph_pooling_num_heads=4,
    num_clusters=(16, 8, 4, 2),
    train_steps=1,
    batch_size=4,
    eval_batch_size=8,
    warmup_steps=0,
    dataloader_num_workers=0,
    learning_rate=1e-4,
    vit_max_fit_pixels=256,
)
MODELS = ("CAST", "ViT", "CAST (untrained)", "ViT (untrained)")


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reproduce")
    return SimpleNamespace(dir=output_dir, results=reproduce_small(output_dir, TINY))


@pytest.mark.slow
def test_results_structure(reproduction):
    results = reproduction.results
    assert set(results["training"]) == {"CAST", "ViT"}
    assert results["settings"]["train_steps"] == 1 and results["settings"]["vit_patch_size"] == 8
    assert list(results["classification"]) == list(MODELS)
    for scores in results["classification"].values():
        assert scores["num_eval"] == 4 and scores["num_train"] == 8
        for key in ("top1_accuracy", "top5_accuracy", "knn_accuracy"):
            assert 0.0 <= scores[key] <= 1.0
    parameters = {name: scores["parameters"] for name, scores in results["classification"].items()}
    assert parameters["CAST"] == parameters["CAST (untrained)"] and parameters["ViT"] == parameters["ViT (untrained)"]
    assert set(results["segmentation"]) == set(MASKS)
    for mask, evaluation in results["segmentation"].items():
        assert evaluation["num_images"] == 4 and evaluation["num_labels"] == MASKS[mask]
        assert list(evaluation["models"]) == list(MODELS)
        for levels in evaluation["models"].values():
            assert [score["level"] for score in levels] == [1, 2, 3, 4]
            for score, clusters in zip(levels, TINY.num_clusters):
                assert 1 <= score["num_segments"] <= clusters
                assert 0.0 <= score["majority_mean_iou"] <= 1.0 and 0.0 <= score["boundary_fscore"] <= 1.0
    assert results["training"]["CAST"]["final_metrics"]["eval_samples"] == 4  # the loop evaluated on the test split


@pytest.mark.slow
def test_files_and_report(reproduction):
    saved = json.loads((reproduction.dir / "results.json").read_text())
    assert saved == reproduction.results
    report = (reproduction.dir / "results.md").read_text()
    assert "| CAST | 4 |" in report and "| ViT/8 | 4 |" in report  # classification rows
    # Per mask: a row in the mIoU and the boundary F summaries, and one per level in the full table.
    assert report.count("| ViT/8 + k-means |") == (2 + 4) * len(MASKS)
    assert "| model | level 1 (16) | level 2 (8) | level 3 (4) | level 4 (2) |" in report


@pytest.mark.slow
def test_both_models_were_trained_the_same_way(reproduction):
    cast = CastForImageClassification.from_pretrained(reproduction.dir / "cast")
    vit = ViTForImageClassification.from_pretrained(reproduction.dir / "vit")
    assert (cast.config.hidden_size, sum(cast.config.depths)) == (vit.config.hidden_size, vit.config.num_hidden_layers)
    assert cast.config.num_clusters == TINY.num_clusters and vit.config.patch_size == TINY.vit_patch_size
    assert cast.config.id2label == vit.config.id2label and cast.config.num_labels == 6
    for kind in ("cast", "vit"):  # same steps, same number of samples
        lines = read_metrics(reproduction.dir / kind / "metrics.jsonl")
        logged = [line for line in lines if "samples_seen" in line][-1]
        assert logged["step"] == 1 and logged["samples_seen"] == TINY.batch_size
    # One Adam step of learning rate 1e-4 moves every weight by about 1e-4 at most, from the seeded initialisation
    # that the untrained rows use.
    torch.manual_seed(TINY.seed)
    initial_vit = ViTForImageClassification(vit_config(TINY, 6))
    torch.manual_seed(TINY.seed)
    initial_cast = CastForImageClassification(TINY.cast_config(6))
    for initial, trained in ((initial_vit, vit), (initial_cast, cast)):
        changes = [
            (parameter - dict(trained.named_parameters())[name]).abs().max().item()
            for name, parameter in initial.named_parameters()
        ]
        assert 0 < max(changes) <= 3e-4


def test_superpixel_free_classifier_ignores_superpixels():
    torch.manual_seed(0)
    vit = ViTForImageClassification(vit_config(TINY, 6)).eval()
    wrapped = SuperpixelFreeClassifier(vit)
    pixel_values = torch.randn(2, 3, 64, 64)
    expected = vit(pixel_values=pixel_values).logits
    assert torch.equal(
        wrapped(pixel_values=pixel_values, superpixels=torch.zeros(2, 64, 64, dtype=torch.long)).logits, expected
    )
    assert wrapped.config is vit.config


@pytest.mark.slow
def test_prepare_data_refuses_a_folder_with_other_settings(reproduction):
    assert prepare_data(TINY, reproduction.dir / "data") == reproduction.dir / "data"  # reused as is
    other = ReproductionSettings(**{**TINY.__dict__, "num_train_images": 9})
    with pytest.raises(ValueError, match="other settings"):
        prepare_data(other, reproduction.dir / "data")


# --------------------------------------------------------------------------------------------------------------
# The decisive part-whole run (hf_hierseg.apps.part_whole)
# --------------------------------------------------------------------------------------------------------------

PART_WHOLE_TINY = PartWholeSettings(
    num_train_images=8,
    num_test_images=3,
    num_memory_images=4,
    hidden_size=24,
    num_attention_heads=4,
    graph_pooling_num_heads=4,
    num_clusters=(16, 8, 4, 2),
    supervised_steps=1,
    moco_steps=1,
    batch_size=4,
    warmup_steps=0,
    projection_dim=16,
    projection_hidden_dim=32,
    vit_max_fit_pixels=256,
    dataloader_num_workers=0,
    eval_batch_size=8,
)


def test_adjusted_rand_index_by_hand():
    a = np.array([[0, 0], [1, 1]])
    assert adjusted_rand_index(a, a) == 1.0 and adjusted_rand_index(a, 5 - a) == 1.0
    # Contingency [[2, 0, 0], [0, 1, 1]]: pairs together in both 1, rows 2, columns 1, of 6: (1 - 1/3) / (3/2 - 1/3).
    assert adjusted_rand_index(a, np.array([[0, 0], [1, 2]])) == pytest.approx(4 / 7)
    instances = object_instances(np.array([[3, 3, 0, 3], [0, 0, 0, 3]]))
    assert len(np.unique(instances)) == 3 and instances[0, 0] == instances[0, 1] != instances[0, 3]
    image = Image.fromarray(
        np.kron(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
    )
    assert adjusted_rand_index(colour_clusters(image, 2), np.kron(np.array([[0, 1]]), np.ones((4, 4), int))) == 1.0


def test_vit_moco_objective_trains_the_vit_and_follows_it_with_the_momentum_encoder():
    settings = PART_WHOLE_TINY
    torch.manual_seed(0)
    config = make_vit_like(settings.cast_config(), patch_size=8)
    objective = VitMocoObjective(VitForMoco(config, 16, 32), temperature=0.2, base_momentum=0.5)
    module = objective.training_module().train()
    accelerator = SimpleNamespace(num_processes=1)
    before = [parameter.clone() for parameter in module.momentum_backbone.parameters()]
    loss, _ = objective.compute_loss(module, {"pixel_values": torch.randn(4, 2, 3, 64, 64)}, 0, 0, accelerator)
    loss.backward()
    torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1).step()
    metrics = objective.after_optimizer_step(module, 1, 10, accelerator)
    assert 0.5 < metrics["momentum"] < 1.0 and loss.item() > 0
    base = list(module.model.vit.parameters())
    moved = [(after - old).abs().max().item() for old, after in zip(before, module.momentum_backbone.parameters())]
    assert max(moved) > 0 and all(not p.requires_grad for p in module.momentum_backbone.parameters())
    # k <- m k + (1 - m) q for every backbone weight.
    m = metrics["momentum"]
    for old, after, query in zip(before, module.momentum_backbone.parameters(), base):
        torch.testing.assert_close(after, m * old + (1 - m) * query.detach())
    assert isinstance(objective.pretrained_model(module, accelerator), ViTModel)


@pytest.fixture(scope="module")
def part_whole(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("part_whole")
    return SimpleNamespace(dir=output_dir, results=part_whole_run(output_dir, PART_WHOLE_TINY))


@pytest.mark.slow
def test_part_whole_results_and_report(part_whole):
    results = part_whole.results
    groups = [(run["model"], run["objective"], run["seed"]) for run in results["runs"]]
    trained = [(model, objective, seed) for seed in (0, 1) for objective in OBJECTIVES for model in ("CAST", "ViT")]
    assert groups == trained + [("CAST", "untrained", 0), ("ViT", "untrained", 0)]
    for run in results["runs"]:
        for section in ("retrieval", "object", "part", "follows"):
            assert len(run[section]) == 4
        for score, clusters in zip(run["retrieval"], PART_WHOLE_TINY.num_clusters):
            assert 1 <= score["num_segments"] <= clusters and 0.0 <= score["mean_iou"] <= 1.0
            assert score["memory_size"] >= 4
        for score in run["follows"]:
            assert -1.0 <= score["ari_colour"] <= 1.0 and -1.0 <= score["ari_instances"] <= 1.0
        if run["objective"] != "untrained":
            assert run["training"]["cpu_seconds"] > 0
        # Classifiers (supervised, untrained) have a top-1; every model's embedding a kNN accuracy.
        classification = run["classification"]
        assert ("top1_accuracy" in classification) == (run["objective"] != "moco")
        assert classification["num_eval"] == 3 and classification["num_train"] == 4
        assert 0.0 <= classification["knn_accuracy"] <= 1.0
    assert results["floors"]["retrieval"]["label"] == 0  # background is the most frequent label
    assert set(results["cpu_seconds"]) == {"data", "training", "evaluation", "total"}
    saved = json.loads((part_whole.dir / "results.json").read_text())
    assert json.dumps(saved) == json.dumps(results)  # (NaN per-class IoUs of absent classes compare unequal)
    report = (part_whole.dir / "results.md").read_text()
    assert (
        report.count("| CAST | moco |") == 6 and report.count("| ViT/8 + k-means | untrained |") == 5
    )  # + the classification table
    assert "| *floor: all background* |" in report and report.count("| *floor: grid* |") == 4
    assert re.search(r"\| ViT/8 \| moco \| - \| \d\.\d{3} \(\d\.\d{3} / \d\.\d{3}\) \|", report)  # no classifier
    # Two seeds: the mean and each seed's value.
    assert re.search(r"\| CAST \| supervised \| \d\.\d{3} \(\d\.\d{3} / \d\.\d{3}\) \|", report)
    # Every model folder trained with its objective and seed.
    cast = CastForSelfSupervisedPretraining.from_pretrained(part_whole.dir / "cast_moco_seed1")
    assert cast.config.projection_dim == 16 and cast.config.pooling_dropout_prob == 0.0
    vit = ViTModel.from_pretrained(part_whole.dir / "vit_moco_seed0")
    assert vit.config.hidden_size == 24 and vit.config.patch_size == 8
    assert read_metrics(part_whole.dir / "vit_supervised_seed1" / "metrics.jsonl")[-1]["step"] == 1


@pytest.mark.slow
def test_part_whole_data_are_camouflage_and_reused(part_whole):
    info = json.loads((part_whole.dir / "data" / "synthetic_info.json").read_text())
    assert info["variant"] == "camouflage_large" and info["splits"] == {"train": 8, "test": 3}
    assert part_whole_prepare_data(PART_WHOLE_TINY, part_whole.dir / "data") == part_whole.dir / "data"
    with pytest.raises(InvalidInputError, match="other settings"):
        part_whole_prepare_data(dataclasses.replace(PART_WHOLE_TINY, variant="contrasting"), part_whole.dir / "data")


def test_part_whole_settings_are_checked_and_shared_with_the_reproduction():
    with pytest.raises(InvalidInputError, match="objectives"):
        PartWholeSettings(objectives=("moco", "dino"))
    reproduction = PART_WHOLE_TINY.reproduction_settings(seed=3)
    assert (reproduction.seed, reproduction.train_steps, reproduction.hidden_size) == (3, 1, 24)
    assert "projection_dim=16" in PART_WHOLE_TINY.moco_config_overrides()
