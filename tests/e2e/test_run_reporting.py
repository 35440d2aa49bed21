"""What a fine-tuning run tells its user, on a 200-step CPU QLoRA run in a fresh process (stdout not a
TTY): timestamped step lines with step/total, elapsed and ETA; an accuracy evaluation that does not
raise the run's memory high-water mark; the adapter always at ``<name>-delta-best``; one closing
summary; and a warning when nothing will be kept."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cpm_live.demo import DEMO_WORDS
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.tokenizers.bee import build_tiny_vocab
from cpm_live.training.metrics import read_metrics
from tests.conftest import DATA, REPO

VOCAB_SIZE = 86583  # CPM-Bee's: the logits of a whole eval set's prompts are what used to blow up memory
STEPS, EVAL_AT = 200, 100
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| step (\d+)/200 \| epoch \d+ \| "
                       r"elapsed (\d+:\d\d:\d\d) \| eta (\d+:\d\d:\d\d) \| loss [\d.]+ \| lr ", re.M)


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """The demo words plus filler entries up to CPM-Bee's vocabulary size, and its tiny config."""
    root = tmp_path_factory.mktemp("bigvocab")
    small = build_tiny_vocab(root / "small.txt", list(DEMO_WORDS) + [" " + w for w in DEMO_WORDS])
    tokens = Path(small).read_text(encoding="utf-8").splitlines()
    tokens += [f"~{i:05d}" for i in range(VOCAB_SIZE - len(tokens))]
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    assert CPMBeeTokenizer(root / "vocab.txt").vocab_size == VOCAB_SIZE
    config = json.loads((REPO / "src" / "config" / "cpm-bee-tiny.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB_SIZE}))
    return root


def finetune(big_vocab, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "src" / "finetune_cpm_bee_qlora.py"), "--device", "cpu", "--engine", "torch",
           "--model-config", str(big_vocab / "config.json"), "--vocab", str(big_vocab / "vocab.txt"),
           "--dataset", str(DATA / "train.jsonl"), "--epoch", "1000", "--train-iters", str(STEPS),
           "--batch-size", "2", "--max-length", "64", "--lr", "1e-3", "--warmup-iters", "1", "--inspect-iters", "0",
           "--no-activation-checkpointing", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_200_step_run_reports_progress_keeps_its_memory_and_says_where_its_adapter_is(big_vocab, tmp_path):
    save = tmp_path / "run"
    out = finetune(big_vocab, "--save", str(save), "--save-name", "ccpm", "--save-iters", "100",
                   "--eval_dataset", str(DATA / "eval.jsonl"), "--eval-interval", str(EVAL_AT),
                   "--eval-metrics", "accuracy", "--max-eval-samples", "32").stdout

    lines = STEP_LINE.findall(out)
    assert [int(step) for _, step, _, _ in lines] == list(range(1, STEPS + 1))
    eta_seconds = [sum(int(x) * 60 ** i for i, x in enumerate(reversed(eta.split(":")))) for *_, eta in lines]
    assert eta_seconds[-1] == 0 and max(eta_seconds[:10]) >= eta_seconds[-1]
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| step 100 \| eval loss [\d.]+ \| accuracy ", out, re.M)

    # The high-water mark of the process's RSS (ru_maxrss = VmHWM) after the accuracy evaluation and
    # 100 more steps, against the step just before it. Before decoding in batches without prompt logits
    # the first accuracy evaluation multiplied it (benchmarks/eval_memory.py).
    peaks = {r["step"]: r["peak_memory_mb"] for r in read_metrics(save / "metrics.jsonl") if "loss" in r}
    print(f"\npeak before eval {peaks[EVAL_AT]:.0f} MiB, after {peaks[STEPS]:.0f} MiB "
          f"({peaks[STEPS] / peaks[EVAL_AT]:.3f}x)")
    assert peaks[STEPS] <= 1.10 * peaks[EVAL_AT]

    best = save / "ccpm-delta-best"
    assert "lowest eval loss" in (best / "README.md").read_text()
    summary = out[out.index("run summary:"):]
    assert f"best weights:    {best} (lowest eval loss" in summary
    assert f"last weights:    {save / 'ccpm-delta-last'}" in summary
    assert f"last checkpoint: {save / 'checkpoints' / 'step-00000200'}" in summary
    assert "--resume auto" in summary and re.search(r"best eval loss:  [\d.]+ at step (100|200)", summary)


def test_a_run_without_save_warns_at_the_start(big_vocab):
    out = finetune(big_vocab, "--train-iters", "2").stdout
    warning = "warning: no --save given: this run keeps nothing"
    assert warning in out and out.index(warning) < out.index("trainable params")
    assert "nothing was saved (no --save given)" in out
