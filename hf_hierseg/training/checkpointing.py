"""Resumable training states: `accelerator.save_state` into `OUTPUT/checkpoint-STEP`, written atomically, checked
before they are resumed.

A checkpoint is first written to the hidden folder `OUTPUT/.checkpoint-STEP.tmp` by all processes, then published by
the main process once everyone has finished: its files are fsynced, `training_state.json` (the step, the loop's
counters and a manifest of every file with its size) is written last, and the folder renamed. A run killed at any
moment leaves either a complete `checkpoint-STEP` or none (a stale `.tmp` folder is ignored and replaced). Besides
what Accelerate saves (model, optimizer, scheduler, gradient scaler, each process's RNG states), a checkpoint holds
one `data_state_rank{r}.json` per process (its position in the data). The output folder must be shared by all
processes (one file system), as for `save_pretrained`.

Resuming checks a checkpoint first (`checkpoint_problems`: every file of the manifest there with its size, the
safetensors headers, the torch files loadable with `weights_only=True`, the JSON files, the step of the folder
name): `--resume_from_checkpoint latest` skips broken ones with a warning naming them and why (they are renamed
`checkpoint-STEP.invalid`, so they are neither resumed nor counted by `--checkpoints_total_limit` again) and
resumes the newest valid one; a broken checkpoint given by path is an error. A checkpoint that cannot be written
(a full disk) is removed again and raises `CheckpointWriteError` naming the folder and the file system's free space;
the earlier checkpoints are untouched.
"""

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from accelerate.utils import load as accelerate_load
from safetensors import safe_open

from ..errors import InvalidInputError, UserInputError


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
INVALID_SUFFIX = ".invalid"
# Files of Accelerate's `save_state` (a single model, optimizer and scheduler): what a checkpoint written before
# manifests existed must hold, besides one RNG state per process.
ACCELERATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")
TORCH_FILE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


class CheckpointWriteError(UserInputError, OSError):
    """A checkpoint could not be written (a full disk, a quota, a read-only folder); nothing was published."""


def data_state_file(rank):
    return f"data_state_rank{rank}.json"


def rng_state_file(rank):
    return f"random_states_{rank}.pkl"


def write_json(path, content):
    """Write JSON and fsync it, so the rename that publishes the checkpoint never exposes a partial file."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_path(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(output_dir):
    """Published checkpoints in `output_dir` as a list of (step, path), oldest first (not checked)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------------------


def read_training_state(checkpoint):
    return json.loads((Path(checkpoint) / TRAINING_STATE_FILE).read_text(encoding="utf-8"))


def file_problem(path):
    """Why the file at `path` cannot be read back (None if it can), by its type."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        elif path.suffix in TORCH_FILE_SUFFIXES:
            # The archive's central directory comes last: a truncated file fails here, without loading the tensors.
            accelerate_load(path, map_location="cpu", weights_only=True, mmap=True)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as error:  # safetensors, torch and json each raise their own types
        message = str(error).splitlines()[0][:200] if str(error) else ""
        return f"{path.name} is unreadable ({type(error).__name__}: {message})"
    return None


def checkpoint_problems(checkpoint):
    """What keeps `checkpoint` from being resumed, as short reasons (an empty list: it can be resumed)."""
    checkpoint = Path(checkpoint)
    try:
        state = read_training_state(checkpoint)
    except FileNotFoundError:
        return [f"no {TRAINING_STATE_FILE} (not a checkpoint, or one never completed)"]
    except (OSError, ValueError) as error:
        return [f"{TRAINING_STATE_FILE} is unreadable ({type(error).__name__}: {error})"]
    if not isinstance(state, dict):
        return [f"{TRAINING_STATE_FILE} is not a JSON object"]
    problems = []
    step = state.get("step")
    match = CHECKPOINT_PATTERN.match(checkpoint.name)
    if not isinstance(step, int) or step < 0:
        problems.append(f"{TRAINING_STATE_FILE} has no step")
    elif match and int(match.group(1)) != step:
        problems.append(f"{TRAINING_STATE_FILE} is of step {step}, the folder's name says {match.group(1)}")
    manifest = state.get("files")
    if manifest is None:  # written before manifests: the files every checkpoint has
        manifest = dict.fromkeys(ACCELERATE_FILES)
        manifest.update(dict.fromkeys(rng_state_file(rank) for rank in range(state.get("num_processes", 1))))
    for name, size in sorted(manifest.items()):
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
        elif (problem := file_problem(path)) is not None:
            problems.append(problem)
    return problems


def set_aside(checkpoint):
    """Rename a broken checkpoint `checkpoint-STEP.invalid` (replacing an older one of that name)."""
    target = checkpoint.with_name(checkpoint.name + INVALID_SUFFIX)
    if target.exists():
        shutil.rmtree(target)
    os.replace(checkpoint, target)
    return target


def newest_valid_checkpoint(output_dir):
    """The newest checkpoint of `output_dir` that `checkpoint_problems` accepts (None if there is none); newer
    broken ones are set aside with a warning naming them and why."""
    checkpoints = list_checkpoints(output_dir)
    for _, path in reversed(checkpoints):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        moved = set_aside(path)
        logger.warning("Skipping checkpoint %s: %s. Renamed it %s.", path, "; ".join(problems), moved.name)
    if checkpoints:
        logger.warning("No valid checkpoint left in %s: starting from scratch.", output_dir)
    return None


def resolve_checkpoint(resume_from_checkpoint, output_dir):
    """`--resume_from_checkpoint`: `latest` -> the newest valid checkpoint in `output_dir` (None if there is none
    yet: the run starts from scratch), or a checkpoint folder, which must be valid (else an `InvalidInputError`
    says why). Run it on the main process only (`resume_checkpoint` does)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return newest_valid_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise InvalidInputError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder (no "
            f"{TRAINING_STATE_FILE}); give a `checkpoint-STEP` folder or `latest`."
        )
    problems = checkpoint_problems(path)
    if problems:
        raise InvalidInputError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} cannot be resumed: {'; '.join(problems)}. Give "
            "another checkpoint, or `latest` for the newest valid one."
        )
    return path


def resume_checkpoint(accelerator, resume_from_checkpoint, output_dir):
    """`resolve_checkpoint` on the main process, its answer (a path, None or the error) shared with all."""
    outcome = [None, None]  # checkpoint path, error message
    if accelerator.is_main_process:
        try:
            path = resolve_checkpoint(resume_from_checkpoint, output_dir)
            outcome = [str(path) if path is not None else None, None]
        except InvalidInputError as error:
            outcome = [None, str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise InvalidInputError(outcome[1])
    return Path(outcome[0]) if outcome[0] is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def is_write_failure(error):
    """Whether `error` says the file system refused the write: an `OSError` (no space, quota, permissions), or the
    messages of torch's archive writer and safetensors on a short write."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return any(part in text for part in ("No space left", "file write failed", "unexpected pos", "StorageFull"))


def all_succeeded(accelerator, error):
    """True if no process had an `error` (a barrier too: every process must call it)."""
    if accelerator.num_processes == 1:
        return error is None
    failures = torch.tensor(0.0 if error is None else 1.0, device=accelerator.device)
    return accelerator.reduce(failures, reduction="sum").item() == 0


def write_failure(final, temporary, error):
    """The `CheckpointWriteError` of a checkpoint that could not be written (`error`: this process's, or None when
    another process failed)."""
    output_dir = final.parent
    usage = shutil.disk_usage(output_dir)
    newest = latest_checkpoint(output_dir)
    cause = f"{type(error).__name__}: {error}" if error is not None else "another process failed to write its part"
    code = getattr(error, "errno", None) or errno.EIO
    return CheckpointWriteError(
        code,
        f"Could not write {final.name} into {temporary} ({cause}). The file system of {output_dir} has "
        f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB. Nothing was published; the earlier "
        f"checkpoints are intact (newest: {newest.name if newest else 'none'}). Free space there (or lower "
        "--checkpoints_total_limit), then resume with --resume_from_checkpoint latest.",
    )


def manifest_of(folder):
    """{relative path: size} of every file under `folder`, each fsynced."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def publish(temporary, final, training_state):
    """Write `training_state` (with the manifest) into `temporary`, then rename it `final` (an older `final` of the
    same step is moved aside first and removed after)."""
    write_json(temporary / TRAINING_STATE_FILE, {**training_state, "files": manifest_of(temporary)})
    fsync_path(temporary)
    replaced = None
    if final.exists():  # the same step saved again (e.g. after resuming from it)
        replaced = final.with_name(f".{final.name}.replaced.tmp")
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(temporary, final)
    fsync_path(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def save_checkpoint(accelerator, output_dir, step, data_state, save_extra=None, total_limit=None, training_state=None):
    """Save the training state after `step` optimiser steps; keep the newest `total_limit` checkpoints.

    Every process must call this. `data_state` is this process's data position; `save_extra(folder)` runs on the
    main process (e.g. EMA weights); `training_state`: more JSON fields for `training_state.json` (the loop's
    counters), returned by `load_checkpoint`. Returns the checkpoint path; raises `CheckpointWriteError` on every
    process if any could not write its part (the temporary folder is removed)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".checkpoint-{step}.tmp"
    state = {**(training_state or {}), "step": step, "num_processes": accelerator.num_processes}
    main = accelerator.is_main_process
    agreed_write(accelerator, final, temporary, lambda: prepare_folder(temporary) if main else None)
    agreed_write(accelerator, final, temporary, lambda: write_process_state(accelerator, temporary, data_state))
    agreed_write(
        accelerator,
        final,
        temporary,
        lambda: publish_checkpoint(main, temporary, final, state, save_extra, total_limit),
    )
    if main:
        logger.info("Saved checkpoint %s", final)
    return final


def agreed_write(accelerator, final, temporary, write):
    """Run `write()` on every process, then agree: if any failed to write, remove the temporary folder and raise
    `CheckpointWriteError` everywhere (other exceptions are bugs and propagate as they are)."""
    error = None
    try:
        write()
    except Exception as caught:
        if not is_write_failure(caught):
            raise
        error = caught
    if not all_succeeded(accelerator, error):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise write_failure(final, temporary, error) from error


def prepare_folder(temporary):
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)


def write_process_state(accelerator, temporary, data_state):
    accelerator.save_state(str(temporary))
    write_json(temporary / data_state_file(accelerator.process_index), data_state)


def publish_checkpoint(main, temporary, final, state, save_extra, total_limit):
    if main:
        if save_extra is not None:
            save_extra(temporary)
        publish(temporary, final, state)
        prune_checkpoints(final.parent, total_limit)


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
    """Restore what `save_checkpoint` saved. Returns (step, this process's data state or None, the
    `training_state` fields saved with it)."""
    checkpoint = Path(checkpoint)
    accelerator.load_state(str(checkpoint))
    state = read_training_state(checkpoint)
    data_path = checkpoint / data_state_file(accelerator.process_index)
    data_state = json.loads(data_path.read_text(encoding="utf-8")) if data_path.is_file() else None
    if data_state is None:
        logger.warning(
            "%s has no data position for rank %d: its data restarts at the beginning.",
            checkpoint,
            accelerator.process_index,
        )
    extra = {key: value for key, value in state.items() if key not in ("step", "num_processes", "files")}
    return state["step"], data_state, extra


__all__ = [
    "CheckpointWriteError",
    "checkpoint_problems",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "newest_valid_checkpoint",
    "prune_checkpoints",
    "resolve_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
]
