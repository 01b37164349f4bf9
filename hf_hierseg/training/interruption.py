"""Stopping a training run cleanly on SIGTERM or SIGUSR1, the signals SLURM and Kubernetes send before a kill.

While the loop runs (`StopSignals`), the first signal only asks it to stop: the loop finishes its current optimiser
step, all processes agree on that step (an all-reduce of the stop flag every step, so a signal to one rank stops them
all at the same step), write a complete checkpoint of it, log it and raise `TrainingPreempted`, a `SystemExit` with
status `PREEMPTED_EXIT_CODE`:

    75 (`os.EX_TEMPFAIL`, sysexits.h's "temporary failure: retry later"). It differs from success (0), from errors
    (1; 2 for bad arguments) and from a kill by the signal itself (-15 in Python, 143 = 128 + 15 in a shell), so a
    job script or a restart policy can tell "stopped cleanly at a checkpoint: resume me" from "failed" or "killed".

Then `--resume_from_checkpoint latest` continues with the losses of an uninterrupted run. A second signal exits at
once: the handler that was installed before the run (by default: terminate) is restored and the signal delivered
again; nothing of the current step is saved, earlier checkpoints stay intact (they are written atomically). If the
clean stop takes more than `timeout` seconds (a step, an evaluation and a checkpoint normally fit well within it; a
hung collective does not), the process exits with status 128 + the signal number.

On several processes, every rank has written its part of the checkpoint before any of them exits, and then each rank
ends its process with `PREEMPTED_EXIT_CODE` at once (`exit_stopped_rank`) instead of raising `TrainingPreempted`:
no teardown of the process group (`destroy_process_group` can hang, pytorch/pytorch#75097) or of the DataLoader
workers. A teardown that hangs once another rank has exited would make the launcher, which terminates the remaining
ranks as soon as the first one exits (torchrun, `accelerate launch`), SIGKILL after 30 s a rank whose checkpoint was
complete. A stop signal that arrives while a rank waits for the others to finish their parts also ends it with
`PREEMPTED_EXIT_CODE`, not as a kill.

Only the process that installed the handlers acts on them. DataLoader workers (SLURM signals every process of a job
step) ignore the signals: forked workers inherit the handler, which does nothing outside its own process, and
`ignore_stop_signals` is the workers' `worker_init_fn`.
"""

import logging
import multiprocessing
import os
import signal
import sys
import threading


logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = os.EX_TEMPFAIL
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_STOP_TIMEOUT = 300.0


class TrainingPreempted(SystemExit):
    """The run stopped cleanly on a signal after `step` optimiser steps, saved in `checkpoint`. Uncaught, it ends
    the interpreter with status `PREEMPTED_EXIT_CODE` and no traceback."""

    def __init__(self, step, checkpoint):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self):
        return f"stopped on a signal after step {self.step}; resume from {self.checkpoint}"


def exit_as_preempted(number, frame):
    """A stop signal once this rank's part of the stop's checkpoint is written: exit as preempted."""
    os._exit(PREEMPTED_EXIT_CODE)


def exit_stopped_rank():
    """End this rank of a multi-process run with `PREEMPTED_EXIT_CODE` now, once every rank has written its part of
    the stop's checkpoint (see the module docstring): logs flushed, this process's daemonic children (the DataLoader
    workers, which ignore SIGTERM) killed as a normal exit would terminate them, nothing else torn down."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(PREEMPTED_EXIT_CODE)


def ignore_stop_signals(worker_id=None):
    """`worker_init_fn` of the DataLoaders: workers leave SIGTERM / SIGUSR1 to the training process."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class StopSignals:
    """Context manager turning SIGTERM / SIGUSR1 into a stop request (`requested`) for the training loop; see the
    module docstring. Outside the main thread (where Python cannot install signal handlers) it does nothing.

    Args:
        timeout: seconds from the first signal to a forced exit (None: no limit).
    """

    def __init__(self, timeout=DEFAULT_STOP_TIMEOUT):
        self.timeout = timeout
        self.received = None  # the first signal's number
        self.previous = {}
        self.pid = None
        self.watchdog = None
        self.checkpoint_complete = False

    @property
    def requested(self):
        return self.received is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.pid = os.getpid()
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def mark_checkpoint_complete(self):
        """This rank's part of the stop's checkpoint is written: from now on a stop signal (a launcher tearing this rank
        down because another rank has already exited with the stop's status) exits at once with
        `PREEMPTED_EXIT_CODE`, since nothing is lost."""
        self.checkpoint_complete = True

    def __exit__(self, exc_type, exc_value, traceback):
        if self.watchdog is not None:
            self.watchdog.cancel()
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
        return False

    def handle(self, number, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker: the training process decides
            return
        if self.checkpoint_complete:
            exit_as_preempted(number, frame)
        name = signal.Signals(number).name
        if self.received is None:
            self.received = number
            logger.warning(
                "Received %s: finishing the current step, then saving a checkpoint and exiting with status %d "
                "(a second signal exits at once).",
                name,
                PREEMPTED_EXIT_CODE,
            )
            if self.timeout is not None:
                self.watchdog = threading.Timer(self.timeout, self.force_exit, (number,))
                self.watchdog.daemon = True
                self.watchdog.start()
            return
        logger.warning("Received %s again: exiting now, without a checkpoint of the current step.", name)
        previous = self.previous.get(number)
        signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(number)

    def force_exit(self, number):
        logger.error(
            "The run did not stop within %g s of %s: exiting without finishing its checkpoint.",
            self.timeout,
            signal.Signals(number).name,
        )
        os._exit(128 + number)


__all__ = [
    "DEFAULT_STOP_TIMEOUT",
    "PREEMPTED_EXIT_CODE",
    "STOP_SIGNALS",
    "StopSignals",
    "TrainingPreempted",
    "exit_stopped_rank",
    "ignore_stop_signals",
]
