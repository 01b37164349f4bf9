"""The device check (scripts/check_device.py): on a machine without CUDA it skips with a message and exit status 0."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_hierseg.apps.check_device import cuda_unavailable_reason, run_device_check


ROOT = Path(__file__).resolve().parents[1]


def test_skips_cleanly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    messages = []
    result = run_device_check(log=messages.append)
    assert result == {"skipped": cuda_unavailable_reason()} and "no CUDA device" in result["skipped"]
    assert len(messages) == 1 and messages[0].startswith("Skipping the device check: no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the checks")
def test_script_exits_0_on_a_cpu_only_machine():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_device.py")], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert "Skipping the device check: no CUDA device" in completed.stdout
