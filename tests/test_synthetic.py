"""The synthetic part-whole dataset: determinism, mask consistency, shape-not-colour classes, datasets loading."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest

from hf_hierseg.evaluation.synthetic import (
    CLASS_NAMES,
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
