"""A CPU-scale reproduction of the paper's comparison on the synthetic part-whole dataset.

A small CAST and a transformers ViT of the same width, depth, heads and MLP ratio are trained from scratch with
image labels only, with the same supervised recipe (`hf_hierseg.training`: data order, augmented views, optimiser,
schedule and number of steps are identical). Then both are scored on held-out images:

- classification: top-1 / top-5 accuracy of the classifier and kNN accuracy of the embedding;
- part-whole segmentation against the object masks and the part masks: CAST's hierarchy (levels 1..4) vs ViT patch
  tokens + hierarchical k-means into as many clusters per level (`segmentation_eval`).

The same models with their random initial weights are scored too, to tell what training adds to what the
architecture (and the superpixels) give for free.
"""

import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import ViTForImageClassification

from ..configuration_cast import CastConfig
from ..evaluation.baselines import make_vit_like
from ..evaluation.classification_eval import (
    classification_processor,
    evaluate_classification,
    format_classification_table,
)
from ..evaluation.segmentation_eval import (
    CAST_LEVELS,
    evaluate_segmentation,
    format_score,
    format_segmentation_table,
    read_image_mask_pairs,
    segmentation_processor,
    to_jsonable,
)
from ..evaluation.synthetic import CLASS_NAMES, INFO_FILE, PART_NAMES, load_synthetic_dataset, write_synthetic_dataset
from ..modeling_cast import CastForImageClassification
from ..training.arguments import (
    DataArguments,
    EvaluationArguments,
    ModelArguments,
    OutputArguments,
    SupervisedArguments,
    SupervisedOptimizationArguments,
)
from ..training.recipes import TrainingRun, supervised_objective, train_supervised
from ..training.supervised import SupervisedObjective


RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
MASKS = {"object_mask": len(CLASS_NAMES) + 1, "part_mask": len(PART_NAMES)}


@dataclasses.dataclass
class ReproductionSettings:
    """Data, model sizes and the training recipe of the reproduction (defaults: well under 15 minutes on 2 CPU
    cores: the model runs on one thread while a DataLoader worker computes the views and superpixels on the other)."""

    num_train_images: int = 2000
    num_test_images: int = 300
    image_size: int = 64
    hidden_size: int = 96
    num_attention_heads: int = 4
    depths: tuple = (1, 1, 1, 1)
    num_clusters: tuple = (32, 16, 8, 4)
    graph_pooling_num_heads: int = 12
    # Superpixels per 224x224 px, as the training scripts count them: about 49 on a 64x64 image.
    num_superpixels: int = 600
    # 8 px patches give the ViT 64 tokens on a 64x64 image, about as many as CAST's ~49 superpixels (ViT-S/16 and
    # CAST-S both have 196 tokens at 224 px in the paper).
    vit_patch_size: int = 8
    # k-means of the ViT baseline is fitted on the patch features upsampled to at most this many pixels (32x32 for
    # the 8x8 patch grid), then every pixel takes its nearest centroid.
    vit_max_fit_pixels: int = 1024
    train_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_grad_norm: float = 5.0
    label_smoothing: float = 0.1
    crop_min_scale: float = 0.5
    rand_augment_num_ops: int = 1
    rand_augment_magnitude: float = 5.0
    dataloader_num_workers: int = 1
    eval_batch_size: int = 64
    include_untrained: bool = True
    # torch threads of the training / evaluation process (the DataLoader worker has its own); more threads than
    # free cores make small models much slower.
    num_threads: int = 1
    seed: int = 0

    def cast_config(self, num_labels=None):
        """The CAST config; with `num_labels`, labelled with the first `num_labels` synthetic class names."""
        labels = {}
        if num_labels is not None:
            id2label = dict(enumerate(CLASS_NAMES[:num_labels]))
            labels = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
        return CastConfig(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            depths=tuple(self.depths),
            num_clusters=tuple(self.num_clusters),
            image_size=self.image_size,
            graph_pooling_num_heads=self.graph_pooling_num_heads,
            **labels,
        )

    def config_overrides(self):
        """`--config_overrides` of the training script for `cast_config()`."""
        return [
            f"hidden_size={self.hidden_size}",
            f"num_attention_heads={self.num_attention_heads}",
            "depths=" + ",".join(map(str, self.depths)),
            "num_clusters=" + ",".join(map(str, self.num_clusters)),
            f"image_size={self.image_size}",
            f"graph_pooling_num_heads={self.graph_pooling_num_heads}",
        ]


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def training_run_arguments(settings, data_dir, output_dir, superpixel_method="seeds"):
    """The settings of `training.recipes.train_supervised` (in `arguments.supervised_parser()`'s order) for both
    models: a light DeiT recipe (no Mixup / CutMix / erasing, one RandAugment op, label smoothing), evaluated on the
    `test` split at the end. The model is each caller's: `train_cast_classifier` adds CAST's config (a preset with
    `settings.config_overrides()`), `train_vit_classifier` passes the ViT."""
    return (
        DataArguments(dataset_name=str(data_dir), dataloader_num_workers=settings.dataloader_num_workers),
        ModelArguments(superpixel_method=superpixel_method, num_superpixels=settings.num_superpixels),
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
        SupervisedArguments(
            label_smoothing=settings.label_smoothing,
            mixup=0.0,
            cutmix=0.0,
            reprob=0.0,
            rand_augment_num_ops=settings.rand_augment_num_ops,
            rand_augment_magnitude=settings.rand_augment_magnitude,
            crop_min_scale=settings.crop_min_scale,
        ),
    )


class SuperpixelFreeClassifier(torch.nn.Module):
    """Runs a pixel-only classifier (e.g. `ViTForImageClassification`) in the CAST training loop, which passes
    `superpixels` beside `pixel_values`: they are dropped."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, pixel_values, superpixels=None, **kwargs):
        return self.model(pixel_values=pixel_values, **kwargs)


class PixelClassifierObjective(SupervisedObjective):
    """The supervised objective of a `SuperpixelFreeClassifier`; the classifier itself is what is saved."""

    def pretrained_model(self, module, accelerator):
        return self.module.model


def train_cast_classifier(settings, data_dir, output_dir):
    """Train `CastForImageClassification` with `training.recipes.train_supervised`. Returns `(model, metrics)`."""
    data_args, model_args, *other_args = training_run_arguments(settings, data_dir, output_dir)
    model_args = dataclasses.replace(
        model_args, config_name="cast-small", config_overrides=settings.config_overrides()
    )
    metrics = train_supervised(data_args, model_args, *other_args)
    return CastForImageClassification.from_pretrained(output_dir).eval(), metrics


def train_pixel_classifier(
    model, data_args, model_args, optimization_args, output_args, evaluation_args, supervised_args
):
    """`training.recipes.train_supervised` for a classifier that takes pixels only (a transformers ViT): the same
    data, views (their superpixels unused), objective and loop. Returns the final metrics (no evaluation)."""
    run = TrainingRun(
        data_args, model_args, optimization_args, output_args, evaluation_args, recipe_args=(supervised_args,)
    )
    objective = supervised_objective(
        SuperpixelFreeClassifier(model), optimization_args, supervised_args, objective_class=PixelClassifierObjective
    )
    return run.train_classifier(objective, model.config, supervised_args, evaluate=False, save_processor=False)


def train_vit_classifier(settings, data_dir, output_dir, num_labels):
    """Train a `ViTForImageClassification` of CAST's size on the same recipe. Returns `(model, metrics)`."""
    # The superpixels of the ViT's views are never used: the cheapest method leaves the views unchanged.
    arguments = training_run_arguments(settings, data_dir, output_dir, superpixel_method="grid")
    torch.manual_seed(settings.seed)
    model = ViTForImageClassification(vit_config(settings, num_labels))
    metrics = train_pixel_classifier(model, *arguments)
    return ViTForImageClassification.from_pretrained(output_dir).eval(), metrics


def vit_config(settings, num_labels):
    """The ViT of CAST's width, depth, heads and MLP ratio (`make_vit_like`), with `settings.vit_patch_size`."""
    return make_vit_like(settings.cast_config(num_labels), patch_size=settings.vit_patch_size)


def count_parameters(model):
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# The whole reproduction
# --------------------------------------------------------------------------------------------------------------


def prepare_data(settings, data_dir):
    """Write the synthetic dataset (parquet) unless `data_dir` already holds one with the same settings."""
    data_dir = Path(data_dir)
    wanted = {
        "image_size": settings.image_size,
        "seed": settings.seed,
        "splits": {"train": settings.num_train_images, "test": settings.num_test_images},
    }
    info_file = data_dir / INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        if all(info.get(key) == value for key, value in wanted.items()) and info.get("format") == "parquet":
            return data_dir
        raise ValueError(f"{data_dir} holds a synthetic dataset with other settings ({info}); use another folder.")
    return write_synthetic_dataset(
        data_dir,
        num_images=settings.num_train_images,
        num_test_images=settings.num_test_images,
        image_size=settings.image_size,
        format="parquet",
        seed=settings.seed,
    )


def evaluate_models(model_pairs, settings, train_examples, test_examples):
    """Classification and segmentation scores of `{suffix: (CAST model, ViT model)}`, reported as `CAST{suffix}` and
    `ViT{suffix}`: CAST is scored with its hierarchy, the ViT with k-means of its patch tokens into CAST's cluster
    counts, each against every mask column of `MASKS`.

    Returns:
        `(classification, segmentation)`: `{name: evaluate_classification results}` and, for each mask column,
        `{"num_images", "num_labels", "models": {name: per-level scores}}`.
    """
    superpixels = {"num_superpixels": settings.num_superpixels, "seeds_recipe": "supervised"}
    cast_segmentation = segmentation_processor(settings.image_size, superpixel_method="seeds", **superpixels)
    classification_processors = {  # the ViT ignores superpixels: the cheapest method
        "CAST": classification_processor(settings.image_size, superpixel_method="seeds", **superpixels),
        "ViT": classification_processor(settings.image_size, superpixel_method="grid", **superpixels),
    }
    images = [image for image, _ in read_image_mask_pairs(test_examples, "object_mask")]
    references = {
        mask: ([mask_map for _, mask_map in read_image_mask_pairs(test_examples, mask)], num_labels)
        for mask, num_labels in MASKS.items()
    }
    classification = {}
    segmentation = {mask: {"num_images": len(images), "num_labels": MASKS[mask], "models": {}} for mask in MASKS}
    for suffix, (cast, vit) in model_pairs.items():
        for family, model in (("CAST", cast), ("ViT", vit)):
            scores = evaluate_classification(
                model,
                test_examples,
                classification_processors[family],
                train_examples,
                batch_size=settings.eval_batch_size,
            )
            classification[f"{family}{suffix}"] = {**scores, "parameters": count_parameters(model)}
        scores = evaluate_segmentation(
            cast,
            images,
            references,
            cast_segmentation,
            vit,
            vit_num_clusters=tuple(settings.num_clusters),
            vit_max_fit_pixels=settings.vit_max_fit_pixels,
            batch_size=settings.eval_batch_size,
            seed=settings.seed,
        )
        for mask, evaluation in scores.items():
            segmentation[mask]["models"][f"CAST{suffix}"] = evaluation["models"]["cast"]
            segmentation[mask]["models"][f"ViT{suffix}"] = evaluation["models"]["vit_kmeans"]
    return classification, segmentation


def reproduce_small(output_dir, settings=None):
    """Write the data, train CAST and the ViT, score them (and their untrained initialisations), and write
    `results.json` and `results.md` to `output_dir`. Returns the results dict (see `format_reproduction_report`).
    """
    settings = settings or ReproductionSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)
    try:
        return run_reproduction(Path(output_dir), settings)
    finally:
        torch.set_num_threads(threads)


def run_reproduction(output_dir, settings):
    """The body of `reproduce_small` (with the torch thread count already set)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(settings, output_dir / "data")
    splits = load_synthetic_dataset(data_dir)
    train_examples, test_examples = splits["train"], splits["test"]
    num_labels = train_examples.features["label"].num_classes

    model_pairs, training = {}, {}
    if settings.include_untrained:  # the initial weights of the trained models (same seeds)
        torch.manual_seed(settings.seed)
        untrained_cast = CastForImageClassification(settings.cast_config(num_labels)).eval()
        torch.manual_seed(settings.seed)
        untrained_vit = ViTForImageClassification(vit_config(settings, num_labels)).eval()
    start = time.perf_counter()
    cast, metrics = train_cast_classifier(settings, data_dir / "data", output_dir / "cast")
    training["CAST"] = {"seconds": time.perf_counter() - start, "final_metrics": metrics}
    start = time.perf_counter()
    vit, metrics = train_vit_classifier(settings, data_dir / "data", output_dir / "vit", num_labels)
    training["ViT"] = {"seconds": time.perf_counter() - start, "final_metrics": metrics}
    model_pairs[""] = (cast, vit)
    if settings.include_untrained:
        model_pairs[" (untrained)"] = (untrained_cast, untrained_vit)

    start = time.perf_counter()
    classification, segmentation = evaluate_models(model_pairs, settings, train_examples, test_examples)
    results = {
        "settings": dataclasses.asdict(settings),
        "training": training,
        "classification": classification,
        "segmentation": segmentation,
        "evaluation_seconds": time.perf_counter() - start,
    }
    results = to_jsonable(results)
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    (output_dir / REPORT_FILE).write_text(format_reproduction_report(results) + "\n", encoding="utf-8")
    return results


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def vit_display_name(name, settings):
    return name.replace("ViT", f"ViT/{settings['vit_patch_size']} + k-means", 1) if name.startswith("ViT") else name


def format_level_summary(scores_by_model, metric, num_clusters, settings):
    """One row per model, one column per level: `metric` of `segmentation_eval` scores."""
    header = " | ".join(f"level {level} ({clusters})" for level, clusters in zip(CAST_LEVELS, num_clusters))
    lines = [f"| model | {header} |", "|---|" + "---:|" * len(num_clusters)]
    for name, levels in scores_by_model.items():
        by_level = {score["level"]: score for score in levels}
        cells = [format_score(by_level.get(level, {}).get(metric)) for level in CAST_LEVELS]
        lines.append(f"| {vit_display_name(name, settings)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_reproduction_report(results):
    """Markdown: settings, classification table, per-level mIoU / boundary F summaries and the full tables."""
    settings = results["settings"]
    clusters = settings["num_clusters"]
    training = results["training"]
    lines = [
        f"Synthetic part-whole data: {settings['num_train_images']} training and {settings['num_test_images']} test "
        f"images of {settings['image_size']} px, {len(CLASS_NAMES)} shape classes. Both models: width "
        f"{settings['hidden_size']}, {sum(settings['depths'])} blocks, {settings['num_attention_heads']} heads, "
        f"{settings['train_steps']} steps of {settings['batch_size']} images, image labels only. CAST: "
        f"~{round(settings['num_superpixels'] * settings['image_size'] ** 2 / 224**2)} SEEDS superpixels, clusters "
        f"{'/'.join(map(str, clusters))}; ViT: {settings['vit_patch_size']} px patches, k-means into the same "
        "numbers of clusters. Time: training "
        + ", ".join(f"{name} {value['seconds'] / 60:.1f} min" for name, value in training.items())
        + f", evaluation {results['evaluation_seconds'] / 60:.1f} min ({settings['num_threads']} torch thread(s)).",
        "",
        "**Classification** (test split)",
        "",
        format_classification_table(
            {
                vit_display_name(name, settings).replace(" + k-means", ""): value
                for name, value in results["classification"].items()
            }
        ),
    ]
    for mask, evaluation in results["segmentation"].items():
        lines += [
            "",
            f"**Segmentation vs `{mask}`**: mIoU after majority-label assignment "
            f"({evaluation['num_labels']} labels, {evaluation['num_images']} images)",
            "",
            format_level_summary(evaluation["models"], "majority_mean_iou", clusters, settings),
            "",
            f"Boundary F-score (1 px) vs `{mask}`",
            "",
            format_level_summary(evaluation["models"], "boundary_fscore", clusters, settings),
        ]
    for mask, evaluation in results["segmentation"].items():
        names = {name: vit_display_name(name, settings) for name in evaluation["models"]}
        lines += [
            "",
            f"<details><summary>All scores vs <code>{mask}</code></summary>",
            "",
            format_segmentation_table(evaluation, names),
            "",
            "</details>",
        ]
    return "\n".join(lines)


__all__ = [
    "ReproductionSettings",
    "PixelClassifierObjective",
    "SuperpixelFreeClassifier",
    "evaluate_models",
    "format_reproduction_report",
    "prepare_data",
    "reproduce_small",
    "train_cast_classifier",
    "train_pixel_classifier",
    "training_run_arguments",
    "train_vit_classifier",
]
