"""A long stand-in base build split into sessions: ``train_base(save_iters=N)`` stops on SIGTERM with
:class:`BuildInterrupted` after saving, and the next call continues to the end instead of starting over."""

import os
import signal
import subprocess
import sys
import time

from cpm_live.demo.format_base import train_base
from cpm_live.training.metrics import read_metrics
from tests.conftest import DATA

STEPS = 200


def build(tiny, out, steps=STEPS):
    return train_base(str(tiny / "config.json"), str(tiny / "vocab.txt"), str(DATA / "base_train.jsonl"), str(out),
                      steps, lr=1e-2, batch_size=4, max_length=64, warmup=2, seed=0, log_interval=1,
                      decay="cosine", heldout=str(DATA / "eval.jsonl"), eval_interval=50, save_iters=50)


def test_a_sigterm_ends_a_session_and_the_next_call_finishes_the_build(tiny, tmp_path):
    out = tmp_path / "base"
    code = (f"import sys; sys.path.insert(0, {str(tiny.parents[2])!r})\n"
            "from pathlib import Path\n"
            "from cpm_live.demo.format_base import BuildInterrupted\n"
            "from tests.e2e.test_base_build_sessions import build\n"
            "try:\n"
            f"    build(Path({str(tiny)!r}), Path({str(out)!r}))\n"
            "except BuildInterrupted as e:\n"
            "    print('interrupted:', e)\n"
            "    sys.exit(3)\n")
    log = tmp_path / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    metrics = out / "train" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 3, text[-3000:]
    assert "interrupted: base build stopped before step" in text and "run the same command again" in text
    assert not (out / "base.pt").exists()
    stopped_at = max(r["step"] for r in read_metrics(str(metrics)))
    assert 3 <= stopped_at < STEPS

    checkpoint = build(tiny, out)
    records = read_metrics(str(metrics))
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "eval_loss" in r] == [50, 100, 150, 200]
    assert os.path.isfile(checkpoint)
