"""Convert the authors' CAST checkpoints (MoCo-v3, DeiT, bare state dicts) and H-CAST checkpoints into
`save_pretrained` directories. Checkpoints and taxonomy files are read from local paths or from Hub repos
(`hf://<owner>/<repo>[@<revision>]/<path in the repo>`, see `resolve_source`)."""

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import torch

from .configuration_cast import CAST_PRESETS, NUM_LEVELS, CastConfig
from .errors import InvalidInputError, MissingInputError
from .modeling_cast import (
    CastForHierarchicalImageClassification,
    CastForImageClassification,
    CastForSelfSupervisedPretraining,
    CastForSemanticSegmentation,
    CastModel,
    sincos_position_grid,
)


EXPECTED_KEYS_HELP = (
    "a CAST checkpoint holds `cls_token`, `patch_embed.proj.*`, `blocks{l}.{i}.*` and `pool{l}.pool_block.*` "
    "(optionally under `module.base_encoder.` in a MoCo-v3 `state_dict`, or under `model` in a DeiT checkpoint)"
)

# Graph pooling submodules: original name -> ours.
POOLING_RENAMES = {
    "centroid_fc.": "centroid_fc.",
    "fc1.0.": "token_norm.",
    "fc1.1.": "token_expand.",
    "fc2.0.": "cluster_norm.",
    "fc2.1.": "cluster_project.",
}

# H-CAST's level heads (cast_deit_hier.py), finest level first: `head` (species / variant), `family_head`,
# `manufacturer_head` (order / manufacturer; only in 3-level checkpoints).
HCAST_HEADS = ("head.", "family_head.", "manufacturer_head.")
HUB_PREFIX = "hf://"
HUB_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}

# cast_seg's BlockFusion (`proj_blocks` = [_BatchNorm1d wrapper, Dropout, Linear]): original prefix -> ours.
FUSION_RENAMES = {
    "block_fusion.proj_blocks.0.norm.": "fusion.batch_norm.",
    "block_fusion.proj_blocks.2.": "fusion.projection.",
}


@dataclass
class ConversionReport:
    source_format: str
    model_class: str
    config: CastConfig
    kept: dict = field(default_factory=dict)  # original key -> new key
    dropped: dict = field(default_factory=dict)  # original key -> reason
    checks: list = field(default_factory=list)  # what was verified beyond the keys (e.g. the taxonomy)

    def lines(self):
        yield f"source format: {self.source_format}; saved as {self.model_class}"
        yield from self.checks
        yield f"kept {len(self.kept)} tensors:"
        for old, new in self.kept.items():
            yield f"  keep  {old} -> {new}"
        yield f"dropped {len(self.dropped)} entries:"
        for old, reason in self.dropped.items():
            yield f"  drop  {old}  ({reason})"


def parse_hub_path(source):
    """`hf://[datasets/|spaces/]<owner>/<repo>[@<revision>]/<path in the repo>` (huggingface_hub's `HfFileSystem`
    form; a revision with a slash is URL-quoted, `refs%2Fpr%2F1`) -> `(repo_id, path_in_repo, revision, repo_type)`.
    Raises `InvalidInputError` for anything else."""
    rest = source[len(HUB_PREFIX) :]
    parts = rest.split("/")
    repo_type = HUB_REPO_TYPES.get(parts[0])
    if repo_type is not None:
        parts = parts[1:]
    if len(parts) < 3 or not all(parts):
        raise InvalidInputError(
            f"{source!r} is not a Hub file path: write hf://<owner>/<repo>[@<revision>]/<path in the repo> (e.g. "
            "hf://twke/CAST/snapshots/cast_small/checkpoint.pth)."
        )
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", "/".join(parts[2:]), unquote(revision) or None, repo_type or "model"


def resolve_source(source):
    """A local file for `source`: a path as it is, or a Hub file (`hf://...`, see `parse_hub_path`) downloaded into
    (or, offline, read from) the Hugging Face cache.

    Raises:
        MissingInputError: the repo, revision or file does not exist (offline: is not in the cache).
    """
    source = str(source)
    if not source.startswith(HUB_PREFIX):
        return Path(source)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id, filename, revision, repo_type = parse_hub_path(source)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type))
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MissingInputError(f"Cannot read {source} from the Hub ({repo_type} {repo_id}): {reason}") from error


def load_original_checkpoint(path, allow_argparse_namespace=False):
    """`torch.load(weights_only=True)` of a local file or a Hub file (`hf://...`, see `resolve_source`); a DeiT
    checkpoint with an `argparse.Namespace` under `args` needs the explicit opt-in, which allow-lists only that
    class."""
    path = resolve_source(path)
    if not path.is_file():
        raise MissingInputError(f"No checkpoint file at {path}.")
    try:
        if allow_argparse_namespace:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler names the class it refused
        if "Namespace" in str(error):
            raise InvalidInputError(
                f"{path} stores an `argparse.Namespace` (the DeiT training arguments under `args`). It is not "
                "loaded by default; pass `allow_argparse_namespace=True` (`--allow-argparse-namespace`) to allow "
                "that one class."
            ) from error
        raise InvalidInputError(f"Could not read {path} with torch.load(weights_only=True): {error}") from error


def split_checkpoint(checkpoint):
    """Return (format name, backbone state dict, MoCo extras {projector/predictor}, dropped {key: reason})."""
    dropped, extras = {}, {}
    if not isinstance(checkpoint, dict):
        raise InvalidInputError(
            f"Not a CAST checkpoint: expected a dict, got {type(checkpoint).__name__}; {EXPECTED_KEYS_HELP}."
        )
    if "state_dict" in checkpoint and any(k.startswith("module.base_encoder.") for k in checkpoint["state_dict"]):
        source_format, state = "moco", {}
        for key, value in checkpoint["state_dict"].items():
            if key.startswith("module.base_encoder.head."):
                extras["projector." + key[len("module.base_encoder.head.") :]] = (key, value)
            elif key.startswith("module.base_encoder."):
                state[key[len("module.base_encoder.") :]] = (key, value)
            elif key.startswith("module.predictor."):
                extras["predictor." + key[len("module.predictor.") :]] = (key, value)
            elif key.startswith("module.momentum_encoder."):
                dropped[key] = "momentum encoder (training state, not needed for inference)"
            else:
                dropped[key] = "not part of the base encoder"
        outer = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    elif "model" in checkpoint and isinstance(checkpoint["model"], dict):
        source_format = "deit"
        state = {k: (k, v) for k, v in checkpoint["model"].items()}
        outer = {k: v for k, v in checkpoint.items() if k != "model"}
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        source_format = "linear-probe"
        state = {k.removeprefix("module."): (k, v) for k, v in checkpoint["state_dict"].items()}
        outer = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    else:
        source_format = "state_dict"
        state = {k.removeprefix("module."): (k, v) for k, v in checkpoint.items() if torch.is_tensor(v)}
        outer = {k: v for k, v in checkpoint.items() if not torch.is_tensor(v)}
    for key in outer:
        if key == "model_ema":
            dropped[key] = "EMA copy of the weights (training state; the converted weights are `model`)"
        else:
            dropped[key] = "training state (optimizer, epoch, scaler, ...)"
    if "cls_token" not in state or not any(re.match(r"blocks\d\.\d+\.", k) for k in state):
        sample = ", ".join(list(state)[:8]) or "none"
        raise InvalidInputError(f"Not a CAST checkpoint: {EXPECTED_KEYS_HELP}. Found keys: {sample} ...")
    return source_format, state, extras, dropped


def infer_architecture(state):
    """Width, depths, position-embedding type and image size, read off the tensors."""
    hidden_size = state["cls_token"][1].shape[-1]
    depths = []
    for level in range(1, NUM_LEVELS + 1):
        indices = {int(m.group(1)) for k in state if (m := re.match(rf"blocks{level}\.(\d+)\.norm1\.weight$", k))}
        depths.append(len(indices))
    inferred = dict(hidden_size=hidden_size, depths=tuple(depths))
    if "pos_embed" in state:
        num_positions = state["pos_embed"][1].shape[1]
        side = math.isqrt(num_positions)
        if side * side == num_positions:
            inferred["position_embedding_type"] = "sincos"
        elif math.isqrt(num_positions - 1) ** 2 == num_positions - 1:
            side = math.isqrt(num_positions - 1)
            inferred["position_embedding_type"] = "learned"
        else:
            raise InvalidInputError(
                f"`pos_embed` has {num_positions} positions: not a square grid (with or without CLS)."
            )
        inferred["image_size"] = side * 8
    return inferred


def build_config(inferred, preset=None, overrides=None, num_labels=None, projection=None):
    """Merge preset, overrides and what the tensors say; contradictions raise a `ValueError`."""
    settings = dict(CAST_PRESETS[preset]) if preset else {}
    if preset and preset not in CAST_PRESETS:
        raise InvalidInputError(f"Unknown preset {preset!r}; choose one of {sorted(CAST_PRESETS)}.")
    settings.update(overrides or {})
    for name, value in inferred.items():
        given = settings.get(name)
        if given is not None and (tuple(given) if isinstance(given, (list, tuple)) else given) != value:
            raise InvalidInputError(
                f"The checkpoint's tensors say {name}={value}, but the preset/--set says {name}={given}; "
                "fix the preset or the --set value."
            )
        settings[name] = value
    if num_labels is not None:
        settings["num_labels"] = num_labels
    if projection is not None:
        settings["projection_dim"], settings["projection_hidden_dim"] = projection
    return CastConfig(**settings)


def backbone_key(key, depths, local_block_indices=False):
    """Our CastModel key for an original backbone key, or None if the key has no counterpart.

    `local_block_indices`: `blocks{l}.{j}` counts j from 0 in every level (cast_seg) rather than globally."""
    offsets = [sum(depths[:level]) for level in range(NUM_LEVELS)]
    if key.startswith("patch_embed.proj."):
        return "embeddings.patch_embeddings." + key[len("patch_embed.") :]
    if key == "cls_token":
        return "embeddings.cls_token"
    if key.startswith("norm."):
        return "layernorm." + key[len("norm.") :]
    if match := re.match(r"blocks(\d)\.(\d+)\.(.*)$", key):
        level, index, rest = int(match.group(1)) - 1, int(match.group(2)), match.group(3)
        local = index - offsets[level] if index >= offsets[level] and not local_block_indices else index
        return f"levels.{level}.blocks.{local}.{rest}"
    if match := re.match(r"pool(\d)\.pool_block\.(.*)$", key):
        level, rest = int(match.group(1)) - 1, match.group(2)
        for old, new in POOLING_RENAMES.items():
            if rest.startswith(old):
                return f"levels.{level}.pooling.{new}{rest[len(old) :]}"
    return None


def map_backbone(state, config, report, prefix="", local_block_indices=False):
    """Rename backbone tensors; checks duplicated and fixed tensors instead of copying them."""
    mapped = {}
    depths = config.depths
    for key, (original_key, value) in state.items():
        if match := re.match(r"blocks\.(\d+)\.(.*)$", key):
            index, rest = int(match.group(1)), match.group(2)
            level = next(l for l in range(NUM_LEVELS) if index < sum(depths[: l + 1]))
            twin = f"blocks{level + 1}.{index}.{rest}"
            if twin not in state or not torch.equal(state[twin][1], value):
                raise InvalidInputError(
                    f"`{key}` and its twin `{twin}` should be the same module but differ or are missing."
                )
            report.dropped[original_key] = f"duplicate of {twin} (same module in the original)"
            continue
        if key == "pos_embed":
            if config.position_embedding_type == "learned":
                mapped[prefix + "embeddings.position_embeddings"] = value
                report.kept[original_key] = prefix + "embeddings.position_embeddings"
            else:
                grid = config.image_size // config.patch_size
                if not torch.allclose(value.float(), sincos_position_grid(grid, grid, config.hidden_size), atol=1e-5):
                    raise InvalidInputError("`pos_embed` is not the fixed 2D sin-cos table the model builds.")
                report.dropped[original_key] = "fixed 2D sin-cos table, rebuilt by the model (verified equal)"
            continue
        if key == "pe_token":
            if value.abs().max() > 0:
                raise InvalidInputError(
                    "`pe_token` (the CLS position) is not zero; this converter expects the frozen zeros."
                )
            report.dropped[original_key] = "CLS position of the sin-cos model: frozen zeros, rebuilt by the model"
            continue
        new_key = backbone_key(key, depths, local_block_indices)
        if new_key is None:
            continue
        mapped[prefix + new_key] = value
        report.kept[original_key] = prefix + new_key
    return mapped


def segmentation_settings(extras, num_labels, overrides):
    """cast_seg checkpoints: the head (MoCo projector, or a Linear) becomes a per-segment head of
    `CastForSemanticSegmentation`, whose 4th pooling is trainable. Returns (num_labels, overrides)."""
    if extras:
        num_labels = extras["projector.6.weight"][1].shape[0]
    settings = {"freeze_last_pooling": False, "segmentation_head_type": "mlp_projector" if extras else "linear"}
    return num_labels, {**settings, **(overrides or {})}


def map_segmentation_extras(state, extras, report):
    """BlockFusion tensors, and the MoCo projector as the segmentation head (`classifier.*`); the predictor is
    dropped. Returns the renamed tensors."""
    mapped = {}
    for key, (original_key, value) in state.items():
        for old, new in FUSION_RENAMES.items():
            if key.startswith(old):
                mapped[new + key[len(old) :]] = value
                report.kept[original_key] = new + key[len(old) :]
    for key, (original_key, value) in extras.items():
        if key.startswith("projector."):
            mapped["classifier." + key[len("projector.") :]] = value
            report.kept[original_key] = "classifier." + key[len("projector.") :]
        else:
            report.dropped[original_key] = "MoCo predictor (pre-training only; the projector is the segmentation head)"
    return mapped


def taxonomy_from_paths(paths):
    """Config fields (`hierarchy_num_labels`, `hierarchy_parents`) of a taxonomy given as rows
    `[fine, coarse(, coarser ...)]`, one per finest class, 0-based (H-CAST's `data/*_tree.json`)."""
    if not isinstance(paths, list) or not paths or not all(isinstance(row, list) for row in paths):
        raise InvalidInputError("A taxonomy's paths must be a non-empty list of rows [fine, coarse(, coarser)].")
    num_levels = len(paths[0])
    if num_levels < 2 or any(len(row) != num_levels for row in paths):
        raise InvalidInputError(
            f"Every taxonomy row needs the same number (>= 2) of levels; the first has {num_levels}."
        )
    if not all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0 for row in paths for value in row
    ):
        raise InvalidInputError("Taxonomy rows must hold non-negative integer class ids (0-based).")
    finest = sorted(row[0] for row in paths)
    if finest != list(range(len(paths))):
        raise InvalidInputError(
            f"The taxonomy needs one row per finest class 0..{len(paths) - 1}; its first column holds "
            f"{finest[:10]}{'...' if len(finest) > 10 else ''}."
        )
    counts = [max(row[level] for row in paths) + 1 for level in range(num_levels)]
    parents = [[None] * counts[level] for level in range(num_levels - 1)]
    for row in paths:
        for level in range(num_levels - 1):
            child, parent = row[level], row[level + 1]
            if parents[level][child] not in (None, parent):
                raise InvalidInputError(
                    f"Class {child} of level {level} has two parents in the taxonomy, {parents[level][child]} and "
                    f"{parent}: not a tree."
                )
            parents[level][child] = parent
    for level, level_parents in enumerate(parents):
        orphans = [child for child, parent in enumerate(level_parents) if parent is None]
        if orphans:
            raise InvalidInputError(f"Classes {orphans[:10]} of level {level} appear in no taxonomy row.")
    return {"hierarchy_num_labels": tuple(counts), "hierarchy_parents": tuple(tuple(p) for p in parents)}


def taxonomy_from_levels(levels):
    """Config fields of a taxonomy given per level, finest first: `{name, num_classes, classes, parent}` (the
    fixtures' `taxonomy.json`; `classes` and `name` optional, `parent` null for the coarsest level)."""
    if not isinstance(levels, list) or len(levels) < 2 or not all(isinstance(level, dict) for level in levels):
        raise InvalidInputError("A taxonomy's `levels` must be a list of (at least 2) objects, finest first.")
    counts, names, id2label, parents = [], [], [], []
    for index, level in enumerate(levels):
        classes = level.get("classes")
        count = level.get("num_classes", len(classes) if classes is not None else None)
        if not isinstance(count, int) or count < 1 or (classes is not None and len(classes) != count):
            raise InvalidInputError(
                f"Taxonomy level {index} needs `num_classes` (a positive integer) or a `classes` list of that length."
            )
        counts.append(count)
        names.append(str(level.get("name") or f"rank{index}"))
        id2label.append({i: str(name) for i, name in enumerate(classes or [f"LABEL_{i}" for i in range(count)])})
        parent = level.get("parent")
        if index < len(levels) - 1:
            if not isinstance(parent, list):
                raise InvalidInputError(
                    f"Taxonomy level {index} needs `parent`: the parent id of each of its classes."
                )
            parents.append(tuple(parent))
        elif parent is not None:
            raise InvalidInputError(
                f"The coarsest taxonomy level ({index}) has no parents: its `parent` must be null."
            )
    return {
        "hierarchy_num_labels": tuple(counts),
        "hierarchy_parents": tuple(parents),
        "hierarchy_id2label": tuple(id2label),
        "hierarchy_level_names": tuple(names),
    }


def read_taxonomy(source):
    """The taxonomy of a JSON file (local or `hf://...`) as CastConfig fields (`hierarchy_num_labels`,
    `hierarchy_parents`, and when the file names them `hierarchy_id2label`, `hierarchy_level_names`).

    Two formats: an object with `levels` (finest first: `{name, num_classes, classes, parent}`, as the H-CAST
    fixtures' `taxonomy.json`; its `paths`, when present, must agree), or H-CAST's `data/*_tree.json`, a list of rows
    `[fine, coarse(, coarser)]`, one per finest class, 0-based (an object with only `paths` is read the same way).

    Raises:
        MissingInputError: no such file. InvalidInputError: not JSON, or not a tree (message names the problem).
    """
    path = resolve_source(source)
    if not path.is_file():
        raise MissingInputError(f"No taxonomy file at {path}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"Cannot read the taxonomy {source} as JSON: {error}") from error
    try:
        if isinstance(data, dict) and "levels" in data:
            settings = taxonomy_from_levels(data["levels"])
            if (
                "paths" in data
                and taxonomy_from_paths(data["paths"])["hierarchy_parents"] != settings["hierarchy_parents"]
            ):
                raise InvalidInputError("The taxonomy's `paths` disagree with its levels' `parent` lists.")
        elif isinstance(data, dict) and "paths" in data:
            settings = taxonomy_from_paths(data["paths"])
        elif isinstance(data, list):
            settings = taxonomy_from_paths(data)
        else:
            raise InvalidInputError(
                "A taxonomy is an object with `levels` (finest first) or a list of rows [fine, coarse(, coarser)]."
            )
        CastConfig(**settings)  # the config's own checks: one parent per class, a child per parent
    except ValueError as error:  # InvalidInputError too
        raise InvalidInputError(f"Taxonomy {source}: {error}") from error
    return settings


def hcast_class_counts(state):
    """Classes per label level, finest first, read off the H-CAST head shapes (`head`, `family_head`,
    `manufacturer_head`); None when the checkpoint has no `family_head.*` (not H-CAST)."""
    has_family, has_manufacturer = "family_head.weight" in state, "manufacturer_head.weight" in state
    if not has_family and not has_manufacturer:
        return None
    if not has_family:
        raise InvalidInputError(
            "The checkpoint has `manufacturer_head.*` but no `family_head.*`: not an H-CAST model."
        )
    prefixes = HCAST_HEADS if has_manufacturer else HCAST_HEADS[:2]
    counts = []
    for prefix in prefixes:
        weight = state.get(prefix + "weight")
        if weight is None or weight[1].dim() != 2 or prefix + "bias" not in state:
            raise InvalidInputError(f"The H-CAST checkpoint lacks the level head `{prefix}weight` / `{prefix}bias`.")
        counts.append(weight[1].shape[0])
    return tuple(counts)


def hcast_settings(counts, taxonomy):
    """The config fields of an H-CAST checkpoint with `counts` classes per level (its taxonomy, as `read_taxonomy`
    returns it, checked against the heads) and a line for the report saying what was checked."""
    heads = ", ".join(f"{prefix[:-1]} [{count}]" for prefix, count in zip(HCAST_HEADS, counts))
    if taxonomy is None:
        raise InvalidInputError(
            f"This is an H-CAST checkpoint ({len(counts)} label levels: {heads}); pass its taxonomy with --taxonomy "
            "(a taxonomy.json with `levels`, or H-CAST's data/*_tree.json rows [fine, coarse(, coarser)])."
        )
    declared = tuple(taxonomy["hierarchy_num_labels"])
    if declared != tuple(counts):
        raise InvalidInputError(
            f"The taxonomy has {declared} classes per level (finest first), but the checkpoint's heads have "
            f"{tuple(counts)} ({heads}); use the taxonomy the model was trained with."
        )
    names = taxonomy.get("hierarchy_level_names") or [f"rank{level}" for level in range(len(counts))]
    path = " -> ".join(f"{name} ({count})" for name, count in zip(names, counts))
    return dict(taxonomy), f"H-CAST taxonomy: {path}; matches the level heads {heads}"


def convert_state(checkpoint, preset=None, overrides=None, taxonomy=None):
    """Convert a loaded original checkpoint. Returns (model, report).

    `taxonomy`: the taxonomy of an H-CAST checkpoint (as `read_taxonomy` returns it; required for those)."""
    source_format, state, extras, dropped = split_checkpoint(checkpoint)
    segmentation = any(key.startswith("block_fusion.") for key in state)  # cast_seg.py
    inferred = infer_architecture(state)
    head = state.get("head.weight")
    projection = None
    if extras:
        projection = (extras["projector.6.weight"][1].shape[0], extras["projector.0.weight"][1].shape[0])
    num_labels = head[1].shape[0] if head is not None and head[1].dim() == 2 else None
    checks = []
    hierarchy_counts = hcast_class_counts(state)
    if hierarchy_counts is not None:
        settings, check = hcast_settings(hierarchy_counts, taxonomy)
        # Class counts and names come with the taxonomy (no `num_labels`).
        overrides, num_labels, checks = {**settings, **(overrides or {})}, None, [check]
    if segmentation:
        num_labels, overrides = segmentation_settings(extras, num_labels, overrides)
    config = build_config(inferred, preset, overrides, num_labels=num_labels, projection=projection)

    if hierarchy_counts is not None:
        model_class, prefix = CastForHierarchicalImageClassification, "cast."
    elif segmentation:
        model_class, prefix = CastForSemanticSegmentation, "cast."
    elif extras:
        model_class, prefix = CastForSelfSupervisedPretraining, "cast."
    elif num_labels is not None:
        model_class, prefix = CastForImageClassification, "cast."
    else:
        model_class, prefix = CastModel, ""
    report = ConversionReport(source_format, model_class.__name__, config, dropped=dict(dropped), checks=checks)
    mapped = map_backbone(state, config, report, prefix, local_block_indices=segmentation)
    if segmentation:
        mapped.update(map_segmentation_extras(state, extras, report))
        extras = {}
    level_heads = HCAST_HEADS[: len(hierarchy_counts)] if hierarchy_counts is not None else ()
    for key, (original_key, value) in state.items():
        level = next((index for index, head_prefix in enumerate(level_heads) if key.startswith(head_prefix)), None)
        if level is not None:  # H-CAST's head of label level `level` (finest first)
            new_key = f"classifier.{level}." + key[len(level_heads[level]) :]
            mapped[new_key] = value
            report.kept[original_key] = new_key
        elif key.startswith("head."):
            if num_labels is not None:
                mapped["classifier." + key[len("head.") :]] = value
                report.kept[original_key] = "classifier." + key[len("head.") :]
            else:
                report.dropped[original_key] = "head without a classifier weight"
        elif original_key not in report.kept and original_key not in report.dropped:
            report.dropped[original_key] = "no counterpart in the Hugging Face model"
    for new_key, (original_key, value) in extras.items():
        mapped[new_key] = value
        report.kept[original_key] = new_key

    model = model_class(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(mapped))
    unexpected = sorted(set(mapped) - expected)
    if unexpected:
        raise InvalidInputError(f"Checkpoint tensors with no place in {model_class.__name__}: {unexpected[:10]}")
    if missing:
        raise InvalidInputError(
            f"The checkpoint lacks tensors that {model_class.__name__} needs: {missing[:10]}; "
            "check the preset / --set values (depths, width) against the checkpoint."
        )
    for key, value in mapped.items():
        if model.state_dict()[key].shape != value.shape:
            raise InvalidInputError(
                f"Shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(model.state_dict()[key].shape)}; "
                "the config (preset / --set) contradicts the checkpoint."
            )
    model.load_state_dict(mapped, strict=True)
    model.eval()
    return model, report


def momentum_encoder_from_original(checkpoint, config):
    """The momentum encoder of an original MoCo-v3 CAST checkpoint (`module.momentum_encoder.*`), converted like
    the base encoder (`convert_state`), as a `CastForSelfSupervisedPretraining` (its predictor
    is the checkpoint's). `config` supplies what the tensors do not tell (heads, clusters, ...)."""
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    prefix = "module.momentum_encoder."
    swapped = {
        "module.base_encoder." + key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)
    }
    if not swapped:
        raise InvalidInputError(
            "Not an original MoCo-v3 checkpoint: no `module.momentum_encoder.*` keys in `state_dict`."
        )
    swapped.update({key: value for key, value in state.items() if key.startswith("module.predictor.")})
    overrides = {
        name: getattr(config, name)
        for name in (
            "num_attention_heads",
            "num_clusters",
            "mlp_ratio",
            "qkv_bias",
            "layer_norm_eps",
            "graph_pooling_num_heads",
            "assignment_scale",
            "patch_size",
        )
    }
    model, _ = convert_state({"state_dict": swapped}, None, overrides)
    return model


def parse_overrides(items):
    """`key=value` strings (lists comma-separated) to a dict typed like CastConfig's defaults."""
    defaults = CastConfig().to_dict()
    overrides = {}
    for item in items or ():
        if "=" not in item:
            raise InvalidInputError(f"--set expects key=value, got {item!r}.")
        key, raw = item.split("=", 1)
        if key not in defaults:
            raise InvalidInputError(f"--set: unknown config field {key!r}.")
        default = defaults[key]
        if isinstance(default, (list, tuple)):
            value = tuple(int(v) for v in raw.split(","))
        elif isinstance(default, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            value = int(raw)
        elif isinstance(default, float):
            value = float(raw)
        else:
            value = raw
        overrides[key] = value
    return overrides


def image_processor_for(config, source_format):
    """The evaluation-time processor of the original recipe: resize to 256/224 of the crop, centre crop, SEEDS.
    DeiT-trained checkpoints used bicubic resizing and the supervised SEEDS recipe; the others the MoCo recipe."""
    from transformers.image_utils import PILImageResampling

    from .image_processing_cast import CastImageProcessor

    crop = config.image_size
    settings = dict(size={"shortest_edge": round(crop * 256 / 224)}, crop_size={"height": crop, "width": crop})
    if "CastForSemanticSegmentation" in (config.architectures or ()):
        # Whole-image label maps: no centre crop, so post-processing maps predictions back onto the full image.
        settings = dict(size={"height": crop, "width": crop}, do_center_crop=False)
    if source_format == "deit" and config.position_embedding_type == "learned":
        settings.update(superpixel_recipe="supervised", resample=PILImageResampling.BICUBIC)
    return CastImageProcessor(**settings)


def convert_checkpoint(path, output_dir, preset=None, overrides=None, allow_argparse_namespace=False, taxonomy=None):
    """Load, convert and `save_pretrained` an original checkpoint together with its image processor. `path` and
    `taxonomy` (the taxonomy file of an H-CAST checkpoint, see `read_taxonomy`) are local paths or `hf://` Hub
    paths."""
    checkpoint = load_original_checkpoint(path, allow_argparse_namespace)
    model, report = convert_state(checkpoint, preset, overrides, read_taxonomy(taxonomy) if taxonomy else None)
    model.save_pretrained(output_dir)
    image_processor_for(model.config, report.source_format).save_pretrained(output_dir)
    return model, report


def publish_converted(output_dir, repo_id, report, private=False):
    """Write the model card of a converted checkpoint and push the folder to the Hub. Returns the commit URL."""
    from .hub import push_folder_to_hub, write_model_card

    objective = {
        "hcast": "H-CAST hierarchical classification (converted from the authors' checkpoint)",
        "moco": "MoCo-v3 self-supervised pre-training (converted from the authors' checkpoint)",
        "deit": "DeiT-style supervised training (converted from the authors' checkpoint)",
        "linear-probe": "linear probe on a MoCo-v3 backbone (converted from the authors' checkpoint)",
    }.get(
        "hcast" if report.model_class == CastForHierarchicalImageClassification.__name__ else report.source_format,
        "converted from the authors' checkpoint",
    )
    write_model_card(
        output_dir,
        repo_id=repo_id,
        objective=objective,
        training_summary={
            "source format": report.source_format,
            "tensors kept": len(report.kept),
            "entries dropped": len(report.dropped),
        },
        extra={
            "Conversion": "Converted with `scripts/convert_original_cast.py` from github.com/twke18/CAST weights; "
            "outputs match the original implementation (see the hf_hierseg parity tests)."
        },
    )
    commit = push_folder_to_hub(
        output_dir, repo_id, f"Upload {report.model_class} converted from the original CAST", private=private
    )
    return getattr(commit, "commit_url", commit)


__all__ = [
    "momentum_encoder_from_original",
    "ConversionReport",
    "convert_checkpoint",
    "convert_state",
    "image_processor_for",
    "load_original_checkpoint",
    "parse_hub_path",
    "parse_overrides",
    "publish_converted",
    "read_taxonomy",
    "resolve_source",
    "taxonomy_from_levels",
    "taxonomy_from_paths",
]
