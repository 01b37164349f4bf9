"""A CPU-scale comparison of hierarchical classifiers on the synthetic shapes (`examples/hierarchical_shapes.py`).

The 6 shape classes of `evaluation.synthetic` get a 2-level taxonomy (shape -> family, `SHAPE_FAMILIES`). Three
models of the same width, depth and heads are trained from scratch for the same steps with the same recipe, data
order and views (`training.hierarchical.train_hierarchical`, the H-CAST loss), then scored on held-out images for
per-level top-1, full-path accuracy and tree consistency (TICE = 1 - consistency), each through its run's saved
image processor (DeiT's centre crop; SEEDS superpixels for CAST):

- **H-CAST**: the shape read from the CLS token of CAST level 3 (after its blocks, among the 16 segments of level 2;
  the authors' mapping for 2 levels), the family from the final CLS token;
- **CAST, heads on the final CLS**: the same CAST with both heads on the final CLS token (`hierarchy_cast_levels=(4,
  4)`), i.e. the usual multi-head classifier;
- **Hier-ViT**: a transformers ViT with one head per level on its final CLS token (the authors' baseline).
"""

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTModel, ViTPreTrainedModel
from transformers.utils import ModelOutput

from ..evaluation.baselines import make_vit_like
from ..evaluation.hierarchical_eval import format_hierarchical_table
from ..evaluation.segmentation_eval import to_jsonable
from ..evaluation.synthetic import CLASS_NAMES
from ..modeling_cast import CastForHierarchicalImageClassification, hierarchical_classification_loss
from ..training.arguments import (
    DataArguments,
    EvaluationArguments,
    ModelArguments,
    OutputArguments,
    SupervisedOptimizationArguments,
)
from ..training.hierarchical import HierarchicalArguments, train_hierarchical
from .reproduce import prepare_data


RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
TAXONOMY_FILE = "taxonomy.json"
# Shape -> family: what the outline has on top (a dome, a point) or whether it is a bar with ends.
SHAPE_FAMILIES = {
    "house": "pointed",
    "mushroom": "rounded",
    "snowman": "rounded",
    "arrow": "pointed",
    "dumbbell": "bar",
    "hammer": "bar",
}
FAMILY_NAMES = ("rounded", "pointed", "bar")
MODELS = ("H-CAST", "CAST, heads on the final CLS", "Hier-ViT")


def shapes_taxonomy():
    """The taxonomy file of the demo (format of `convert.read_taxonomy`): shape (6, finest) -> family (3)."""
    families = [FAMILY_NAMES.index(SHAPE_FAMILIES[name]) for name in CLASS_NAMES]
    return {
        "levels": [
            {"name": "shape", "classes": list(CLASS_NAMES), "parent": families},
            {"name": "family", "classes": list(FAMILY_NAMES), "parent": None},
        ]
    }


@dataclasses.dataclass
class HierarchicalDemoSettings:
    """Data, model sizes and the recipe (shared by the three models). Defaults: about 10 minutes on 2 CPU cores (the
    model on one thread, a DataLoader worker computing views and superpixels on the other); the sizes follow
    `apps.reproduce.ReproductionSettings`."""

    num_train_images: int = 1500
    num_test_images: int = 300
    image_size: int = 64
    hidden_size: int = 96
    num_attention_heads: int = 4
    depths: tuple = (1, 1, 1, 1)
    num_clusters: tuple = (32, 16, 8, 4)
    graph_pooling_num_heads: int = 12
    num_superpixels: int = 600  # per 224x224 px: about 49 on a 64x64 image
    vit_patch_size: int = 8  # 64 tokens on a 64x64 image, about as many as CAST's superpixels
    train_steps: int = 500
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_grad_norm: float = 5.0
    label_smoothing: float = 0.1
    tree_path_kl_weight: float = 0.5
    mixup: float = 0.0  # the authors mix (0.8 / 1.0); short CPU runs learn faster without
    cutmix: float = 0.0
    crop_min_scale: float = 0.5
    rand_augment_num_ops: int = 1
    rand_augment_magnitude: float = 5.0
    dataloader_num_workers: int = 1
    eval_batch_size: int = 64
    num_threads: int = 1
    seed: int = 0

    def config_overrides(self):
        """`--config_overrides` of the CAST models."""
        return [
            f"hidden_size={self.hidden_size}",
            f"num_attention_heads={self.num_attention_heads}",
            "depths=" + ",".join(map(str, self.depths)),
            "num_clusters=" + ",".join(map(str, self.num_clusters)),
            f"image_size={self.image_size}",
            f"graph_pooling_num_heads={self.graph_pooling_num_heads}",
        ]


# --------------------------------------------------------------------------------------------------------------
# Hier-ViT
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HierarchicalViTOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    logits_per_level: tuple[torch.FloatTensor, ...] | None = None


class ViTForHierarchicalImageClassification(ViTPreTrainedModel):
    """Hier-ViT: a ViT with one linear head per taxonomy level on its final (normed) CLS token, trained with the
    H-CAST loss (`hierarchical_classification_loss`). Its `ViTConfig` holds the taxonomy fields of `CastConfig`
    (`hierarchy_num_labels`, `hierarchy_parents`, `hierarchy_label_smoothing`, `tree_path_kl_weight`). It takes
    `superpixels` like CAST and ignores them, so the same data and evaluation serve both."""

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.ModuleList(nn.Linear(config.hidden_size, count) for count in config.hierarchy_num_labels)
        self.loss_function = hierarchical_classification_loss
        self.post_init()

    def forward(self, pixel_values=None, superpixels=None, labels=None, **kwargs):
        cls_token = self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]
        logits_per_level = tuple(head(cls_token) for head in self.classifier)
        loss = None if labels is None else self.loss_function(labels, logits_per_level, self.config)
        return HierarchicalViTOutput(loss=loss, logits=logits_per_level[0], logits_per_level=logits_per_level)


def hier_vit(settings, cast_config):
    """A Hier-ViT of CAST's width, depth, heads and MLP ratio (`make_vit_like`) with CAST's taxonomy."""
    taxonomy = {
        name: getattr(cast_config, name)
        for name in (
            "hierarchy_num_labels",
            "hierarchy_parents",
            "hierarchy_id2label",
            "hierarchy_level_names",
            "hierarchy_label_smoothing",
            "tree_path_kl_weight",
        )
    }
    config = make_vit_like(cast_config, patch_size=settings.vit_patch_size, **taxonomy)
    torch.manual_seed(settings.seed)
    return ViTForHierarchicalImageClassification(config)


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------


def run_arguments(settings, data_dir, taxonomy, output_dir, superpixel_method="seeds", cast_levels=None):
    """The dataclasses of `training.hierarchical.train_hierarchical` for one model (the same for all three but the
    output folder, the CAST levels and the superpixels, which the ViT's views need not compute)."""
    return (
        DataArguments(dataset_name=str(data_dir), dataloader_num_workers=settings.dataloader_num_workers),
        ModelArguments(
            config_name="cast-small",
            config_overrides=settings.config_overrides(),
            superpixel_method=superpixel_method,
            num_superpixels=settings.num_superpixels,
        ),
        SupervisedOptimizationArguments(
            per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.eval_batch_size,
            max_train_steps=settings.train_steps,
            num_warmup_steps=settings.warmup_steps,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm,
            seed=settings.seed,
        ),
        OutputArguments(
            output_dir=str(output_dir), logging_steps=max(1, min(50, settings.train_steps)), report_to="jsonl"
        ),
        EvaluationArguments(),
        HierarchicalArguments(
            taxonomy=str(taxonomy),
            label_smoothing=settings.label_smoothing,
            tree_path_kl_weight=settings.tree_path_kl_weight,
            hierarchy_cast_levels=list(cast_levels) if cast_levels else None,
            mixup=settings.mixup,
            cutmix=settings.cutmix,
            reprob=0.0,
            rand_augment_num_ops=settings.rand_augment_num_ops,
            rand_augment_magnitude=settings.rand_augment_magnitude,
            crop_min_scale=settings.crop_min_scale,
        ),
    )


def test_scores(metrics, level_names=("shape", "family")):
    """The final evaluation of a run (`training.hierarchical.evaluate_hierarchical_classifier` on the `test` split,
    through the run's image processor) in the form of `metrics.hierarchical_accuracy`."""
    return {
        "top1_accuracy_per_level": [metrics[f"eval_accuracy_{name}"] for name in level_names],
        "full_path_accuracy": metrics["eval_full_path_accuracy"],
        "tree_consistency": metrics["eval_tree_consistency"],
        "tice": 1.0 - metrics["eval_tree_consistency"],
        "num_samples": metrics["eval_samples"],
    }


def train_models(settings, data_dir, taxonomy, output_dir):
    """Train the three models of `MODELS` (same recipe and steps); each run ends with its evaluation on the test
    split. Returns `{name: {"model", "seconds", "scores"}}`."""
    runs = (
        ("H-CAST", "hcast", None, "seeds"),
        ("CAST, heads on the final CLS", "cast_flat", (4, 4), "seeds"),
        # The ViT ignores superpixels: its views compute the cheapest ones (grid).
        ("Hier-ViT", "hier_vit", None, "grid"),
    )
    trained = {}
    for name, folder, cast_levels, superpixel_method in runs:
        start = time.perf_counter()
        model = hier_vit(settings, trained["H-CAST"]["model"].config) if name == "Hier-ViT" else None
        arguments = run_arguments(settings, data_dir, taxonomy, output_dir / folder, superpixel_method, cast_levels)
        metrics = train_hierarchical(*arguments, model=model)
        if model is None:
            model = CastForHierarchicalImageClassification.from_pretrained(output_dir / folder)
        trained[name] = {"model": model.eval(), "seconds": time.perf_counter() - start, "scores": test_scores(metrics)}
    return trained


def run_demo(output_dir, settings=None):
    """Write the data and the taxonomy, train and score the three models, write `results.json` and `results.md`.
    Returns the results dict (see `format_report`)."""
    settings = settings or HierarchicalDemoSettings()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)
    try:
        data_dir = prepare_data(settings, output_dir / "data")
        taxonomy = output_dir / TAXONOMY_FILE
        taxonomy.write_text(json.dumps(shapes_taxonomy(), indent=2), encoding="utf-8")
        trained = train_models(settings, data_dir / "data", taxonomy, output_dir)
    finally:
        torch.set_num_threads(threads)
    results = {
        "settings": dataclasses.asdict(settings),
        "taxonomy": SHAPE_FAMILIES,
        "training_seconds": {name: run["seconds"] for name, run in trained.items()},
        "parameters": {name: sum(p.numel() for p in run["model"].parameters()) for name, run in trained.items()},
        "scores": {name: run["scores"] for name, run in trained.items()},
    }
    results = to_jsonable(results)
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    (output_dir / REPORT_FILE).write_text(format_report(results) + "\n", encoding="utf-8")
    return results


def format_report(results):
    """Markdown: the settings in a sentence, then the table of `evaluation.hierarchical_eval`."""
    settings = results["settings"]
    seconds = results["training_seconds"]
    families = ", ".join(
        f"{family}: {', '.join(shape for shape, of in results['taxonomy'].items() if of == family)}"
        for family in FAMILY_NAMES
    )
    intro = (
        f"Synthetic shapes: {settings['num_train_images']} training and {settings['num_test_images']} test images of "
        f"{settings['image_size']} px; taxonomy shape (6) -> family (3) ({families}). All models: width "
        f"{settings['hidden_size']}, {sum(settings['depths'])} blocks, {settings['num_attention_heads']} heads, "
        f"{settings['train_steps']} steps of {settings['batch_size']} images, the H-CAST loss (tree-path KL weight "
        f"{settings['tree_path_kl_weight']}, label smoothing {settings['label_smoothing']}), the same data order and "
        "views. Training (with the final evaluation): "
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + "."
    )
    return intro + "\n\n" + format_hierarchical_table(results["scores"], ["shape", "family"])


__all__ = [
    "HierarchicalDemoSettings",
    "MODELS",
    "SHAPE_FAMILIES",
    "ViTForHierarchicalImageClassification",
    "format_report",
    "hier_vit",
    "run_demo",
    "shapes_taxonomy",
    "test_scores",
    "train_models",
]
