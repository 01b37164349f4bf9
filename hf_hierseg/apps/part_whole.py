"""The decisive CPU-scale run: does CAST discover part-whole structure better than a ViT of the same size, when
low-level cues do not give the objects away?

Data: a camouflage synthetic variant (`evaluation.synthetic`), by default `"camouflage_large"`: one large object of a
shape class per image (about 26 % of the image, so it can be the majority of a coarse segment; `"camouflage"` has 2-3
small ones), object and background painted with one palette of textures, so only shapes and part layout tell objects
apart.

Models: a small CAST and a transformers ViT of the same width, depth, heads and MLP ratio (`reproduce.vit_config`:
8 px patches, 64 tokens on a 64 px image against CAST's ~49 superpixels), each trained with

- MoCo v3 (the paper's segmentation results come from a MoCo model): CAST with `training.recipes.train_moco`, the
  ViT with the same views, loss, momentum schedule and loop (`VitMocoObjective`: `benchmark_throughput.VitForMoco`
  in a `MocoStep`, the CLS token after the final norm as the image embedding, as CAST's);
- supervised image labels (`reproduce.train_cast_classifier` / `train_vit_classifier`, the light DeiT recipe),

for every seed of `seeds` (initialisation, data order and augmentations; the data are the same). The same models at
initialisation are scored too, with the floors of each score.

Scores on the held-out images, per level (CAST's levels 1..4; the ViT's k-means levels with as many segments):

- the authors' VOC protocol (`evaluation.segment_retrieval`): the segments of `num_memory_images` training images,
  labelled by majority, form the memory; each test segment takes the majority label of its 20 nearest memory
  segments (cosine of the segment prototypes: CAST's level tokens / the ViT's layers, `"levels"` embeddings); mIoU
  over background + the 6 classes. Floor: every pixel labelled background (`majority_class_floor`).
- majority-label mIoU of the segments against the object masks and boundary F (`segmentation_eval`). Floors: a
  regular grid with as many cells (`grid_partition`) and, for CAST, its superpixels grouped by that grid
  (`superpixel_grid_partition`).
- what the segments follow: the adjusted Rand index of each level's segments with (a) k-means of the pixels'
  colours into as many clusters and (b) the object instances (connected components of the object mask, background
  one region). High (a) and low (b): the grouping follows colour, not objects.

Did the models learn the classes? The classifiers' top-1 on the held-out images and every model's kNN accuracy
(`classification_eval`): retrieval can only label segments with classes if the embeddings tell the classes apart.

CPU time (user + system of this process and its finished children, `os.times`) is recorded per phase.
"""

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from transformers import ViTForImageClassification, ViTModel

from ..errors import InvalidInputError
from ..evaluation.baselines import make_vit_like
from ..evaluation.classification_eval import classification_processor, evaluate_classification
from ..evaluation.metrics import contingency_table
from ..evaluation.segment_retrieval import (
    CastRetrievalSegments,
    VitRetrievalSegments,
    evaluate_segment_retrieval,
    grid_partition,
    majority_class_floor,
    superpixel_grid_partition,
)
from ..evaluation.segmentation_eval import (
    CAST_LEVELS,
    format_score,
    predict_cast_levels,
    predict_vit_levels,
    read_image_mask_pairs,
    score_levels,
    to_jsonable,
)
from ..evaluation.synthetic import (
    CAMOUFLAGE_LAYOUTS,
    CLASS_NAMES,
    INFO_FILE,
    PART_NAMES,
    load_synthetic_dataset,
    write_synthetic_dataset,
)
from ..evaluation.views import evaluation_processor, square_view
from ..modeling_cast import CastForImageClassification, CastForSelfSupervisedPretraining
from ..segment_ops import resize_label_maps
from ..training.arguments import DataArguments, MocoArguments, ModelArguments, OptimizationArguments, OutputArguments
from ..training.augment import MOCO_VIEW_1, MOCO_VIEW_2, MocoTransform
from ..training.moco import MocoObjective
from ..training.optim import cosine_momentum
from ..training.recipes import TrainingRun, image_processor_for, train_moco
from .benchmark_throughput import MocoStep, VitForMoco
from .reproduce import ReproductionSettings, train_cast_classifier, train_vit_classifier, vit_config


logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
OBJECTIVES = ("moco", "supervised")
NUM_OBJECT_LABELS = len(CLASS_NAMES) + 1  # background + the classes
NUM_PART_LABELS = len(PART_NAMES)


@dataclasses.dataclass
class PartWholeSettings:
    """Data, models, the two training recipes and the evaluation of the run (defaults: about 20 CPU-minutes)."""

    variant: str = "camouflage_large"
    num_train_images: int = 2000
    num_test_images: int = 200
    num_memory_images: int = 250
    image_size: int = 64
    hidden_size: int = 96
    num_attention_heads: int = 4
    depths: tuple = (1, 1, 1, 1)
    num_clusters: tuple = (32, 16, 8, 4)
    graph_pooling_num_heads: int = 12
    num_superpixels: int = 600
    vit_patch_size: int = 8
    vit_max_fit_pixels: int = 1024
    seeds: tuple = (0, 1)
    objectives: tuple = OBJECTIVES
    batch_size: int = 32
    # Supervised: `reproduce`'s light DeiT recipe.
    supervised_steps: int = 400
    supervised_learning_rate: float = 1e-3
    # MoCo v3 as `examples/train_moco_small.py` (a small projector, no dropout in graph pooling, a momentum encoder
    # that keeps up in a short run).
    moco_steps: int = 200
    moco_learning_rate: float = 1.5e-3
    moco_weight_decay: float = 0.1
    moco_temperature: float = 0.2
    moco_momentum: float = 0.9
    moco_crop_min_scale: float = 0.2
    projection_dim: int = 64
    projection_hidden_dim: int = 256
    warmup_steps: int = 20
    top_k: int = 20
    include_untrained: bool = True
    dataloader_num_workers: int = 1
    eval_batch_size: int = 64
    num_threads: int = 1
    data_seed: int = 0

    def __post_init__(self):
        unknown = set(self.objectives) - set(OBJECTIVES)
        if unknown:
            raise InvalidInputError(f"Unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}.")
        if not self.seeds:
            raise InvalidInputError("Give at least one seed.")

    def reproduction_settings(self, seed):
        """`reproduce.ReproductionSettings` of the supervised runs (the same sizes, `seed`)."""
        shared = {field.name for field in dataclasses.fields(ReproductionSettings)} & set(dataclasses.asdict(self))
        return ReproductionSettings(
            **{name: getattr(self, name) for name in shared},
            train_steps=self.supervised_steps,
            learning_rate=self.supervised_learning_rate,
            seed=seed,
        )

    def moco_config_overrides(self):
        """`--config_overrides` of CAST's MoCo run."""
        return self.reproduction_settings(0).config_overrides() + [
            f"projection_dim={self.projection_dim}",
            f"projection_hidden_dim={self.projection_hidden_dim}",
            "pooling_dropout_prob=0.0",
        ]

    def cast_config(self):
        return self.reproduction_settings(0).cast_config()


def cpu_seconds():
    """User + system CPU seconds of this process and of its children that have finished (DataLoader workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


class VitMocoObjective(MocoObjective):
    """MoCo v3 of a transformers ViT for the training loop: `benchmark_throughput.VitForMoco` (backbone + projector +
    predictor) in a `MocoStep` (momentum backbone + projector), the loss, momentum schedule and card of
    `MocoObjective`. One process only (the keys of other processes are not gathered). Saves the ViT backbone."""

    def __init__(self, model, temperature=0.2, base_momentum=0.99):
        self.module = MocoStep(model, "vit", temperature)
        self.base_momentum = self.momentum = base_momentum

    def compute_loss(self, module, batch, step, micro_step, accelerator):
        if accelerator.num_processes > 1:
            raise InvalidInputError("The ViT MoCo objective runs on one process.")
        pixel_values = batch["pixel_values"]  # [B, 2, 3, H, W]
        return module([(pixel_values[:, view], None) for view in range(2)]), {}

    def after_optimizer_step(self, module, step, total_steps, accelerator):
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum)
        self.module.update_momentum(self.momentum)
        return {"momentum": self.momentum}

    def pretrained_model(self, module, accelerator):
        return self.module.model.vit


def moco_run_arguments(settings, data_dir, output_dir, seed, superpixel_method="seeds", model_args=None):
    """The dataclasses of `training.recipes.train_moco` (in `arguments.moco_parser()`'s order) for both models."""
    return (
        DataArguments(dataset_name=str(data_dir), dataloader_num_workers=settings.dataloader_num_workers),
        model_args or ModelArguments(superpixel_method=superpixel_method, num_superpixels=settings.num_superpixels),
        OptimizationArguments(
            per_device_train_batch_size=settings.batch_size,
            max_train_steps=settings.moco_steps,
            num_warmup_steps=settings.warmup_steps,
            learning_rate=settings.moco_learning_rate,
            weight_decay=settings.moco_weight_decay,
            seed=seed,
        ),
        OutputArguments(
            output_dir=str(output_dir), logging_steps=max(1, min(20, settings.moco_steps)), report_to="jsonl"
        ),
        MocoArguments(
            moco_temperature=settings.moco_temperature,
            moco_momentum=settings.moco_momentum,
            crop_min_scale=settings.moco_crop_min_scale,
        ),
    )


def train_cast_moco(settings, data_dir, output_dir, seed):
    """`training.recipes.train_moco` of a small CAST. Returns `(CastForSelfSupervisedPretraining, metrics)`."""
    model_args = ModelArguments(
        config_name="cast-small",
        config_overrides=settings.moco_config_overrides(),
        superpixel_method="seeds",
        num_superpixels=settings.num_superpixels,
    )
    metrics = train_moco(*moco_run_arguments(settings, data_dir, output_dir, seed, model_args=model_args))
    return CastForSelfSupervisedPretraining.from_pretrained(output_dir).eval(), metrics


def moco_views(crop_min_scale):
    return tuple(dataclasses.replace(view, crop_scale=(crop_min_scale, 1.0)) for view in (MOCO_VIEW_1, MOCO_VIEW_2))


def train_vit_moco(settings, data_dir, output_dir, seed):
    """MoCo v3 of the ViT of CAST's size with CAST's views, loss and loop. Returns `(ViTModel, metrics)`."""
    # The ViT's views need no superpixels: the cheapest method leaves them unchanged.
    arguments = moco_run_arguments(settings, data_dir, output_dir, seed, superpixel_method="grid")
    data_args, model_args, optimization_args, output_args, moco_args = arguments
    run = TrainingRun(data_args, model_args, optimization_args, output_args, recipe_args=(moco_args,))
    torch.manual_seed(seed)
    config = make_vit_like(settings.cast_config(), patch_size=settings.vit_patch_size)
    model = VitForMoco(config, settings.projection_dim, settings.projection_hidden_dim)
    objective = VitMocoObjective(model, settings.moco_temperature, settings.moco_momentum)
    processor = image_processor_for(model_args, settings.cast_config(), "self_supervised")
    transform = MocoTransform(processor, settings.image_size, views=moco_views(settings.moco_crop_min_scale))
    metrics = run.train(objective, transform, processor=None)
    return ViTModel.from_pretrained(output_dir, add_pooling_layer=False).eval(), metrics


def train_pair(settings, objective, data_dir, output_dir, seed, num_labels):
    """CAST and ViT trained with `objective` and `seed`: `{"CAST": (model, folder, metrics), "ViT": ...}`."""
    runs = {}
    if objective == "moco":
        trainers = {"CAST": train_cast_moco, "ViT": train_vit_moco}
        for family, trainer in trainers.items():
            folder = output_dir / f"{family.lower()}_moco_seed{seed}"
            start = cpu_seconds()
            model, metrics = trainer(settings, data_dir, folder, seed)
            runs[family] = (model, folder, {"cpu_seconds": cpu_seconds() - start, "final_metrics": metrics})
        return runs
    reproduction = settings.reproduction_settings(seed)
    for family in ("CAST", "ViT"):
        folder = output_dir / f"{family.lower()}_supervised_seed{seed}"
        start = cpu_seconds()
        if family == "CAST":
            model, metrics = train_cast_classifier(reproduction, data_dir, folder)
        else:
            model, metrics = train_vit_classifier(reproduction, data_dir, folder, num_labels)
        runs[family] = (model, folder, {"cpu_seconds": cpu_seconds() - start, "final_metrics": metrics})
    return runs


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def adjusted_rand_index(prediction, reference):
    """Adjusted Rand index of two label maps of one image (1 = the same partition, about 0 = unrelated)."""
    _, _, table = contingency_table(prediction, reference)
    pairs = lambda counts: (counts * (counts - 1) / 2.0).sum()  # noqa: E731
    total = pairs(np.array([table.sum()]))
    both, rows, columns = pairs(table.astype(np.float64)), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * columns / total if total else 0.0
    maximum = (rows + columns) / 2.0
    return float((both - expected) / (maximum - expected)) if maximum != expected else 1.0


def colour_clusters(image, num_clusters, seed=0):
    """k-means (OpenCV, k-means++ seeding, fixed seed) of an image's pixel colours: int64 `[H, W]`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    _, labels, _ = cv2.kmeans(pixels, int(num_clusters), None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return labels.reshape(image.height, image.width).astype(np.int64)


def object_instances(object_mask):
    """Connected components of the object pixels (8-connected), background 0: int64 `[H, W]`."""
    _, instances = cv2.connectedComponents((np.asarray(object_mask) > 0).astype(np.uint8), connectivity=8)
    return instances.astype(np.int64)


def what_segments_follow(predictions, colour_maps, instance_maps):
    """Per level, the mean adjusted Rand index of the segments with the colour clusters of as many clusters
    (`colour_maps[level]`) and with the object instances."""
    return [
        {
            "ari_colour": float(np.mean([adjusted_rand_index(p, c) for p, c in zip(level, colours)])),
            "ari_instances": float(np.mean([adjusted_rand_index(p, i) for p, i in zip(level, instance_maps)])),
        }
        for level, colours in zip(predictions, colour_maps)
    ]


@dataclasses.dataclass
class EvaluationData:
    """The held-out images and masks, the memory images, and the per-level colour clusters of the held-out images."""

    queries: list
    memory: list
    part_masks: list
    colour_maps: list
    instance_maps: list


def evaluation_data(settings, train_examples, test_examples):
    queries = read_image_mask_pairs(test_examples, "object_mask")
    memory = read_image_mask_pairs(train_examples, "object_mask", max_samples=settings.num_memory_images)
    parts = [mask for _, mask in read_image_mask_pairs(test_examples, "part_mask")]
    colours = [[colour_clusters(image, clusters) for image, _ in queries] for clusters in settings.num_clusters]
    instances = [object_instances(mask) for _, mask in queries]
    return EvaluationData(queries, memory, parts, colours, instances)


def cast_processors(settings, model_dir=None):
    """`(segmentation processor, retrieval processor)` of a CAST model: its saved superpixel settings (a trained
    folder), else SEEDS with `settings.num_superpixels` and the supervised recipe (as `reproduce`)."""
    superpixels = {}
    if model_dir is None:
        superpixels = {
            "superpixel_method": "seeds",
            "num_superpixels": settings.num_superpixels,
            "seeds_recipe": "supervised",
        }
    return (
        evaluation_processor(square_view(settings.image_size), model_dir, **superpixels),
        evaluation_processor({"do_resize": False, "do_center_crop": False}, model_dir, **superpixels),
    )


def evaluate_models(cast, vit, settings, data, cast_dir=None):
    """Every score of one CAST and one ViT (see the module docstring): `{"CAST": {...}, "ViT": {...}}`, each with
    `retrieval`, `object` and `part` (per-level `segmentation_eval` scores) and `follows` (adjusted Rand indices)."""
    images, masks = [image for image, _ in data.queries], [mask for _, mask in data.queries]
    sizes = [mask.shape for mask in masks]
    segmentation, retrieval = cast_processors(settings, cast_dir)
    levels, clusters = CAST_LEVELS, tuple(settings.num_clusters)
    predictions = {
        "CAST": predict_cast_levels(cast, images, segmentation, sizes, levels, settings.eval_batch_size),
        "ViT": predict_vit_levels(
            vit, images, clusters, sizes, settings.eval_batch_size, max_fit_pixels=settings.vit_max_fit_pixels
        ),
    }
    grid_processor = evaluation_processor({"do_resize": False, "do_center_crop": False}, superpixel_method="grid")
    segmenters = {
        "CAST": CastRetrievalSegments(cast, retrieval, levels=levels, embedding="levels"),
        "ViT": VitRetrievalSegments(
            vit, grid_processor, clusters, levels=levels, max_fit_pixels=settings.vit_max_fit_pixels
        ),
    }
    results = {}
    for family, family_predictions in predictions.items():
        results[family] = {
            "retrieval": evaluate_segment_retrieval(
                segmenters[family],
                data.memory,
                data.queries,
                NUM_OBJECT_LABELS,
                settings.image_size,
                top_k=settings.top_k,
                batch_size=settings.eval_batch_size,
            ),
            "object": score_levels(family_predictions, levels, masks, NUM_OBJECT_LABELS),
            "part": score_levels(family_predictions, levels, data.part_masks, NUM_PART_LABELS),
            "follows": what_segments_follow(family_predictions, data.colour_maps, data.instance_maps),
        }
    return results


def classification_scores(cast, vit, settings, train_examples, test_examples):
    """Did the models learn the classes? Per family, the top-1 accuracy of a classifier (supervised / untrained) on
    the held-out images and the weighted kNN accuracy of every model's image embedding (CLS token) among the
    embeddings of the `num_memory_images` memory images: `{"CAST": {...}, "ViT": {...}}`."""
    superpixels = {"num_superpixels": settings.num_superpixels, "seeds_recipe": "supervised"}
    processors = {  # the ViT ignores superpixels: the cheapest method
        "CAST": classification_processor(settings.image_size, superpixel_method="seeds", **superpixels),
        "ViT": classification_processor(settings.image_size, superpixel_method="grid", **superpixels),
    }
    return {
        family: evaluate_classification(
            model,
            test_examples,
            processors[family],
            train_examples,
            top_k=(1,),
            batch_size=settings.eval_batch_size,
            max_train_samples=settings.num_memory_images,
        )
        for family, model in (("CAST", cast), ("ViT", vit))
    }


def floor_scores(settings, data):
    """The floors: majority-class retrieval; grid and superpixels-by-grid segments for majority mIoU / boundary F."""
    masks = [mask for _, mask in data.queries]
    images = [image for image, _ in data.queries]
    grids = [[grid_partition(*mask.shape, clusters) for mask in masks] for clusters in settings.num_clusters]
    segmentation, _ = cast_processors(settings)
    superpixels = segmentation(images=images, return_tensors="np")["superpixels"]
    superpixels = [resize_label_maps(label_map, mask.shape) for label_map, mask in zip(superpixels, masks)]
    grouped = [[superpixel_grid_partition(sp, clusters) for sp in superpixels] for clusters in settings.num_clusters]
    return {
        "retrieval": majority_class_floor([mask for _, mask in data.memory], masks, NUM_OBJECT_LABELS),
        "grid": score_levels(grids, CAST_LEVELS, masks, NUM_OBJECT_LABELS),
        "superpixels_by_grid": score_levels(grouped, CAST_LEVELS, masks, NUM_OBJECT_LABELS),
        "grid_follows": what_segments_follow(grids, data.colour_maps, data.instance_maps),
    }


# --------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------


def prepare_data(settings, data_dir):
    """Write the synthetic dataset (parquet) unless `data_dir` already holds one with the same settings."""
    data_dir = Path(data_dir)
    wanted = {
        "image_size": settings.image_size,
        "seed": settings.data_seed,
        "variant": settings.variant,
        "splits": {"train": settings.num_train_images, "test": settings.num_test_images},
        "format": "parquet",
    }
    info_file = data_dir / INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        if all(info.get(key, "contrasting" if key == "variant" else None) == value for key, value in wanted.items()):
            return data_dir
        raise InvalidInputError(
            f"{data_dir} holds a synthetic dataset with other settings ({info}); use another folder."
        )
    return write_synthetic_dataset(
        data_dir,
        num_images=settings.num_train_images,
        num_test_images=settings.num_test_images,
        image_size=settings.image_size,
        format="parquet",
        seed=settings.data_seed,
        variant=settings.variant,
    )


def untrained_pair(settings, num_labels, seed):
    """CAST and ViT at the initialisation of the supervised runs of `seed`."""
    reproduction = settings.reproduction_settings(seed)
    torch.manual_seed(seed)
    cast = CastForImageClassification(reproduction.cast_config(num_labels)).eval()
    torch.manual_seed(seed)
    vit = ViTForImageClassification(vit_config(reproduction, num_labels)).eval()
    return cast, vit


def part_whole_run(output_dir, settings=None):
    """Write the data, train and score every model (and the untrained pair and the floors), and write
    `results.json` and `results.md` to `output_dir`. Returns the results dict (see `format_part_whole_report`)."""
    settings = settings or PartWholeSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)
    try:
        return run_part_whole(Path(output_dir), settings)
    finally:
        torch.set_num_threads(threads)


def run_part_whole(output_dir, settings):
    """The body of `part_whole_run` (with the torch thread count already set)."""
    start_cpu, start_wall = cpu_seconds(), time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(settings, output_dir / "data")
    splits = load_synthetic_dataset(data_dir)
    train_examples, test_examples = splits["train"], splits["test"]
    num_labels = train_examples.features["label"].num_classes
    data = evaluation_data(settings, train_examples, test_examples)
    cpu = {"data": cpu_seconds() - start_cpu}

    models = {}  # (objective, seed) -> {"CAST": (model, folder, training), "ViT": ...}
    for seed in settings.seeds:
        for objective in settings.objectives:
            models[(objective, seed)] = train_pair(
                settings, objective, data_dir / "data", output_dir, seed, num_labels
            )
    cpu["training"] = cpu_seconds() - start_cpu - cpu["data"]

    evaluation_start = cpu_seconds()
    runs = []
    for (objective, seed), pair in models.items():
        cast, vit = pair["CAST"][0], pair["ViT"][0]
        scores = evaluate_models(cast, vit, settings, data, cast_dir=pair["CAST"][1])
        classification = classification_scores(cast, vit, settings, train_examples, test_examples)
        for family, (_, folder, training) in pair.items():
            runs.append(
                {
                    "model": family,
                    "objective": objective,
                    "seed": seed,
                    "training": training,
                    "classification": classification[family],
                    **scores[family],
                }
            )
    if settings.include_untrained:
        cast, vit = untrained_pair(settings, num_labels, settings.seeds[0])
        scores = evaluate_models(cast, vit, settings, data)
        classification = classification_scores(cast, vit, settings, train_examples, test_examples)
        for family in ("CAST", "ViT"):
            runs.append(
                {
                    "model": family,
                    "objective": "untrained",
                    "seed": settings.seeds[0],
                    "classification": classification[family],
                    **scores[family],
                }
            )
    floors = floor_scores(settings, data)
    cpu["evaluation"] = cpu_seconds() - evaluation_start
    cpu["total"] = cpu_seconds() - start_cpu
    results = to_jsonable(
        {
            "settings": dataclasses.asdict(settings),
            "runs": runs,
            "floors": floors,
            "cpu_seconds": cpu,
            "wall_seconds": time.perf_counter() - start_wall,
        }
    )
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    (output_dir / REPORT_FILE).write_text(format_part_whole_report(results) + "\n", encoding="utf-8")
    return results


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def seed_cell(values, digits=3):
    """`mean (seed values)` of the finite values, `-` if none."""
    values = [value for value in values if value is not None and not math.isnan(value)]
    if not values:
        return "-"
    mean = format_score(float(np.mean(values)), digits)
    return mean if len(values) == 1 else f"{mean} ({' / '.join(format_score(value, digits) for value in values)})"


def level_table(results, section, metric, floors=()):
    """Markdown: one row per (model, objective), one column per level, `metric` of `section` averaged over seeds
    (the seeds' values in brackets); then the floors, given as `(name, per-level scores)`."""
    clusters = results["settings"]["num_clusters"]
    header = " | ".join(f"L{level} ({count})" for level, count in zip(CAST_LEVELS, clusters))
    lines = [f"| model | training | {header} |", "|---|---|" + "---:|" * len(clusters)]
    groups = {}
    for run in results["runs"]:
        groups.setdefault((run["model"], run["objective"]), []).append(run)
    for (model, objective), runs in groups.items():
        cells = [seed_cell([run[section][index][metric] for run in runs]) for index in range(len(clusters))]
        name = "CAST" if model == "CAST" else f"ViT/{results['settings']['vit_patch_size']} + k-means"
        lines.append(f"| {name} | {objective} | " + " | ".join(cells) + " |")
    for name, scores in floors:
        lines.append(f"| *floor: {name}* | | " + " | ".join(format_score(score[metric]) for score in scores) + " |")
    return "\n".join(lines)


def objects_per_image(variant):
    """How many objects of one class a `variant` image shows, and how large (words)."""
    layout = CAMOUFLAGE_LAYOUTS.get(variant)
    if layout is None:
        return "one object per image"
    low, high = layout.objects
    count = "one object" if high == 1 else f"{low}-{high} objects of one class"
    return f"{count} per image, {layout.scale[0]:g}-{layout.scale[1]:g} of the image side high"


def classification_table(results):
    """Markdown: per (model, objective), the classifier's top-1 on the held-out images and the kNN accuracy of the
    image embedding, averaged over seeds (the seeds' values in brackets); chance is 1 / number of classes."""
    lines = ["| model | training | top-1 | kNN |", "|---|---|---:|---:|"]
    groups = {}
    for run in results["runs"]:
        groups.setdefault((run["model"], run["objective"]), []).append(run.get("classification", {}))
    for (model, objective), scores in groups.items():
        cells = [seed_cell([score.get(metric) for score in scores]) for metric in ("top1_accuracy", "knn_accuracy")]
        name = "CAST" if model == "CAST" else f"ViT/{results['settings']['vit_patch_size']}"
        lines.append(f"| {name} | {objective} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_part_whole_report(results):
    """Markdown: the settings, the three score tables (retrieval, majority-label mIoU, boundary F) and what the
    segments follow."""
    settings, floors, cpu = results["settings"], results["floors"], results["cpu_seconds"]
    retrieval_floor = floors["retrieval"]
    constant = [{"mean_iou": retrieval_floor["mean_iou"]} for _ in settings["num_clusters"]]
    lines = [
        f"`{settings['variant']}` synthetic data: {settings['num_train_images']} training and "
        f"{settings['num_test_images']} test images of {settings['image_size']} px, {len(CLASS_NAMES)} shape classes "
        f"({objects_per_image(settings['variant'])}). CAST and ViT: width {settings['hidden_size']}, "
        f"{sum(settings['depths'])} blocks, {settings['num_attention_heads']} heads; CAST "
        f"~{round(settings['num_superpixels'] * settings['image_size'] ** 2 / 224**2)} SEEDS superpixels, clusters "
        f"{'/'.join(map(str, settings['num_clusters']))}; ViT {settings['vit_patch_size']} px patches, k-means into "
        f"as many segments. MoCo v3: {settings['moco_steps']} steps; supervised: {settings['supervised_steps']} "
        f"steps; batch {settings['batch_size']}; seeds {', '.join(map(str, settings['seeds']))} (mean, then each "
        f"seed's value). CPU time: data {cpu['data'] / 60:.1f} min, training {cpu['training'] / 60:.1f} min, "
        f"evaluation {cpu['evaluation'] / 60:.1f} min, total {cpu['total'] / 60:.1f} min "
        f"(wall {results['wall_seconds'] / 60:.1f} min).",
        "",
        f"**Did the models learn the classes?** Top-1 of the classifier on the held-out images (MoCo models have none)"
        f" and weighted kNN accuracy (20 nearest) of the image embedding among the {settings['num_memory_images']} "
        f"memory images; chance {1 / len(CLASS_NAMES):.3f}",
        "",
        classification_table(results),
        "",
        f"**The authors' protocol** (segment retrieval, {settings['top_k']} nearest of the segments of "
        f"{settings['num_memory_images']} training images): mIoU over background + {len(CLASS_NAMES)} classes",
        "",
        level_table(results, "retrieval", "mean_iou", [("all background", constant)]),
        "",
        "**Majority-label mIoU** of the segments against the object masks",
        "",
        level_table(
            results,
            "object",
            "majority_mean_iou",
            [("grid", floors["grid"]), ("superpixels grouped by the grid", floors["superpixels_by_grid"])],
        ),
        "",
        "**Boundary F** (1 px) against the object masks",
        "",
        level_table(
            results,
            "object",
            "boundary_fscore",
            [("grid", floors["grid"]), ("superpixels grouped by the grid", floors["superpixels_by_grid"])],
        ),
        "",
        "**What the segments follow**: adjusted Rand index with k-means of the pixel colours (as many clusters)",
        "",
        level_table(results, "follows", "ari_colour", [("grid", floors["grid_follows"])]),
        "",
        "... and with the object instances (each object one region, the background one region)",
        "",
        level_table(results, "follows", "ari_instances", [("grid", floors["grid_follows"])]),
    ]
    return "\n".join(lines)


__all__ = [
    "PartWholeSettings",
    "VitMocoObjective",
    "adjusted_rand_index",
    "colour_clusters",
    "cpu_seconds",
    "evaluate_models",
    "floor_scores",
    "format_part_whole_report",
    "object_instances",
    "part_whole_run",
    "prepare_data",
    "train_cast_moco",
    "train_vit_moco",
    "what_segments_follow",
]
