"""LoRA on an int8 base lowers the real CCPM loss (issue 13's check): the real CPM-Bee vocab and CCPM
records from ../shared/cpm-bee (skipped where that folder is absent), a tiny randomly initialised
model quantized with ``quantize_state_dict.py --int8``, 40 CPU steps of finetune_cpm_bee_qlora.py --int8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpm_live.convert.cli import main as quantize_main
from cpm_live.models import CPMBee, CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.training.cli import main as finetune
from cpm_live.training.metrics import read_metrics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "cpm-bee"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "ccpm" / "bee_data" / "eval.jsonl").is_file(),
                                 reason="needs ../shared/cpm-bee (CCPM data and the real vocab)")]
STEPS, RECORDS = 40, 320


def test_lora_on_int8_base_lowers_ccpm_loss_by_15_percent(tmp_path):
    vocab = SHARED / "vocab" / "bee.txt"
    lines = (SHARED / "ccpm" / "bee_data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:RECORDS]
    (tmp_path / "ccpm.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = CPMBeeConfig(vocab_size=CPMBeeTokenizer(vocab).vocab_size, dim_model=64, num_heads=4, dim_head=16,
                          dim_ff=128, num_layers=2, half=False)
    config.to_json_file(tmp_path / "config.json")
    torch.manual_seed(0)
    torch.save(dict(CPMBee(config).state_dict()), tmp_path / "dense.pt")
    quantize_main(["--input-path", str(tmp_path / "dense.pt"), "--output-path", str(tmp_path / "int8.safetensors"),
                   "--device", "cpu", "--int8"])
    finetune(["--model-config", str(tmp_path / "config.json"), "--int8", "--load", str(tmp_path / "int8.safetensors"),
              "--vocab", str(vocab), "--dataset", str(tmp_path / "ccpm.jsonl"), "--save", str(tmp_path / "run"),
              "--train-iters", str(STEPS), "--epoch", "10", "--max-length", "128", "--batch-size", "4",
              "--engine", "torch", "--device", "cpu", "--lr", "1e-2", "--lr-decay-style", "constant",
              "--warmup-iters", "2", "--weight-decay", "0", "--inspect-iters", "0",
              "--no-activation-checkpointing", "--seed", "1"], qlora=True)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"\nCCPM, LoRA on int8 base, {STEPS} CPU steps: loss {first:.3f} -> {last:.3f} "
          f"({1 - last / first:.1%} lower)")
    assert last < 0.85 * first
    settings = json.loads((tmp_path / "run" / "model_config.cpm_live.json").read_text())
    assert settings["int8"] is True and settings["int4"] is False
