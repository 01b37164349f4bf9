"""The Accelerate training loop shared by the MoCo-v3 and supervised recipes.

One loop for 1 or N processes (`accelerate launch`), mixed precision from the launcher, gradient accumulation and
clipping, warm-up + cosine learning rate, metrics to a JSON-lines file / TensorBoard and stdout, atomic checkpoints
every `checkpointing_steps` that `--resume_from_checkpoint latest` restores exactly (model, optimizer, scheduler,
scaler, RNG, data position), and at the end a `save_pretrained` folder with the image processor and a model card,
optionally pushed to the Hub. Faults: SIGTERM / SIGUSR1 stop the run after its step with a checkpoint (exit status
75, `interruption`), broken checkpoints are skipped when resuming and a full disk leaves the earlier ones intact
(`checkpointing`), non-finite losses stop the run or are skipped (`--max_nonfinite_steps`); every process takes
the same decisions (one all-reduce of the stop and non-finite flags per step).

An *objective* (`MocoObjective`, `SupervisedObjective`) provides `training_module()`, `compute_loss(module, batch,
step, micro_step, accelerator) -> (loss, metrics)`, `after_optimizer_step(module, step, total_steps, accelerator)
-> metrics`, `pretrained_model(module, accelerator)`, `save_state(folder)` / `load_state(folder)`, `card_details()`
and the attributes `name` and `pipeline_tag`.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, is_tensorboard_available
from tqdm.auto import tqdm

from .. import hub
from ..errors import InvalidInputError
from .checkpointing import latest_checkpoint, load_checkpoint, resume_checkpoint, save_checkpoint
from .interruption import StopSignals, TrainingPreempted, exit_stopped_rank
from .optim import create_optimizer, create_scheduler


logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "all_results.json"


class JsonLinesTracker(GeneralTracker):
    """Accelerate tracker appending `{"step": ..., **metrics}` lines to a file (the run's configuration goes to
    `run_config.json` beside it)."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "run_config.json").write_text(json.dumps(values, indent=2, default=str), encoding="utf-8")

    def log(self, values, step=None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(path):
    """The lines of a `metrics.jsonl` file as dicts."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def create_accelerator(output_args, find_unused_parameters=False):
    """An `Accelerator` for the run (`output_args`: an `arguments.OutputArguments`): mixed precision and process
    count come from `accelerate launch`; trackers from `--report_to` (`jsonl`, `tensorboard`, `all` (TensorBoard
    when installed) or `none`)."""
    report_to = {"all": ["jsonl", "tensorboard"], "none": []}.get(output_args.report_to, [output_args.report_to])
    if output_args.report_to == "all" and not is_tensorboard_available():
        report_to = ["jsonl"]
    trackers = []
    for name in report_to:
        if name == "jsonl":
            trackers.append(JsonLinesTracker(Path(output_args.output_dir) / METRICS_FILE))
        elif name == "tensorboard":
            if not is_tensorboard_available():
                raise InvalidInputError(
                    "--report_to tensorboard needs the `tensorboard` package (pip install tensorboard)."
                )
            trackers.append("tensorboard")
        else:
            raise InvalidInputError(
                f"--report_to must be jsonl, tensorboard, all or none, got {output_args.report_to!r}."
            )
    return Accelerator(
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=output_args.output_dir, logging_dir=os.path.join(output_args.output_dir, "runs")
        ),
        # The schedule counts optimiser steps, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


def setup_logging(accelerator):
    """Log lines with time and origin; INFO on each machine's main process, warnings only elsewhere."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    import datasets
    import transformers

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def parameter_fingerprint(module):
    """SHA-256 of all parameters and buffers (names, shapes, bytes): equal fingerprints mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        value = tensor.detach().cpu().contiguous()
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def average_buffers(module, accelerator):
    """Average floating-point buffers (BatchNorm running statistics) over processes: DDP broadcasts them from rank
    0 before each forward, so after the last forward every process holds its own."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.copy_(accelerator.reduce(buffer, reduction="mean"))


def format_metrics(step, max_steps, metrics):
    parts = [f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in metrics.items()]
    return f"step {step}/{max_steps}: " + " ".join(parts)


def log_metrics(accelerator, step, max_steps, metrics, progress=None):
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        (progress.write if progress is not None else print)(format_metrics(step, max_steps, metrics))


def sanitized_config(settings):
    """Hyper-parameters for the trackers (TensorBoard accepts only scalars and strings), without the Hub token:
    the fields of the run's settings dataclasses."""
    values = {}
    for dataclass_settings in settings:
        values.update(dataclasses.asdict(dataclass_settings))
    return {
        key: value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
        for key, value in values.items()
        if key != "hub_token"
    }


class NonFiniteLossError(InvalidInputError):
    """A step's loss was NaN or infinite (more often in a row than `--max_nonfinite_steps` allows); the run stopped
    before the step's update, and saved nothing after the last good checkpoint."""


@dataclasses.dataclass
class NonFiniteSteps:
    """Steps whose loss was not finite on some process: skipped (no update) up to `limit` in a row."""

    limit: int = 0
    in_a_row: int = 0
    total: int = 0

    def record(self, nonfinite):
        """Count one step; True if it is one too many in a row (the run stops)."""
        self.in_a_row = self.in_a_row + 1 if nonfinite else 0
        self.total += int(nonfinite)
        return self.in_a_row > self.limit

    def state_dict(self):
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state):
        self.in_a_row, self.total = state.get("in_a_row", 0), state.get("total", 0)


BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def running_statistics(module):
    """The buffers a training forward changes (BatchNorm running statistics and counts)."""
    return [buffer for layer in module.modules() if isinstance(layer, BATCH_NORMS) for buffer in layer.buffers()]


def processes_agree(accelerator, *flags):
    """Each flag True if it is True on any process: one all-reduce for all, so every process takes the same
    decisions (every process must call it)."""
    values = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    return [bool(value > 0) for value in values.tolist()]


def describe_losses(accelerator, losses, metrics):
    """The losses of a step's micro-batches on every process, and this process's metrics of the step, for a
    message (every process must call it)."""
    gathered = accelerator.gather(torch.stack(losses).float()).reshape(accelerator.num_processes, -1)
    per_process = "; ".join(
        f"rank {rank}: {', '.join(f'{value:.4g}' for value in row)}" for rank, row in enumerate(gathered.tolist())
    )
    parts = ", ".join(f"{key}={values[-1]:.4g}" for key, values in metrics.items())
    return f"micro-batch losses {per_process}" + (f"; {parts}" if parts else "")


def train(
    accelerator,
    objective,
    training_batches,
    optimization_args,
    output_args,
    max_steps,
    processor=None,
    evaluate=None,
    eval_steps=None,
    card=None,
    log_sample_keys=False,
    hyperparameters=None,
):
    """Run the optimisation, then save (and push) the model. Returns the final metrics.

    SIGTERM / SIGUSR1 stop the run after the current step with a checkpoint of it (`TrainingPreempted`, exit status
    75; on several processes each rank ends its process with status 75 once all have written their parts: see
    `interruption`); a NaN / infinite loss skips the step's update up to `--max_nonfinite_steps` times in a
    row, then raises `NonFiniteLossError` (a skipped step still counts towards `max_steps`: it consumes its batches
    and moves the learning-rate schedule on, but changes no weight, optimiser state, momentum encoder or EMA).

    Args:
        accelerator: from `create_accelerator`.
        objective: a `MocoObjective` / `SupervisedObjective` / ... (see the module docstring).
        training_batches: a `TrainingBatches` (this process's data).
        optimization_args, output_args: the run's `arguments.OptimizationArguments` and `arguments.OutputArguments`.
        max_steps: optimiser steps to run (`--max_train_steps`, or its epochs in steps).
        processor: image processor saved beside the model.
        evaluate: optional callable (model, accelerator) -> metrics dict, run every `eval_steps` and at the end.
        card: dict of model-card fields (`datasets`, `base_model`, `data`).
        log_sample_keys: write the ids of the training records of every step to `sample_keys_rank{r}.txt`.
        hyperparameters: dict logged to the trackers (`run_config.json`).
    """
    output_dir = Path(output_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accumulation = optimization_args.gradient_accumulation_steps
    module = objective.training_module()
    optimizer = create_optimizer(
        module, optimization_args.optimizer, optimization_args.learning_rate, optimization_args.weight_decay
    )
    scheduler = create_scheduler(
        optimizer, optimization_args.lr_scheduler_type, optimization_args.num_warmup_steps, max_steps
    )
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    nonfinite_steps = NonFiniteSteps(optimization_args.max_nonfinite_steps)

    start_step = 0
    checkpoint = resume_checkpoint(accelerator, output_args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        start_step, data_state, loop_state = load_checkpoint(accelerator, checkpoint)
        if data_state is not None:
            training_batches.load_state_dict(data_state)
        nonfinite_steps.load_state_dict(loop_state.get("nonfinite_steps", {}))
        objective.load_state(checkpoint)
        logger.info("Resumed from %s at step %d (epoch %d).", checkpoint, start_step, training_batches.position.epoch)
    elif output_args.resume_from_checkpoint == "latest":
        logger.info("No checkpoint in %s yet: starting from scratch.", output_dir)
    accelerator.init_trackers("train", config=hyperparameters or {})

    def save(step):
        return save_checkpoint(
            accelerator,
            output_dir,
            step,
            training_batches.state_dict(),
            objective.save_state,
            output_args.checkpoints_total_limit,
            training_state={"nonfinite_steps": nonfinite_steps.state_dict()},
        )

    keys_file = output_dir / f"sample_keys_rank{accelerator.process_index}.txt" if log_sample_keys else None
    progress = tqdm(
        total=max_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc=objective.name
    )
    window_losses, window_metrics, window_start, window_from = [], {}, time.perf_counter(), start_step
    module.train()
    # Closing the batches on the way out, also on an error, stops their DataLoader workers (see `TrainingBatches`).
    with (
        StopSignals(output_args.preemption_timeout) as stop_signals,
        contextlib.closing(progress),
        contextlib.closing(iter(training_batches)) as batches,
    ):
        for step in range(start_step, max_steps):
            step_losses, batch_metrics = [], {}  # of this step's micro-batches
            # A skipped step leaves the running statistics as they were (its forward may have made them NaN).
            statistics = [buffer.clone() for buffer in running_statistics(module)] if nonfinite_steps.limit else []
            for micro_step in range(accumulation):
                batch, keys = next(batches)
                batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
                if keys_file is not None:
                    with open(keys_file, "a", encoding="utf-8") as handle:
                        epoch = training_batches.position.epoch
                        handle.writelines(f"{step + 1}\t{epoch}\t{key}\n" for key in keys)
                # Gradients are synchronised across processes on the last micro-batch only.
                sync = micro_step == accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(module):
                    loss, metrics = objective.compute_loss(module, batch, step, micro_step, accelerator)
                    accelerator.backward(loss / accumulation)
                step_losses.append(loss.detach().float())
                for key, value in metrics.items():
                    batch_metrics.setdefault(key, []).append(float(value))
            completed = step + 1
            nonfinite = not bool(torch.isfinite(torch.stack(step_losses)).all())
            stop, nonfinite = processes_agree(accelerator, stop_signals.requested, nonfinite)

            grad_norm, learning_rate = None, scheduler.get_last_lr()[0]
            if nonfinite:
                description = describe_losses(accelerator, step_losses, batch_metrics)
                if nonfinite_steps.record(True):
                    raise NonFiniteLossError(
                        nonfinite_stop_message(completed, description, nonfinite_steps, output_dir)
                    )
                logger.warning(
                    "Step %d: non-finite loss (%s); skipped without an update (%d of --max_nonfinite_steps=%d in a "
                    "row, %d in all).",
                    completed,
                    description,
                    nonfinite_steps.in_a_row,
                    nonfinite_steps.limit,
                    nonfinite_steps.total,
                )
                skip_update(accelerator, optimizer, running_statistics(module), statistics)
                scheduler.step()
                step_metrics = {}
            else:
                nonfinite_steps.record(False)
                window_losses += step_losses
                for key, values in batch_metrics.items():
                    window_metrics.setdefault(key, []).extend(values)
                if optimization_args.max_grad_norm and optimization_args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(module.parameters(), optimization_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_metrics = objective.after_optimizer_step(module, completed, max_steps, accelerator)
            progress.update(1)

            if completed % output_args.logging_steps == 0 or completed == max_steps or stop:
                logged = {"learning_rate": learning_rate, **step_metrics}
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm)
                if nonfinite_steps.total:
                    logged["nonfinite_steps"] = nonfinite_steps.total
                window_seconds = time.perf_counter() - window_start
                logged = window_metrics_summary(
                    accelerator,
                    training_batches.position,
                    window_losses,
                    window_metrics,
                    logged,
                    (completed - window_from) / max(window_seconds, 1e-9),
                )
                log_metrics(accelerator, completed, max_steps, logged, progress)
                progress.set_postfix(loss=f"{logged['loss']:.4f}")
                window_losses, window_metrics, window_start = [], {}, time.perf_counter()
                window_from = completed

            checkpointing_steps = output_args.checkpointing_steps
            periodic = checkpointing_steps and completed % checkpointing_steps == 0 and completed < max_steps
            if periodic or stop:
                saved = save(completed)
            if stop:
                logger.warning(
                    "Stopped on %s after step %d/%d: saved %s. Continue with --resume_from_checkpoint latest.",
                    signal_name(stop_signals.received),
                    completed,
                    max_steps,
                    saved,
                )
                # This rank's part is written: a launcher's signal from here on (another rank left the barrier and
                # exited first) is no loss, and `latest` skips a checkpoint that another rank did not finish.
                stop_signals.mark_checkpoint_complete()
                accelerator.wait_for_everyone()  # every rank's part of the checkpoint is written before any exits
                if accelerator.num_processes > 1:
                    finish_trackers(accelerator)
                    exit_stopped_rank()  # no collective teardown once a rank may have exited: see `interruption`
                accelerator.end_training()
                raise TrainingPreempted(completed, saved)
            if evaluate is not None and eval_steps and completed % eval_steps == 0 and completed < max_steps:
                log_metrics(
                    accelerator,
                    completed,
                    max_steps,
                    evaluate(objective.pretrained_model(module, accelerator), accelerator),
                    progress,
                )
        progress.close()
        average_buffers(objective.training_module(), accelerator)

        final_metrics = {"train_steps": max_steps, "train_epoch": training_batches.position.epoch}
        if nonfinite_steps.total:
            final_metrics["nonfinite_steps"] = nonfinite_steps.total
        if evaluate is not None:
            final_metrics.update(evaluate(objective.pretrained_model(module, accelerator), accelerator))
            log_metrics(accelerator, max_steps, max_steps, final_metrics)
        if output_args.checkpointing_steps:
            save(max_steps)
        model = objective.pretrained_model(module, accelerator)
        write_run_summary(output_dir, accelerator, training_batches, model, max_steps)
        if accelerator.is_main_process:
            save_outputs(
                optimization_args, output_args, max_steps, objective, model, processor, final_metrics, card or {}
            )
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_metrics


def finish_trackers(accelerator):
    """`accelerator.end_training()` without its `destroy_process_group()`."""
    for tracker in accelerator.trackers:
        tracker.finish()


def signal_name(number):
    return signal.Signals(number).name if number is not None else "a signal to another process"


@torch.no_grad()
def skip_update(accelerator, optimizer, buffers, saved_buffers):
    """Undo a skipped step: drop its gradients, put `saved_buffers` back into `buffers`; with fp16 back the loss
    scale off, as `GradScaler` does on overflow."""
    optimizer.zero_grad(set_to_none=True)
    for buffer, saved in zip(buffers, saved_buffers, strict=True):
        buffer.copy_(saved)
    scaler = accelerator.scaler
    if scaler is not None and scaler.is_enabled():
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


def nonfinite_stop_message(step, description, nonfinite_steps, output_dir):
    newest = latest_checkpoint(output_dir)
    limit = nonfinite_steps.limit
    allowed = f"{limit} such step(s) in a row are skipped (--max_nonfinite_steps)" if limit else "none is skipped"
    return (
        f"The loss is not finite at step {step} ({description}); {allowed}. The run stopped before this step's "
        f"update and saved nothing after the last good checkpoint ({newest.name if newest else 'none yet'}). Lower "
        "--learning_rate, clip gradients with --max_grad_norm, check the data, or pass --max_nonfinite_steps N to "
        "skip up to N steps in a row (e.g. fp16 overflow); resume with --resume_from_checkpoint latest."
    )


def window_metrics_summary(accelerator, position, losses, metrics, logged, steps_per_second):
    """Metrics of the steps since the last log: mean loss over steps and processes, means of the objective's
    metrics, and the data counts summed over processes."""
    counts = torch.tensor([position.samples_seen, position.skipped_images], device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum")
    # Skipped (non-finite) steps are left out; a window of skipped steps only has no loss.
    mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=accelerator.device)
    loss = accelerator.reduce(mean, reduction="mean").item()
    return {
        "loss": loss,
        "epoch": position.epoch,
        **logged,
        **{key: sum(values) / len(values) for key, values in metrics.items()},
        "samples_seen": int(counts[0]),
        "skipped_images": int(counts[1]),
        "steps_per_second": steps_per_second,
    }


def write_run_summary(output_dir, accelerator, training_batches, model, steps):
    """`train_summary_rank{r}.json`: what each process did (steps, data position, weight fingerprint)."""
    summary = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "steps": steps,
        "data_position": training_batches.state_dict(),
        "parameter_fingerprint": parameter_fingerprint(model),
    }
    path = output_dir / f"train_summary_rank{accelerator.process_index}.json"
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")


def save_outputs(optimization_args, output_args, steps, objective, model, processor, metrics, card):
    """`save_pretrained` model + image processor, EMA weights under `ema/`, results and model card; push."""
    output_dir = Path(output_args.output_dir)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    ema = getattr(objective, "ema", None)
    if ema is not None:
        ema.module.save_pretrained(output_dir / "ema")
        if processor is not None:
            processor.save_pretrained(output_dir / "ema")
    (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    # The card names the model after the Hub repo, else after the output folder (made a valid repo name).
    repo_id = (
        output_args.hub_model_id or re.sub(r"[^\w.-]+", "-", output_dir.resolve().name).strip("-.")[:96] or "cast"
    )
    optimization = optimization_args
    summary = {
        "steps": steps,
        "per-device batch size": optimization.per_device_train_batch_size,
        "gradient accumulation steps": optimization.gradient_accumulation_steps,
        "optimizer": f"{optimization.optimizer}, learning rate {optimization.learning_rate:g}, weight decay "
        f"{optimization.weight_decay:g}",
        "schedule": f"{optimization.lr_scheduler_type} with {optimization.num_warmup_steps} warm-up steps",
        **objective.card_details(),
    }
    if card.get("data"):
        summary["data"] = card["data"]
    hub.write_model_card(
        output_dir,
        repo_id=repo_id,
        base_model=card.get("base_model"),
        datasets=card.get("datasets") or (),
        pipeline_tag=objective.pipeline_tag,
        objective=objective.name,
        training_summary=summary,
        metrics={key: value for key, value in metrics.items() if isinstance(value, (int, float))},
    )
    if output_args.push_to_hub:
        commit = hub.push_folder_to_hub(
            output_dir,
            repo_id,
            f"{objective.name}: {steps} steps",
            private=output_args.hub_private_repo,
            token=output_args.hub_token,
        )
        logger.info("Pushed %s to %s", output_dir, commit.commit_url)


def steps_for_epochs(num_train_epochs, batches_per_epoch, gradient_accumulation_steps):
    """`--num_train_epochs` in optimiser steps, from the batches per epoch of a map-style dataset."""
    steps = num_train_epochs * math.floor(batches_per_epoch / gradient_accumulation_steps)
    if steps < 1:
        raise InvalidInputError(
            f"{num_train_epochs} epoch(s) of {batches_per_epoch} batch(es) make no optimiser step; "
            "use a smaller batch or --max_train_steps."
        )
    return steps


__all__ = [
    "JsonLinesTracker",
    "NonFiniteLossError",
    "NonFiniteSteps",
    "create_accelerator",
    "parameter_fingerprint",
    "read_metrics",
    "sanitized_config",
    "setup_logging",
    "steps_for_epochs",
    "train",
]
