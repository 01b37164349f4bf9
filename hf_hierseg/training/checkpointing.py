"""Resumable training states: `accelerator.save_state` into `OUTPUT/checkpoint-STEP`, written atomically.

A checkpoint is first written to the hidden folder `OUTPUT/.checkpoint-STEP.tmp` by all processes, then renamed by
the main process once everyone has finished: a run killed at any moment leaves either a complete `checkpoint-STEP`
or none (a stale `.tmp` folder is ignored and replaced). Besides what Accelerate saves (model, optimizer,
scheduler, gradient scaler, each process's RNG states), a checkpoint holds `training_state.json` (the step) and
one `data_state_rank{r}.json` per process (its position in the data). The output folder must be shared by all
processes (one file system), as for `save_pretrained`.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import InvalidInputError


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"


def data_state_file(rank):
    return f"data_state_rank{rank}.json"


def write_json(path, content):
    """Write JSON and fsync it, so the rename that publishes the checkpoint never exposes a partial file."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir` as a list of (step, path), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
    ]
    return sorted(found)


def latest_checkpoint(output_dir):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_checkpoint(resume_from_checkpoint, output_dir):
    """`--resume_from_checkpoint`: `latest` -> the newest complete checkpoint in `output_dir` (None if there is
    none yet: the run starts from scratch), or a checkpoint folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise InvalidInputError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder (no "
            f"{TRAINING_STATE_FILE}); give a `checkpoint-STEP` folder or `latest`."
        )
    return path


def save_checkpoint(accelerator, output_dir, step, data_state, save_extra=None, total_limit=None):
    """Save the training state after `step` optimiser steps; keep the newest `total_limit` checkpoints.

    Every process must call this. `data_state` is this process's data position; `save_extra(folder)` runs on the
    main process (e.g. EMA weights). Returns the checkpoint path."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    write_json(temporary / data_state_file(accelerator.process_index), data_state)
    if accelerator.is_main_process:
        if save_extra is not None:
            save_extra(temporary)
        write_json(temporary / TRAINING_STATE_FILE, {"step": step, "num_processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. after resuming from it)
            shutil.rmtree(final)
        os.replace(temporary, final)
        prune_checkpoints(output_dir, total_limit)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir, total_limit):
    """Delete all but the newest `total_limit` checkpoints (and stale temporary folders)."""
    output_dir = Path(output_dir)
    for stale in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if not total_limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        shutil.rmtree(path)


def load_checkpoint(accelerator, checkpoint):
    """Restore what `save_checkpoint` saved. Returns (step, this process's data state or None)."""
    checkpoint = Path(checkpoint)
    accelerator.load_state(str(checkpoint))
    step = json.loads((checkpoint / TRAINING_STATE_FILE).read_text(encoding="utf-8"))["step"]
    data_path = checkpoint / data_state_file(accelerator.process_index)
    data_state = json.loads(data_path.read_text(encoding="utf-8")) if data_path.is_file() else None
    if data_state is None:
        logger.warning(
            "%s has no data position for rank %d: its data restarts at the beginning.",
            checkpoint,
            accelerator.process_index,
        )
    return step, data_state


__all__ = [
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
]
