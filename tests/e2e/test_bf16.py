"""bf16 QLoRA through the training CLI: it trains, resumes and records the compute dtype it chose."""

import json

import pytest
import torch

from cpm_live.config import CPMBeeConfig, resolve_compute_dtype
from cpm_live.training.cli import main as finetune
from tests.conftest import base_args


def test_bf16_qlora_trains_resumes_and_records_the_compute_dtype(tiny, tmp_path, capsys):
    config = CPMBeeConfig.from_json_file(tiny / "config-int4.json", precision="bf16")
    config.to_json_file(tmp_path / "config-bf16-int4.json")
    flags = ["--model-config", str(tmp_path / "config-bf16-int4.json"), "--load", str(tiny / "base-int4.safetensors"),
             "--use-delta", "--lr", "1e-3"]
    straight = finetune(base_args(tiny, tmp_path / "a", 6, *flags))
    expected = resolve_compute_dtype("auto", torch.bfloat16, "cpu")
    assert f"int4 compute dtype: auto -> {expected} on cpu (model dtype bfloat16)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "model_config.cpm_live.json").read_text())
    assert (saved["precision"], saved["int4_compute_dtype"]) == ("bf16", expected)
    finetune(base_args(tiny, tmp_path / "b", 3, *flags, "--save-iters", "3"))
    assert (tmp_path / "b" / "checkpoints" / "step-00000003").is_dir()  # the second run resumes from it
    resumed = finetune(base_args(tiny, tmp_path / "b", 6, *flags, "--save-iters", "3", "--resume", "auto"))
    assert resumed["step"] == straight["step"] == 6
    a, b = ([json.loads(line)["loss"] for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)] for run_dir in ("a", "b"))
    assert len(a) == len(b) == 6 and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert a[-1] < a[0]  # it learns in bf16
