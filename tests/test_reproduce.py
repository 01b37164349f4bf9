"""The CPU-scale reproduction (hf_hierseg.apps.reproduce) on a tiny setting: one training step per model."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import ViTForImageClassification

from hf_hierseg import CastForImageClassification
from hf_hierseg.apps.reproduce import (
    MASKS,
    ReproductionSettings,
    SuperpixelFreeClassifier,
    prepare_data,
    reproduce_small,
    vit_config,
)
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
