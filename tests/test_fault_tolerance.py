"""Fault tolerance of the training loop: SIGTERM / SIGUSR1 stop a run after its step with a checkpoint (exit status
75) that resumes with the losses of an uninterrupted run, on 1 and 2 processes; a second signal exits at once;
broken checkpoints are skipped (or refused when named); a full disk leaves the earlier checkpoints intact; a NaN
loss stops the run (or skips up to --max_nonfinite_steps steps) with the same decision on every process."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import psutil
import pytest
import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState, GradientState
from launching import accelerate_launch
from safetensors.torch import load_file
from test_training_data import truncated_png

from hf_hierseg import cli
from hf_hierseg.errors import InvalidInputError
from hf_hierseg.evaluation.synthetic import write_synthetic_dataset
from hf_hierseg.training.arguments import supervised_parser
from hf_hierseg.training.checkpointing import CheckpointWriteError, checkpoint_problems
from hf_hierseg.training.interruption import PREEMPTED_EXIT_CODE, StopSignals, TrainingPreempted
from hf_hierseg.training.loop import METRICS_FILE, NonFiniteLossError, read_metrics
from hf_hierseg.training.recipes import train_supervised
from hf_hierseg.training.supervised import SupervisedObjective


REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config_name",
    "cast-small",
    "--config_overrides",
    "hidden_size=24",
    "num_attention_heads=4",
    "depths=1,1,1,1",
    "num_clusters=16,8,4,2",
    "image_size=32",
    "projection_dim=16",
    "projection_hidden_dim=32",
    "--num_superpixels",
    "600",
    "--report_to",
    "jsonl",
    "--logging_steps",
    "1",
]


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Synthetic shapes (6 classes, 32 px) as parquet: `train` (48 images) and `test` (12)."""
    root = write_synthetic_dataset(
        tmp_path_factory.mktemp("shapes"), num_images=48, num_test_images=12, image_size=32, format="parquet"
    )
    return str(root / "data")


def supervised_arguments(shapes, output_dir, *extra, steps=6):
    return [
        "--dataset_name",
        shapes,
        *TINY,
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "4",
        "--max_train_steps",
        str(steps),
        "--num_warmup_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--max_eval_samples",
        "4",
        *extra,
    ]


def run_supervised(shapes, output_dir, *extra, steps=6):
    return train_supervised(
        *supervised_parser().parse_args_into_dataclasses(
            args=supervised_arguments(shapes, output_dir, *extra, steps=steps)
        )
    )


def losses_by_step(output_dir):
    """The logged loss of every step; a step logged twice (before a stop and after the resume) keeps the last."""
    return {line["step"]: line["loss"] for line in read_metrics(Path(output_dir) / METRICS_FILE) if "loss" in line}


def assert_same_losses(got, expected, steps):
    assert sorted(got) == sorted(expected) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7, nan_ok=True), f"step {step}"


def fingerprint(output_dir, rank=0):
    return json.loads((Path(output_dir) / f"train_summary_rank{rank}.json").read_text())["parameter_fingerprint"]


def checkpoint_names(output_dir):
    return sorted(path.name for path in Path(output_dir).iterdir() if "checkpoint" in path.name)


@pytest.fixture
def faults(monkeypatch):
    """{(step, rank): action} applied after the loss of that step's first micro-batch is computed: "nan" makes the
    loss NaN, "signal" sends the process SIGTERM, "signal twice" sends it twice."""
    planned = {}
    compute_loss = SupervisedObjective.compute_loss

    def faulty_compute_loss(self, module, batch, step, micro_step, accelerator):
        loss, metrics = compute_loss(self, module, batch, step, micro_step, accelerator)
        action = planned.pop((step + 1, accelerator.process_index), None) if micro_step == 0 else None
        if action == "nan":
            loss = loss * float("nan")
        elif action is not None:
            for _ in range(2 if action == "signal twice" else 1):
                signal.raise_signal(signal.SIGTERM)
        return loss, metrics

    monkeypatch.setattr(SupervisedObjective, "compute_loss", faulty_compute_loss)
    return planned


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    """An uninterrupted 6-step run (no checkpoints), on one thread as the tests (set up before their fixtures)."""
    output_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_supervised(shapes, output_dir)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------


def test_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(shapes, reference, tmp_path, faults):
    faults[(3, 0)] = "signal"
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingPreempted) as stopped:
        run_supervised(shapes, tmp_path)  # no --checkpointing_steps: the stop writes the only checkpoint
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 75 and stopped.value.step == 3
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the run's only
    assert checkpoint_names(tmp_path) == ["checkpoint-3"] and checkpoint_problems(tmp_path / "checkpoint-3") == []
    assert max(losses_by_step(tmp_path)) == 3 and not (tmp_path / "model.safetensors").exists()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    run_supervised(shapes, tmp_path, "--resume_from_checkpoint", "latest")
    assert_same_losses(losses_by_step(tmp_path), losses_by_step(reference), range(1, 7))
    assert fingerprint(tmp_path) == fingerprint(reference)


class Killed(Exception):
    """What the test's own SIGTERM handler raises: the process would have died here."""


def test_a_second_signal_exits_at_once_through_the_previous_handler(shapes, tmp_path, faults):
    def kill(number, frame):
        raise Killed(number)

    faults[(3, 0)] = "signal twice"
    previous = signal.signal(signal.SIGTERM, kill)
    try:
        with pytest.raises(Killed):
            run_supervised(shapes, tmp_path, "--checkpointing_steps", "2")
        assert signal.getsignal(signal.SIGTERM) is kill
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert checkpoint_names(tmp_path) == ["checkpoint-2"]  # nothing of step 3


def test_stop_signals_are_ignored_outside_the_process_that_installed_them():
    with StopSignals(timeout=None) as stop:
        stop.pid = -1  # as in a forked DataLoader worker
        signal.raise_signal(signal.SIGUSR1)
        assert not stop.requested
        stop.pid = os.getpid()
        signal.raise_signal(signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1


def test_a_signal_after_the_stop_s_checkpoint_exits_as_preempted():
    """Once the stop's checkpoint is complete (another rank may already have exited, and the launcher then signals
    this one), a stop signal exits with the stop's status, not killed by it."""
    script = (
        "import signal\n"
        "from hf_hierseg.training.interruption import StopSignals\n"
        "with StopSignals(timeout=None) as stop:\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    stop.mark_checkpoint_complete()\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    raise SystemExit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr


def test_a_stopped_rank_exits_as_preempted_with_its_logs_written_and_its_workers_gone(tmp_path):
    """`exit_stopped_rank` ends the process with the stop's status, without the interpreter's teardown, after
    flushing a buffered log handler and killing a daemonic child that ignores SIGTERM (a DataLoader worker)."""
    log_file, pid_file = tmp_path / "run.log", tmp_path / "worker.pid"
    script = (
        "import logging, logging.handlers, multiprocessing, os, sys, time\n"
        "from hf_hierseg.training.interruption import exit_stopped_rank, ignore_stop_signals\n"
        "def worker(path):\n"
        "    ignore_stop_signals()\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    handler = logging.handlers.MemoryHandler(1000, target=logging.FileHandler(sys.argv[1]))\n"
        "    logging.getLogger().addHandler(handler)\n"
        "    child = multiprocessing.get_context('fork').Process(target=worker, args=(sys.argv[2],), daemon=True)\n"
        "    child.start()\n"
        "    while not os.path.exists(sys.argv[2]) or not open(sys.argv[2]).read():\n"
        "        time.sleep(0.01)\n"
        "    logging.getLogger().warning('checkpoint written')\n"
        "    exit_stopped_rank()\n"
        "    raise SystemExit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(log_file), str(pid_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr
    assert log_file.read_text() == "checkpoint written\n"
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while is_running(worker):
        assert time.monotonic() < deadline, "the worker outlived its process"
        time.sleep(0.05)


def is_running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_a_stop_that_takes_too_long_exits_after_the_timeout():
    script = (
        "import logging, signal, time\n"
        "from hf_hierseg.training.interruption import StopSignals\n"
        "logging.basicConfig()\n"
        "with StopSignals(timeout=1.0):\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    time.sleep(120)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM
    assert time.monotonic() - started < 60
    assert "did not stop within 1 s of SIGTERM" in result.stderr


def script_environment():
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    environment.pop("ACCELERATE_USE_CPU", None)
    return environment


def launch_command(processes, arguments):
    script = str(REPO_ROOT / "scripts" / "train_supervised.py")
    if processes == 1:
        return [sys.executable, script, *arguments]
    return [*accelerate_launch(processes), script, *arguments]


def run_script(processes, arguments):
    environment = dict(script_environment(), ACCELERATE_USE_CPU="true") if processes > 1 else script_environment()
    result = subprocess.run(
        launch_command(processes, arguments), env=environment, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def wait_for_step(process, output_dir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while not ((output_dir / METRICS_FILE).is_file() and max(losses_by_step(output_dir), default=0) >= step):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.05)


def rank_process(launcher, rank):
    """The training process of `rank` among the children of an `accelerate launch` process."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "train_supervised.py" in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_signalled_run_stops_at_one_step_on_every_process_and_resumes_with_the_same_losses(
    shapes, tmp_path, processes
):
    """1 process: SIGTERM to its whole process group (DataLoader workers included, as SLURM signals every process
    of a job step); 2 processes: SIGTERM to rank 1 only. No periodic checkpoints: the stop's is the only one."""
    steps = 12
    extra = ["--dataloader_num_workers", "2", "--checkpointing_steps", "100"]
    reference = tmp_path / "uninterrupted"
    run_script(processes, supervised_arguments(shapes, reference, *extra, steps=steps))

    stopped = tmp_path / "stopped"
    arguments = supervised_arguments(shapes, stopped, *extra, steps=steps)
    environment = dict(script_environment(), ACCELERATE_USE_CPU="true") if processes > 1 else script_environment()
    process = subprocess.Popen(
        launch_command(processes, arguments),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        target = rank_process(process, 1) if processes == 2 else None
        wait_for_step(process, stopped, 2)
        signalled = time.monotonic()
        if target is None:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            target.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
        assert time.monotonic() - signalled < 60
        stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()
    if processes == 1:
        assert returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    else:
        # torch's launcher reports the status of each process, and exits with 1.
        assert returncode == 1 and stderr.count(f"exitcode  : {PREEMPTED_EXIT_CODE}") == 2, stderr[-3000:]
    last = max(losses_by_step(stopped))
    assert 2 <= last < steps
    assert checkpoint_names(stopped) == [f"checkpoint-{last}"]
    checkpoint = stopped / f"checkpoint-{last}"
    assert checkpoint_problems(checkpoint) == []
    assert {f"data_state_rank{rank}.json" for rank in range(processes)} <= {path.name for path in checkpoint.iterdir()}
    assert "Received SIGTERM" in stderr
    assert stderr.count(f"after step {last}/{steps}: saved") == processes  # every process stopped at that step
    assert not (stopped / "model.safetensors").exists()

    resumed = run_script(processes, [*arguments, "--resume_from_checkpoint", "latest"])
    assert "Resumed from" in resumed.stderr
    assert_same_losses(losses_by_step(stopped), losses_by_step(reference), range(1, steps + 1))
    for rank in range(processes):
        assert fingerprint(stopped, rank) == fingerprint(reference, rank)


@pytest.mark.slow
def test_a_run_that_fails_with_dataloader_workers_running_exits_instead_of_hanging(shapes, tmp_path):
    """An error half-way (here: an evaluation split with no decodable image, at step 2) leaves the process with the
    training DataLoader's workers running. They ignore SIGTERM, so an interpreter exit that left them to
    multiprocessing would wait for them for ever; the loop closes them on its way out."""
    data = tmp_path / "data"
    data.mkdir()
    for source in Path(shapes).glob("train-*.parquet"):
        (data / source.name).write_bytes(source.read_bytes())
    test = datasets.load_dataset("parquet", data_files=str(next(Path(shapes).glob("test-*.parquet"))), split="train")
    broken_image = {"bytes": truncated_png(), "path": None}
    test = test.cast_column("image", datasets.Image(decode=False)).map(lambda row: {"image": broken_image})
    test.cast_column("image", datasets.Image()).to_parquet(str(data / "test-00000-of-00001.parquet"))
    arguments = supervised_arguments(
        str(data), tmp_path / "run", "--dataloader_num_workers", "2", "--eval_steps", "2", steps=6
    )
    process = subprocess.Popen(
        launch_command(1, arguments),
        env=script_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        raise AssertionError("the failed run did not exit:\n" + stderr.decode()[-3000:]) from None
    stderr = stderr.decode()
    assert process.returncode not in (0, PREEMPTED_EXIT_CODE), stderr[-3000:]
    assert "The evaluation split gave no image to evaluate" in stderr, stderr[-3000:]
    assert max(losses_by_step(tmp_path / "run")) == 2  # the workers had served two steps


# ---------------------------------------------------------------------------------------------------------------
# Broken checkpoints, full disks
# ---------------------------------------------------------------------------------------------------------------


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda folder: truncate(folder / "optimizer.bin"), "optimizer.bin has"),
        (lambda folder: (folder / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b"\0" * 64), "model.safetensors has"),
        (lambda folder: (folder / "training_state.json").write_text('{"step": 2}'), "of step 2"),
    ],
    ids=["truncated", "missing", "overwritten", "wrong-step"],
)
def test_latest_skips_a_broken_newest_checkpoint_and_resumes_exactly_from_the_one_before(
    shapes, reference, tmp_path, faults, caplog, damage, reason
):
    faults[(5, 0)] = "signal"
    with pytest.raises(TrainingPreempted):
        run_supervised(shapes, tmp_path, "--checkpointing_steps", "2")
    assert checkpoint_names(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    damage(tmp_path / "checkpoint-5")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    with caplog.at_level("WARNING", logger="hf_hierseg.training.checkpointing"):
        run_supervised(shapes, tmp_path, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    warning = next(record.getMessage() for record in caplog.records if "Skipping checkpoint" in record.getMessage())
    assert "checkpoint-5" in warning and reason in warning and "checkpoint-5.invalid" in warning
    assert (tmp_path / "checkpoint-5.invalid").is_dir()
    assert_same_losses(losses_by_step(tmp_path), losses_by_step(reference), range(1, 7))
    assert fingerprint(tmp_path) == fingerprint(reference)


def test_a_broken_checkpoint_given_by_path_is_a_one_line_error(shapes, tmp_path, faults, capsys):
    faults[(2, 0)] = "signal"
    with pytest.raises(TrainingPreempted):
        run_supervised(shapes, tmp_path)
    truncate(tmp_path / "checkpoint-2" / "model.safetensors")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    arguments = supervised_arguments(shapes, tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-2"))
    with pytest.raises(InvalidInputError, match=r"checkpoint-2' cannot be resumed: model.safetensors has \d+ bytes"):
        train_supervised(*supervised_parser().parse_args_into_dataclasses(args=arguments))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    capsys.readouterr()
    assert cli.main(["train-supervised", *arguments]) == 1
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "cannot be resumed" in error_lines[0]


def test_a_full_disk_leaves_the_earlier_checkpoints_intact(shapes, reference, tmp_path, monkeypatch):
    """The optimizer state of the second checkpoint meets a full disk half-way through its file."""
    real_save = torch.save
    writes = {"optimizer": 0}

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            writes["optimizer"] += 1
            if writes["optimizer"] == 2:
                Path(f).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(CheckpointWriteError) as failure:
        run_supervised(shapes, tmp_path, "--checkpointing_steps", "2")
    message = str(failure.value)
    assert failure.value.errno == errno.ENOSPC
    assert "No space left on device" in message and "optimizer.bin" in message
    assert f"The file system of {tmp_path} has" in message and "GiB free" in message
    assert "newest: checkpoint-2" in message
    assert checkpoint_names(tmp_path) == ["checkpoint-2"]  # no checkpoint-4, no temporary folder
    assert checkpoint_problems(tmp_path / "checkpoint-2") == []
    monkeypatch.setattr(torch, "save", real_save)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    run_supervised(shapes, tmp_path, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert_same_losses(losses_by_step(tmp_path), losses_by_step(reference), range(1, 7))


def test_torch_s_own_short_write_error_is_a_write_failure_too(shapes, tmp_path, monkeypatch):
    real_save = torch.save

    def short_write(obj, f, *args, **kwargs):
        if str(f).endswith("scheduler.bin"):  # what torch's archive writer says when the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(CheckpointWriteError, match="unexpected pos"):
        run_supervised(shapes, tmp_path, "--checkpointing_steps", "2")
    assert checkpoint_names(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_and_saves_nothing_over_the_last_good_checkpoint(shapes, tmp_path, faults):
    faults[(3, 0)] = "nan"
    with pytest.raises(NonFiniteLossError) as stopped:
        run_supervised(shapes, tmp_path, "--checkpointing_steps", "2")
    message = str(stopped.value)
    assert "not finite at step 3" in message and "rank 0: nan" in message and "mix_lambda=" in message
    assert "last good checkpoint (checkpoint-2)" in message and "--max_nonfinite_steps" in message
    assert checkpoint_names(tmp_path) == ["checkpoint-2"] and checkpoint_problems(tmp_path / "checkpoint-2") == []
    assert max(losses_by_step(tmp_path)) == 2 and not (tmp_path / "model.safetensors").exists()


def test_max_nonfinite_steps_skips_updates_and_resumes_exactly(shapes, tmp_path, faults):
    faults.update({(3, 0): "nan", (4, 0): "signal"})
    skip = ["--max_nonfinite_steps", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "10"]
    with pytest.raises(TrainingPreempted):
        run_supervised(shapes, tmp_path / "stopped", *skip)
    # Step 3 made no update: same weights, BatchNorm statistics and optimizer state as after step 2; its schedule
    # moved on.
    before, after = tmp_path / "stopped" / "checkpoint-2", tmp_path / "stopped" / "checkpoint-3"
    weights_before, weights_after = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert all(torch.equal(weights_before[name], weights_after[name]) for name in weights_before)
    optimizer_before = torch.load(before / "optimizer.bin", weights_only=True)["state"]
    optimizer_after = torch.load(after / "optimizer.bin", weights_only=True)["state"]
    assert all(torch.equal(optimizer_before[k]["exp_avg"], optimizer_after[k]["exp_avg"]) for k in optimizer_before)
    schedule = [torch.load(path / "scheduler.bin", weights_only=True)["last_epoch"] for path in (before, after)]
    assert schedule[1] == schedule[0] + 1
    assert json.loads((after / "training_state.json").read_text())["nonfinite_steps"] == {"in_a_row": 1, "total": 1}
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    faults[(3, 0)] = "nan"
    reference = run_supervised(shapes, tmp_path / "uninterrupted", *skip)
    assert reference["nonfinite_steps"] == 1 and reference["train_steps"] == 6  # a skipped step counts
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = run_supervised(shapes, tmp_path / "stopped", *skip, "--resume_from_checkpoint", "latest")
    assert resumed["nonfinite_steps"] == 1
    expected = losses_by_step(tmp_path / "uninterrupted")
    assert math.isnan(expected[3]) and all(math.isfinite(expected[step]) for step in (1, 2, 4, 5, 6))
    assert_same_losses(losses_by_step(tmp_path / "stopped"), expected, range(1, 7))
    assert fingerprint(tmp_path / "stopped") == fingerprint(tmp_path / "uninterrupted")


def test_more_nonfinite_steps_in_a_row_than_allowed_stop_the_run(shapes, tmp_path, faults):
    faults.update({(2, 0): "nan", (4, 0): "nan", (5, 0): "nan"})
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 5 .*1 such step\(s\) in a row are skipped"):
        run_supervised(shapes, tmp_path, "--max_nonfinite_steps", "1")


def run_and_report(shapes, output_dir, max_nonfinite_steps, outcomes):
    """Run in each of two processes: train, then write what this process did to `outcomes/rank{r}.json`."""
    import torch.distributed

    try:
        metrics = run_supervised(
            shapes, output_dir, "--max_nonfinite_steps", str(max_nonfinite_steps), "--checkpointing_steps", "2"
        )
        outcome = {"finished": metrics["nonfinite_steps"]}
    except NonFiniteLossError as error:
        outcome = {"stopped": str(error)}
    Path(outcomes, f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(outcome))


def two_processes_with_a_nan_loss_of_rank_1(shapes, output_dir, max_nonfinite_steps, outcomes):
    """Run in a fresh interpreter by the test below: rank 1's loss is NaN at step 3, on two processes forked by
    `accelerate.debug_launcher` (forking the pytest process itself, with the threads earlier tests started, can
    deadlock)."""
    compute_loss = SupervisedObjective.compute_loss

    def nan_at_step_3_of_rank_1(self, module, batch, step, micro_step, accelerator):
        loss, metrics = compute_loss(self, module, batch, step, micro_step, accelerator)
        if (step + 1, accelerator.process_index, micro_step) == (3, 1, 0):
            loss = loss * float("nan")
        return loss, metrics

    SupervisedObjective.compute_loss = nan_at_step_3_of_rank_1  # this throw-away interpreter only
    torch.set_num_threads(1)
    debug_launcher(run_and_report, (shapes, output_dir, max_nonfinite_steps, outcomes))


@pytest.mark.slow
@pytest.mark.parametrize("max_nonfinite_steps", [0, 1])
def test_two_processes_take_the_same_decision_on_a_nan_loss_of_one(shapes, tmp_path, max_nonfinite_steps):
    """Rank 1's loss is NaN at step 3 (two forked CPU processes, `accelerate.debug_launcher`)."""
    outcomes = tmp_path / "outcomes"
    outcomes.mkdir()
    arguments = (shapes, str(tmp_path / "run"), max_nonfinite_steps, str(outcomes))
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from {Path(__file__).stem} import two_processes_with_a_nan_loss_of_rank_1 as run; run(*{arguments!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=script_environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reported = [json.loads((outcomes / f"rank{rank}.json").read_text()) for rank in range(2)]
    if max_nonfinite_steps == 0:
        for outcome in reported:
            assert "not finite at step 3" in outcome["stopped"] and "rank 1: nan" in outcome["stopped"]
        assert checkpoint_names(tmp_path / "run") == ["checkpoint-2"]
    else:
        assert reported == [{"finished": 1}, {"finished": 1}]
        assert fingerprint(tmp_path / "run", 0) == fingerprint(tmp_path / "run", 1)
