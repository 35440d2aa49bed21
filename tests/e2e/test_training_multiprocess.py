"""QLoRA training under real ``torchrun`` with 2 CPU ranks (gloo): train, evaluate, save, resume, and
recover from a killed rank through torchrun's restarts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpm_live.training.metrics import read_metrics
from tests.conftest import REPO, base_args

pytestmark = pytest.mark.slow
TIMEOUT = 300


def torchrun(tiny: Path, save: Path, steps: int, *extra: str, restarts: int = 0) -> list[str]:
    script = str(REPO / "src" / "finetune_cpm_bee_qlora.py")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(restarts), script, "--model-config", str(tiny / "config-int4.json"),
            "--load", str(tiny / "base-int4.safetensors"),
            *base_args(tiny, save, steps, "--batch-size", "4", "--log-interval", "1", "--lr", "5e-3", *extra)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_ranks_train_evaluate_save_and_resume(tiny, tmp_path):
    save = tmp_path / "run"
    # 12 eval records, one per row: global batches of 8 and 4 rows, so rank 1 has no rows in the
    # second one and must still take part in the sharded forward.
    eval_file = tmp_path / "eval.jsonl"
    lines = (REPO / "src" / "cpm_live" / "demo_data" / "eval.jsonl").read_text().splitlines(keepends=True)
    eval_file.write_text("".join(lines[:12]))
    eval_flags = ("--eval_dataset", str(eval_file), "--eval-interval", "3", "--save-iters", "3")
    first = subprocess.run(torchrun(tiny, save, 6, *eval_flags), env=env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = read_metrics(str(save / "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # rank 0 logs once per step
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert (save / "cpm_bee_finetune-delta-best" / "adapter_model.safetensors").exists()
    assert (save / "cpm_bee_finetune-delta-last" / "adapter_config.json").exists()

    second = subprocess.run(torchrun(tiny, save, 8, *eval_flags, "--resume", "auto"), env=env(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step-00000006" in second.stdout
    steps = [r["step"] for r in read_metrics(str(save / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 9))


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def test_killed_rank_restarts_and_resumes_from_last_checkpoint(tiny, tmp_path):
    save = tmp_path / "run"
    log = tmp_path / "log.txt"  # a file, not a pipe: nobody reads a pipe until the end, and it would fill up
    # One restart must be enough: the engine scopes its store keys to the attempt, so the new
    # workers never read the dead attempt's addresses (which failed as "connectFullMesh ... refused").
    proc = subprocess.Popen(torchrun(tiny, save, 14, "--save-iters", "3", "--resume", "auto", restarts=1),
                            env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    latest = save / "checkpoints" / "latest"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not latest.exists():
        time.sleep(0.2)
    assert latest.exists(), "no checkpoint was written"
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # one rank dies mid-run
    proc.wait(timeout=TIMEOUT)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    steps = [r["step"] for r in read_metrics(str(save / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 15)), steps  # the restarted job continued, no step lost or repeated


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


def test_a_stopped_rank_fails_the_other_within_dist_timeout(tiny, tmp_path):
    save, log = tmp_path / "run", tmp_path / "log.txt"
    proc = subprocess.Popen(torchrun(tiny, save, 100_000, "--dist-timeout", "3"), env=env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and not (save / "metrics.jsonl").exists():
            time.sleep(0.2)
        assert (save / "metrics.jsonl").exists(), log.read_text()[-4000:]
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        stopped = workers[1]
        os.kill(stopped, signal.SIGSTOP)  # rank 1 hangs mid-run: rank 0 waits in its next collective
        start = time.time()
        while time.time() < start + 60 and _alive(workers[0]):
            time.sleep(0.2)
        waited = time.time() - start  # until rank 0 has exited by itself
        os.kill(stopped, signal.SIGKILL)  # torchrun would wait 30 s for the stopped rank to take its SIGTERM
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert "error: rank 0: another rank did not answer within --dist-timeout 3 s (Timed out waiting 3000ms" in out, \
        out[-4000:]
    assert waited < 20 and proc.returncode != 0  # seconds, not gloo's default 30 minutes
