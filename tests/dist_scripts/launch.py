"""Launching a script under real ``torchrun`` processes from a test, with a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 300  # a hang (e.g. ranks waiting in different collectives) fails instead of blocking CI
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_torchrun(script: Path, nproc: int, *args: str, timeout: float = TIMEOUT_S) -> str:
    """``python -m torch.distributed.run --standalone`` (it rendezvouses on a free port itself);
    on timeout the launcher and its workers are killed. Returns the output; fails the test on a
    non-zero exit, showing the output's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group: killable with its workers
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s (hang?):\n{output[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{output[-6000:]}")
    return output
