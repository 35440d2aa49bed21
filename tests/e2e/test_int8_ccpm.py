"""The int8 check end to end, through the scripts a user runs: LoRA on an int8 base lowers the CCPM
loss by 15% in 40 CPU steps, and the merged model exports in the int8 layout.

A randomly initialised CPM-Bee cannot show this: its logits are capped near uniform (see
:mod:`cpm_live.demo.format_base`), so the base here is the format-trained stand-in for a pretrained
model, built from the *texts* of the CCPM records (their answers are never read). It answers CCPM's
new question with text; what the adapter learns in 40 steps is to answer with one of the
``<option_k>`` labels and stop (the choice among the four lines stays near chance for 2 layers).

Two data sets: the real vocab and CCPM from ../shared/cpm-bee (skipped where absent), and synthetic
CCPM-like lines with the tiny vocab (always runs).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cpm_live.checkpoint import build_model
from cpm_live.demo.format_base import main as format_base
from cpm_live.models import CPMBeeConfig
from cpm_live.tokenizers import build_tiny_vocab
from cpm_live.training.metrics import read_metrics
from tests.conftest import REPO, SHARED
from tests.e2e.test_tutorial import load_reformat, raw_line

STEPS, RECORDS = 40, 600
PROJECTIONS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
# (vocab, raw CCPM folder, format-base steps); measured drops: real 84-89%, synthetic in the test's print.
SOURCES = {
    "real": pytest.param("real", marks=[pytest.mark.realvocab, pytest.mark.slow, pytest.mark.skipif(
        not (SHARED / "ccpm" / "raw_data" / "train.jsonl").is_file(), reason=f"{SHARED} not present")]),
    "synthetic": pytest.param("synthetic"),
}


def script(name: str, *args: str) -> None:
    """Run ``src/<name>`` as a user would (one intra-op thread: the test machine's cores are shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "src" / name), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def ccpm_data(source: str, root: Path) -> tuple[str, Path, int]:
    """(vocab, CPM-Bee-format CCPM training file of RECORDS lines, format-base steps)."""
    raw = root / "raw"
    raw.mkdir()
    if source == "real":
        vocab, steps = str(SHARED / "vocab" / "bee.txt"), 300
        lines = (SHARED / "ccpm" / "raw_data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:RECORDS]
    else:
        vocab, steps = build_tiny_vocab(root / "vocab.txt"), 200
        rng = random.Random(0)
        lines = [raw_line(rng) for _ in range(RECORDS)]
    (raw / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_reformat().main(["--input", str(raw), "--output", str(root / "bee_data")]) == 0
    return vocab, root / "bee_data" / "train.jsonl", steps


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_lora_on_int8_format_base_lowers_ccpm_loss_and_exports_int8(source, tmp_path):
    vocab, train, base_steps = ccpm_data(source, tmp_path)
    base = tmp_path / "base"
    format_base(["--data", str(train), "--vocab", vocab, "--out", str(base), "--steps", str(base_steps),
                 "--seed", "1"])

    int8 = tmp_path / "base-int8.safetensors"
    script("quantize_state_dict.py", "--input-path", str(base / "base.pt"), "--output-path", str(int8), "--int8")
    config8 = tmp_path / "config-int8.json"
    config8.write_text(json.dumps({**json.loads((base / "config.json").read_text()), "int8": True}))
    build_model(CPMBeeConfig.from_json_file(config8), int8)  # a config holding "int8": true loads it

    run = tmp_path / "run"
    # The tutorial's command, sized for 40 CPU steps; a 2-layer model's adapter takes --lr 1e-2 (10B: 1e-4).
    script("finetune_cpm_bee.py", "--model-config", str(config8), "--int8", "--use-delta", "--load", str(int8),
           "--vocab", vocab, "--dataset", str(train), "--save", str(run), "--save-name", "ccpm_int8",
           "--epoch", "1", "--train-iters", str(STEPS), "--stop-at-train-iters", "--batch-size", "2",
           "--max-length", "512", "--lr", "1e-2", "--warmup-iters", "1", "--weight-decay", "0.01",
           "--engine", "torch", "--device", "cpu", "--seed", "1", "--inspect-iters", "0")
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == STEPS
    first, last = mean(losses[:5]), mean(losses[-5:])
    print(f"\n{source} CCPM, LoRA r=8 q/v on the int8 format base, {STEPS} steps: loss {first:.3f} -> {last:.3f} "
          f"({1 - last / first:.1%} lower)")
    assert last < 0.75 * first  # the target is 15% lower; real data measured 84-89%
    settings = json.loads((run / "model_config.cpm_live.json").read_text())
    assert settings["int8"] is True and settings["int4"] is False

    merged = tmp_path / "merged-int8.safetensors"
    script("export_model.py", "--model-config", str(config8), "--load", str(int8), "--delta",
           str(run / "ccpm_int8-delta-last"), "--output", str(merged), "--dtype", "int8")
    with safe_open(int8, "pt") as before, safe_open(merged, "pt") as after:
        assert after.metadata()["format"] == before.metadata()["format"] == "cpm_live.int8"
        assert set(after.keys()) == set(before.keys())
        changed = set()
        for key in before.keys():
            a, b = before.get_tensor(key), after.get_tensor(key)
            assert (a.dtype, a.shape) == (b.dtype, b.shape), key
            if not torch.equal(a, b):
                changed.add(key.rsplit(".", 2)[-2])
        layers = {k.rsplit(".", 1)[0] for k in before.keys() if k.endswith(".SCB")}
        assert {name.rsplit(".", 1)[-1] for name in layers} == set(PROJECTIONS)
        for name in layers:
            assert after.get_tensor(f"{name}.weight").dtype == torch.int8
            assert after.get_tensor(f"{name}.SCB").dtype == torch.float32
    assert changed == {"project_q", "project_v"}  # the LoRA targets, re-quantized after the merge
    build_model(CPMBeeConfig.from_json_file(config8), merged)
