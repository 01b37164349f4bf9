"""The synthetic part-whole dataset: determinism, mask consistency, shape-not-colour classes, datasets loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest
import torch
from transformers import ViTModel

from hf_hierseg import CastModel
from hf_hierseg.apps.part_whole import colour_clusters
from hf_hierseg.apps.reproduce import ReproductionSettings, vit_config
from hf_hierseg.evaluation.metrics import evaluate_hierarchy
from hf_hierseg.evaluation.segment_retrieval import grid_partition, superpixel_grid_partition
from hf_hierseg.evaluation.segmentation_eval import predict_cast_levels, predict_vit_levels, segmentation_processor
from hf_hierseg.evaluation.synthetic import (
    CLASS_NAMES,
    INFO_FILE,
    PART_NAMES,
    SHAPE_PARTS,
    generate_example,
    load_synthetic_dataset,
    write_synthetic_dataset,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


def arrays(example):
    return {key: np.asarray(example[key]) for key in ("image", "object_mask", "part_mask")}


def test_examples_are_deterministic_and_independent_of_each_other():
    first, again = arrays(generate_example(7, seed=3)), arrays(generate_example(7, seed=3))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], arrays(generate_example(7, seed=4))["image"])
    assert not np.array_equal(first["image"], arrays(generate_example(7, seed=3, split="test"))["image"])
    assert not np.array_equal(first["image"], arrays(generate_example(13, seed=3))["image"])  # same class, other draw


def test_masks_are_consistent_with_the_class_and_its_parts():
    for index in range(2 * len(CLASS_NAMES)):
        example = generate_example(index, image_size=64)
        label, name = example["label"], example["label_name"]
        assert (label, name) == (index % len(CLASS_NAMES), CLASS_NAMES[index % len(CLASS_NAMES)])
        image, object_mask, part_mask = (arrays(example)[k] for k in ("image", "object_mask", "part_mask"))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert object_mask.shape == part_mask.shape == (64, 64)
        assert set(np.unique(object_mask)) == {0, label + 1}
        np.testing.assert_array_equal(object_mask > 0, part_mask > 0)
        expected_parts = {PART_NAMES.index(f"{name}/{part}") for part in SHAPE_PARTS[name]}
        assert set(np.unique(part_mask)) - {0} == expected_parts  # every part visible, no other class's part
        assert 0.04 < (object_mask > 0).mean() < 0.6


def test_colour_does_not_tell_classes_apart_but_shape_does():
    # Nearest class centroid on colour statistics (object / background mean and std) is near chance (1/6), while
    # nearest centroid on the object's silhouette (bounding-box crop resized to 16 x 16) is far above it.
    def features(split, count):
        colour, shape, labels = [], [], []
        for index in range(count):
            example = generate_example(index, split=split)
            image = np.asarray(example["image"], dtype=np.float32) / 255
            mask = np.asarray(example["object_mask"]) > 0
            statistics = [image[mask].mean(0), image[mask].std(0), image[~mask].mean(0), image[~mask].std(0)]
            colour.append(np.concatenate(statistics))
            rows, cols = np.nonzero(mask)
            crop = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float32)
            shape.append(cv2.resize(crop, (16, 16), interpolation=cv2.INTER_AREA).ravel())
            labels.append(example["label"])
        return np.array(colour), np.array(shape), np.array(labels)

    def nearest_centroid_accuracy(train, train_labels, test, test_labels):
        mean, std = train.mean(0), train.std(0) + 1e-6
        train, test = (train - mean) / std, (test - mean) / std
        centroids = np.stack([train[train_labels == c].mean(0) for c in range(len(CLASS_NAMES))])
        predicted = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        return (predicted == test_labels).mean()

    train_colour, train_shape, train_labels = features("train", 300)
    test_colour, test_shape, test_labels = features("test", 120)
    assert nearest_centroid_accuracy(train_colour, train_labels, test_colour, test_labels) < 0.35
    assert nearest_centroid_accuracy(train_shape, train_labels, test_shape, test_labels) > 0.8


# --------------------------------------------------------------------------------------------------------------
# The camouflage variant
# --------------------------------------------------------------------------------------------------------------


def test_camouflage_examples_are_deterministic_and_show_several_objects_of_the_class():
    first = arrays(generate_example(4, seed=2, variant="camouflage"))
    again = arrays(generate_example(4, seed=2, variant="camouflage"))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], arrays(generate_example(4, seed=2))["image"])  # not the default
    objects = []
    for index in range(2 * len(CLASS_NAMES)):
        example = generate_example(index, variant="camouflage")
        label, name = example["label"], example["label_name"]
        image, object_mask, part_mask = (arrays(example)[k] for k in ("image", "object_mask", "part_mask"))
        assert image.shape == (64, 64, 3) and set(np.unique(object_mask)) == {0, label + 1}
        np.testing.assert_array_equal(object_mask > 0, part_mask > 0)
        assert set(np.unique(part_mask)) - {0} == {PART_NAMES.index(f"{name}/{part}") for part in SHAPE_PARTS[name]}
        objects.append(cv2.connectedComponents((object_mask > 0).astype(np.uint8), connectivity=8)[0] - 1)
    assert min(objects) >= 1 and max(objects) <= 3 and np.mean(objects) >= 2


def test_camouflage_large_shows_one_large_object_and_keeps_the_small_variant():
    coverage = []
    for index in range(4 * len(CLASS_NAMES)):
        example = generate_example(index, variant="camouflage_large")
        label, name = example["label"], example["label_name"]
        object_mask, part_mask = (arrays(example)[k] for k in ("object_mask", "part_mask"))
        assert set(np.unique(object_mask)) == {0, label + 1}
        assert set(np.unique(part_mask)) - {0} == {PART_NAMES.index(f"{name}/{part}") for part in SHAPE_PARTS[name]}
        assert cv2.connectedComponents((object_mask > 0).astype(np.uint8), connectivity=8)[0] - 1 == 1
        coverage.append((object_mask > 0).mean())
    small = [(arrays(generate_example(index, variant="camouflage"))["object_mask"] > 0).mean() for index in range(24)]
    assert 0.2 < np.mean(coverage) < 0.4 and 0.08 < np.mean(small) < 0.16  # ~26 % against ~11 % of the image
    assert not np.array_equal(arrays(generate_example(1, variant="camouflage_large"))["image"],
                              arrays(generate_example(1, variant="camouflage"))["image"])  # fmt: skip


def colour_split_iou(example):
    """IoU with the object mask of the better of the two clusters of 2-means of the pixel colours."""
    pixels = np.asarray(example["image"], dtype=np.float32).reshape(-1, 3)
    on_object = np.asarray(example["object_mask"]).ravel() > 0
    cv2.setRNGSeed(0)
    _, labels, _ = cv2.kmeans(pixels, 2, None, (cv2.TERM_CRITERIA_MAX_ITER, 20, 0), 3, cv2.KMEANS_PP_CENTERS)
    clusters = [labels.ravel() == k for k in (0, 1)]
    return max((cluster & on_object).sum() / (cluster | on_object).sum() for cluster in clusters)


def test_colour_gives_the_object_away_in_the_contrasting_variant_only():
    # Two colour clusters: one of them is the object in the contrasting images; in the camouflage images neither is
    # (object pixels are ~11 % / ~26 % of the image, and share the background's palette).
    contrasting = [colour_split_iou(generate_example(index)) for index in range(30)]
    camouflage = [colour_split_iou(generate_example(index, variant="camouflage")) for index in range(30)]
    large = [colour_split_iou(generate_example(index, variant="camouflage_large")) for index in range(30)]
    assert np.mean(contrasting) > 0.85 and np.mean(camouflage) < 0.3 and np.mean(large) < 0.45


def test_camouflage_dataset_records_its_variant(tmp_path):
    output = write_synthetic_dataset(tmp_path / "camo", num_images=3, num_test_images=1, variant="camouflage")
    assert json.loads((output / INFO_FILE).read_text())["variant"] == "camouflage"
    row = load_synthetic_dataset(output, split="train")[2]
    np.testing.assert_array_equal(np.asarray(row["image"]), arrays(generate_example(2, variant="camouflage"))["image"])
    with pytest.raises(ValueError, match="variant"):
        generate_example(0, variant="plain")
    with pytest.raises(ValueError, match="variant"):
        write_synthetic_dataset(tmp_path / "bad", num_images=1, variant="plain")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_example(0, image_size=16)
    with pytest.raises(ValueError, match="split"):
        generate_example(0, split="dev")
    with pytest.raises(ValueError, match="format"):
        write_synthetic_dataset(tmp_path, num_images=2, format="zip")
    with pytest.raises(ValueError, match="num_images"):
        write_synthetic_dataset(tmp_path, num_images=0)
    with pytest.raises(FileNotFoundError, match="write_synthetic_dataset"):
        load_synthetic_dataset(tmp_path / "missing")


@pytest.mark.parametrize("format", ["imagefolder", "parquet"])
def test_written_dataset_loads_offline_with_datasets(tmp_path, format, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    output = write_synthetic_dataset(
        tmp_path / "data", num_images=8, num_test_images=3, format=format, seed=5, shard_size=5
    )
    data_dir = output / "data" if format == "parquet" else output
    loaded = datasets.load_dataset(format, data_dir=str(data_dir))
    assert {split: len(loaded[split]) for split in loaded} == {"train": 8, "test": 3}
    assert {"image", "object_mask", "part_mask", "label", "label_name"} <= set(loaded["train"].column_names)
    for index in (0, 7):
        row, expected = loaded["train"][index], generate_example(index, seed=5, split="train")
        assert row["label"] == expected["label"] and row["label_name"] == expected["label_name"]
        for key in ("image", "object_mask", "part_mask"):
            np.testing.assert_array_equal(np.asarray(row[key]), np.asarray(expected[key]))

    streamed = list(datasets.load_dataset(format, data_dir=str(data_dir), split="test", streaming=True))
    assert [row["label"] for row in streamed] == [generate_example(i, seed=5, split="test")["label"] for i in range(3)]
    np.testing.assert_array_equal(
        np.asarray(streamed[2]["part_mask"]), np.asarray(generate_example(2, seed=5, split="test")["part_mask"])
    )

    with_names = load_synthetic_dataset(output, split="train")
    assert with_names.features["label"].names == list(CLASS_NAMES)
    assert next(iter(load_synthetic_dataset(output, split="train", streaming=True)))["label"] == 0


@pytest.mark.slow
def test_cli_writes_a_dataset(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "make_synthetic_dataset.py"), "--output_dir", str(tmp_path / "out"),
        "--num_images", "4", "--num_test_images", "2", "--image_size", "48", "--format", "parquet", "--seed", "1",
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out" / "data").iterdir())
    assert files == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    assert (tmp_path / "out" / "synthetic_info.json").is_file()


@pytest.fixture
def one_thread():
    # Small models on a shared machine: more threads than free cores make them much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_untrained_models_score_near_their_floor_on_camouflage_only(one_thread):
    # Majority-label mIoU of untrained CAST and ViT + k-means (the reproduction's sizes) against the content-blind
    # floors: a grid of as many cells (ViT), CAST's superpixels grouped by that grid (CAST). In the contrasting images
    # colour alone groups the object, so the ViT's coarse levels lie far above the grid; in the camouflage images
    # neither model lies far above its floor. With one large object, a colour cluster of 4 can hold most of one
    # part (a large patch of one texture): there the untrained ViT's level 4 is no better than k-means of the colours.
    settings = ReproductionSettings()
    torch.manual_seed(0)
    cast = CastModel(settings.cast_config()).eval()
    torch.manual_seed(0)
    vit = ViTModel(vit_config(settings, 6), add_pooling_layer=False).eval()
    processor = segmentation_processor(64, superpixel_method="seeds", num_superpixels=600, seeds_recipe="supervised")
    gaps = {}
    for variant in ("contrasting", "camouflage", "camouflage_large"):
        examples = [generate_example(index, split="test", variant=variant) for index in range(16)]
        images = [example["image"] for example in examples]
        masks = [np.asarray(example["object_mask"]).astype(np.int64) for example in examples]
        sizes = [mask.shape for mask in masks]
        cast_maps = predict_cast_levels(cast, images, processor, sizes, levels=(0, 1, 2, 3, 4))
        vit_maps = predict_vit_levels(vit, images, settings.num_clusters, sizes, max_fit_pixels=1024)
        grid = [[grid_partition(64, 64, k) for _ in masks] for k in settings.num_clusters]
        grouped = [[superpixel_grid_partition(sp, k) for sp in cast_maps[0]] for k in settings.num_clusters]
        colours = [[colour_clusters(image, k) for image in images] for k in settings.num_clusters]

        def majority(maps):
            return np.array([score["majority_mean_iou"] for score in evaluate_hierarchy(maps, masks, 7)])

        gaps[variant] = {
            "vit": majority(vit_maps) - majority(grid),
            "cast": majority(cast_maps[1:]) - majority(grouped),
            "colour": majority(colours) - majority(grid),
        }
    assert (gaps["contrasting"]["vit"][2:] > 0.25).all()  # levels 3 and 4: colour gives the object away
    assert (gaps["camouflage"]["vit"] < 0.15).all()
    assert (gaps["camouflage"]["cast"][1:] < 0.1).all()
    assert (gaps["camouflage_large"]["vit"][:3] < 0.15).all()
    assert gaps["camouflage_large"]["vit"][3] < gaps["camouflage_large"]["colour"][3]
    assert (gaps["camouflage_large"]["cast"][1:] < 0.1).all()
