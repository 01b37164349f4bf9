"""Processes a test starts that listen on a port: a free port for each, so that tests can run side by side
(`pytest -n 2`), and `accelerate launch` for several CPU processes as the README gives it for a CPU-only machine."""

import socket
import sys


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """`python -m accelerate.commands.launch` for `num_processes` processes on this machine, on a free port (its
    default, 29500, would clash with another launch running beside it). CPU processes need the environment variable
    `ACCELERATE_USE_CPU=true` (`--cpu --num_processes 2` starts only one)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
