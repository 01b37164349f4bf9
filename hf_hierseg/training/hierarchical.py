"""Hierarchical classification training (H-CAST, `scripts/train_hierarchical.py`, `hf-hierseg train-hierarchical`):
the shared assembly (`recipes.TrainingRun`) with DeiT's views and a `CastForHierarchicalImageClassification`
(or any model with `logits_per_level` and the H-CAST loss, e.g. a ViT with level heads).

- Labels per level come from one dataset column per level (`--label_column_names`, finest first) or from the finest
  label alone (`--label_column_name`), the coarser ones derived through the taxonomy (`--taxonomy`, or the one of
  `--model_name_or_path` when it is an H-CAST model).
- Mixup / CutMix as the authors' `mixup_hier`: each level's one-hot target smoothed by `--label_smoothing`, then the
  images and every level's targets mixed with the flipped batch with **one** lambda shared by all levels; the loss is
  the model's (`modeling_cast.hierarchical_classification_loss`: per-level cross-entropies + `--tree_path_kl_weight`
  x the tree-path KL term). Without mixing the model gets the integer labels and smooths them itself.
- The model starts from `--model_name_or_path` (a CAST backbone or classifier: new level heads; an H-CAST model: its
  heads) or from `--config_name`.
- Evaluation: per-level top-1, full-path accuracy and tree consistency (`metrics.hierarchical_accuracy`).
"""

import functools
from dataclasses import dataclass, field

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate.utils import gather_object

from ..configuration_cast import hierarchy_paths
from ..convert import read_taxonomy
from ..errors import InvalidInputError
from ..evaluation.hierarchical_eval import level_labels
from ..evaluation.metrics import hierarchical_accuracy
from ..image_datasets import label_column_of
from ..modeling_cast import CastForHierarchicalImageClassification, hierarchy_targets
from .arguments import (
    DataArguments,
    EvaluationArguments,
    ModelArguments,
    OutputArguments,
    SupervisedArguments,
    SupervisedOptimizationArguments,
    TrainingArgumentParser,
    check_non_negative,
)
from .augment import ProcessorTransform
from .data import SuperpixelBatches
from .recipes import Evaluation, TrainingRun, check_model_source, deit_transform, load_or_create, supervised_objective
from .supervised import SupervisedObjective, mixup_cutmix


@dataclass
class HierarchicalArguments(SupervisedArguments):
    """H-CAST's recipe (`training.hierarchical`): DeiT's settings plus the taxonomy and the tree-path KL term.
    `--label_column_name` is the finest label (default: the first ClassLabel column)."""

    _argument_group_name = "H-CAST recipe"

    taxonomy: str | None = field(
        default=None,
        metadata={
            "help": "Taxonomy JSON (a local path or hf://<owner>/<repo>/<file>): an object with `levels` (finest "
            "first: name, classes, parent) or H-CAST's data/*_tree.json rows [fine, coarse(, coarser)]. Default: "
            "the taxonomy of --model_name_or_path."
        },
    )
    label_column_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "One label column per taxonomy level, finest first (default: derive the coarser levels from "
            "the finest label through the taxonomy)."
        },
    )
    tree_path_kl_weight: float = field(default=0.5, metadata={"help": "Weight of the tree-path KL term (0 disables)."})
    hierarchy_cast_levels: list[int] | None = field(
        default=None,
        metadata={
            "help": "CAST level (1..4) whose CLS token each label level reads, finest first (default: the authors', "
            "e.g. 3 4 for two levels; 4 4 reads every level from the final CLS token)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_non_negative(self, "tree_path_kl_weight")


HIERARCHICAL_ARGUMENTS = (
    DataArguments,
    ModelArguments,
    SupervisedOptimizationArguments,
    OutputArguments,
    EvaluationArguments,
    HierarchicalArguments,
)


def hierarchical_parser():
    """Parser of `scripts/train_hierarchical.py`: `HIERARCHICAL_ARGUMENTS`, in `train_hierarchical`'s order."""
    return TrainingArgumentParser(
        HIERARCHICAL_ARGUMENTS,
        description="Hierarchical classification with H-CAST: a CAST level per taxonomy level (Accelerate).",
    )


# ---------------------------------------------------------------------------------------------------------------
# Labels per level
# ---------------------------------------------------------------------------------------------------------------


class HierarchyBatches(SuperpixelBatches):
    """`SuperpixelBatches` whose `labels` are int64 `[L]` per sample (`[B, L]` per batch, finest first): the record's
    `label_columns`, or its finest label (`label_column`) and its ancestors in the taxonomy `paths` (see
    `evaluation.hierarchical_eval.level_labels`)."""

    def __init__(self, dataset, transform, batch_size, image_column, label_column=None, *, paths, label_columns=None,
                 **kwargs):  # fmt: skip
        super().__init__(dataset, transform, batch_size, image_column, label_column, **kwargs)
        self.paths = paths
        self.label_columns = label_columns

    def make_sample(self, example, image, rng):
        sample = self.transform(image, rng)
        labels = level_labels(example, self.paths, self.label_columns, self.label_column)
        sample["labels"] = torch.tensor(labels, dtype=torch.long)
        return sample


@dataclass
class HierarchyLabels:
    """The target of hierarchical classification (for `recipes.TrainingRun.train`): class ids per taxonomy level.

    Args:
        paths: the taxonomy's rows `[fine, ..., coarsest]`, one per finest class (`CastConfig.hierarchy_paths()`).
        column_names: one label column per level, finest first; or None to derive them from `finest_column_name`.
        finest_column_name: the finest label's column (default: the first ClassLabel column).
    """

    paths: tuple
    column_names: tuple | None = None
    finest_column_name: str | None = None

    @property
    def batches_class(self):
        return functools.partial(HierarchyBatches, paths=self.paths, label_columns=self.column_names)

    def column(self, split, image_column):
        if not self.column_names:
            return label_column_of(split, self.finest_column_name)
        if len(self.column_names) != len(self.paths[0]):
            raise InvalidInputError(
                f"--label_column_names needs one column per taxonomy level ({len(self.paths[0])}, finest first), "
                f"got {list(self.column_names)}."
            )
        columns = split.features or {}
        missing = [name for name in self.column_names if columns and name not in columns]
        if missing:
            raise InvalidInputError(f"--label_column_names: no column(s) {missing}; columns: {list(columns)}.")
        return self.column_names[0]


def set_run_taxonomy(config, hierarchical_args, split):
    """Give `config` the run's taxonomy (`CastConfig.set_taxonomy`): `--taxonomy`, else the taxonomy the config
    already has (the finest level's class names from the dataset's ClassLabel when neither names them), with
    `--hierarchy_cast_levels` (else the config's, else the authors'), `--label_smoothing` and
    `--tree_path_kl_weight`. Returns `config`."""
    if hierarchical_args.taxonomy is not None:
        fields = read_taxonomy(hierarchical_args.taxonomy)
    elif getattr(config, "hierarchy_num_labels", None):
        fields = {
            name: getattr(config, name)
            for name in ("hierarchy_num_labels", "hierarchy_parents", "hierarchy_id2label", "hierarchy_level_names")
        }
    else:
        raise InvalidInputError(
            "Give the taxonomy with --taxonomy (a taxonomy.json with `levels`, or rows [fine, coarse(, coarser)]): "
            "--model_name_or_path / --config_name has none."
        )
    counts = tuple(fields["hierarchy_num_labels"])
    unnamed = [{index: f"LABEL_{index}" for index in range(count)} for count in counts]
    names = list(fields.get("hierarchy_id2label") or unnamed)
    if names[0] == unnamed[0] and not hierarchical_args.label_column_names:
        feature = (split.features or {}).get(label_column_of(split, hierarchical_args.label_column_name))
        if isinstance(feature, datasets.ClassLabel) and feature.num_classes == counts[0]:
            names[0] = dict(enumerate(feature.names))
    cast_levels = hierarchical_args.hierarchy_cast_levels
    if cast_levels is None and len(getattr(config, "hierarchy_cast_levels", None) or ()) == len(counts):
        cast_levels = config.hierarchy_cast_levels
    config.hierarchy_label_smoothing = hierarchical_args.label_smoothing
    config.tree_path_kl_weight = hierarchical_args.tree_path_kl_weight
    config.set_taxonomy(counts, fields["hierarchy_parents"], names, fields.get("hierarchy_level_names"), cast_levels)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Objective and evaluation
# ---------------------------------------------------------------------------------------------------------------


def mix_targets(targets, lam):
    """Dense targets mixed with the flipped batch, as Mixup / CutMix mix the images (`supervised.mixup_cutmix`)."""
    return targets * lam + targets.flip(0) * (1.0 - lam)


def level_accuracies(logits_per_level, labels):
    """(top-1 accuracy per level, full-path accuracy) of one batch; `labels` int64 [B, L]."""
    correct = torch.stack([logits.argmax(-1) == labels[:, level] for level, logits in enumerate(logits_per_level)], 1)
    return correct.float().mean(0).tolist(), correct.all(1).float().mean().item()


class HierarchicalObjective(SupervisedObjective):
    """The H-CAST objective for `hf_hierseg.training.loop.train`: the model's hierarchical loss on integer labels
    [B, L], or on Mixup / CutMix targets mixed with one lambda for all levels (module docstring). The model is a
    `CastForHierarchicalImageClassification` or any model whose config has `hierarchy_num_labels` and whose output
    has `loss` and `logits_per_level`."""

    name = "hierarchical image classification (H-CAST recipe)"

    def compute_loss(self, module, batch, step, micro_step, accelerator):
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        counts = tuple(self.module.config.hierarchy_num_labels)
        if self.mixing:
            # One generator per (step, micro-batch, rank): a resumed run mixes exactly as the interrupted one. The
            # images are mixed once; the lambda it returns mixes every level's targets.
            rng = np.random.default_rng([self.seed, step, micro_step, accelerator.process_index])
            pixel_values, _, lam, _ = mixup_cutmix(
                pixel_values,
                labels[:, 0],
                counts[0],
                rng,
                self.mixup_alpha,
                self.cutmix_alpha,
                self.mix_probability,
                self.switch_probability,
                self.label_smoothing,
            )
            targets = mix_targets(torch.cat(hierarchy_targets(labels, counts, self.label_smoothing), dim=1), lam)
            outputs = module(pixel_values=pixel_values, superpixels=batch["superpixels"], labels=targets)
            return outputs.loss, {"mix_lambda": lam}
        outputs = module(pixel_values=pixel_values, superpixels=batch["superpixels"], labels=labels)
        per_level, full_path = level_accuracies(outputs.logits_per_level, labels)
        metrics = {f"train_accuracy_level{level}": value for level, value in enumerate(per_level)}
        return outputs.loss, {**metrics, "train_full_path_accuracy": full_path}

    def card_details(self):
        config = self.module.config
        names = getattr(config, "hierarchy_level_names", None) or range(len(config.hierarchy_num_labels))
        taxonomy = " -> ".join(f"{name} ({count})" for name, count in zip(names, config.hierarchy_num_labels))
        details = {"taxonomy": taxonomy, "tree-path KL weight": config.tree_path_kl_weight}
        if getattr(config, "hierarchy_cast_levels", None):
            details["CAST levels read"] = ", ".join(map(str, config.hierarchy_cast_levels))
        return {**details, **super().card_details()}


@torch.no_grad()
def evaluate_hierarchical_classifier(model, batches, accelerator, paths):
    """Per-level top-1, full-path accuracy, tree consistency and mean loss of `model` (unwrapped) over (batch,
    skipped) pairs, all processes (`metrics.hierarchical_accuracy` on the gathered predictions)."""
    was_training = model.training
    model.eval()
    predictions, references, losses, skipped = [], [], [], 0
    for batch, batch_skipped in batches:
        skipped += batch_skipped
        if "pixel_values" not in batch:
            continue
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        outputs = model(pixel_values=batch["pixel_values"], superpixels=batch["superpixels"], labels=batch["labels"])
        predictions += torch.stack([z.argmax(-1) for z in outputs.logits_per_level], 1).cpu().tolist()
        references += batch["labels"].cpu().tolist()
        losses.append((outputs.loss.item(), len(batch["labels"])))
    model.train(was_training)
    predictions, references = gather_object(predictions), gather_object(references)
    losses, skipped = gather_object(losses), int(sum(gather_object([skipped])))
    if not references:
        return {"eval_samples": 0, "eval_skipped_images": skipped}
    scores = hierarchical_accuracy(np.asarray(predictions), np.asarray(references), paths)
    names = getattr(model.config, "hierarchy_level_names", None) or [f"level{k}" for k in range(len(paths[0]))]
    metrics = {f"eval_accuracy_{name}": value for name, value in zip(names, scores["top1_accuracy_per_level"])}
    return {
        **metrics,
        "eval_full_path_accuracy": scores["full_path_accuracy"],
        "eval_tree_consistency": scores["tree_consistency"],
        "eval_loss": sum(loss * count for loss, count in losses) / len(references),
        "eval_samples": len(references),
        "eval_skipped_images": skipped,
    }


# ---------------------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------------------


def train_hierarchical(
    data_args, model_args, optimization_args, output_args, evaluation_args, hierarchical_args, model=None
):
    """Train a `CastForHierarchicalImageClassification`, with the dataclasses of `hierarchical_parser()` in its
    order. `model`: train this model instead (e.g. a ViT with level heads and the same loss; its config must hold
    the taxonomy); `--model_name_or_path` / `--config_name` then only name the image processor's settings. Returns
    the final metrics."""
    run = TrainingRun(
        data_args, model_args, optimization_args, output_args, evaluation_args, recipe_args=(hierarchical_args,)
    )
    if model is None:
        check_model_source(model_args)
        config = set_run_taxonomy(run.config(), hierarchical_args, run.train_split)
        model = load_or_create(
            CastForHierarchicalImageClassification, model_args, config, hierarchical_args.ignore_mismatched_sizes
        )
    config = model.config
    if not getattr(config, "hierarchy_num_labels", None):
        raise InvalidInputError("The model to train has no taxonomy (`config.hierarchy_num_labels`).")
    paths = hierarchy_paths(config)
    ema_decay = hierarchical_args.model_ema_decay if hierarchical_args.model_ema else None
    objective = supervised_objective(
        model, optimization_args, hierarchical_args, ema_decay, objective_class=HierarchicalObjective
    )
    processor = run.image_processor(config, "supervised", resample=PIL.Image.BICUBIC)
    targets = HierarchyLabels(
        paths,
        tuple(hierarchical_args.label_column_names) if hierarchical_args.label_column_names else None,
        hierarchical_args.label_column_name,
    )
    evaluation = Evaluation(
        ProcessorTransform(processor), functools.partial(evaluate_hierarchical_classifier, paths=paths)
    )
    return run.train(
        objective,
        deit_transform(processor, run.view_size(config), hierarchical_args),
        processor,
        targets=targets,
        evaluation=evaluation,
        find_unused_parameters=not getattr(config, "freeze_last_pooling", False),
    )


__all__ = [
    "HIERARCHICAL_ARGUMENTS",
    "HierarchicalArguments",
    "HierarchicalObjective",
    "HierarchyBatches",
    "HierarchyLabels",
    "evaluate_hierarchical_classifier",
    "hierarchical_parser",
    "mix_targets",
    "set_run_taxonomy",
    "train_hierarchical",
]
