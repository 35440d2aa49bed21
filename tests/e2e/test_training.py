"""The one training loop on tiny models: learning in each mode, resume, SIGTERM, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpm_live.models import CPMBeeConfig
from cpm_live.training.cli import main as finetune
from cpm_live.training.cli import qlora_main
from cpm_live.training.metrics import read_metrics
from tests.conftest import REPO, base_args


def losses(save: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(str(save / "metrics.jsonl")) if "loss" in r]


MODES = {  # LoRA modes learn the option task, new to the base
    "full": ["--model-config", "config.json", "--load", "random.pt", "--lr", "1e-2"],
    "lora": ["--model-config", "config.json", "--load", "base.pt", "--use-delta", "--lora-r", "16",
             "--lora-targets", "project_q,project_v,w_0,w_1,w_out", "--lr", "2e-2"],
    "qlora": ["--model-config", "config-int4.json", "--load", "base-int4.safetensors", "--use-delta",
              "--lora-r", "16", "--lora-targets", "project_q,project_v,w_0,w_1,w_out", "--lr", "2e-2"],
    # LLM.int8 base, quantized on load from the fp checkpoint by the --int8 flag
    "int8-lora": ["--model-config", "config.json", "--int8", "--load", "base.pt", "--use-delta",
                  "--lora-r", "16", "--lora-targets", "project_q,project_v,w_0,w_1,w_out", "--lr", "2e-2"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_model_learns(tiny, tmp_path, mode):
    flags = [str(tiny / f) if f.endswith((".json", ".pt", ".safetensors")) else f for f in MODES[mode]]
    args = base_args(tiny, tmp_path, 120, "--log-interval", "1", *flags)
    if mode != "full":
        args[args.index("--dataset") + 1] = str(tiny / "options.jsonl")
    result = finetune(args)
    assert result["step"] == 120
    curve = losses(tmp_path)
    start, end = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    print(f"{mode}: loss {start:.3f} -> {end:.3f}")
    assert end < 0.6 * start, f"{mode}: loss {start:.3f} -> {end:.3f}"
    if mode == "full":
        reloaded = torch.load(tmp_path / "cpm_bee_finetune-last.pt", weights_only=True)
        assert set(reloaded) == set(torch.load(tiny / "base.pt", weights_only=True))
    else:
        adapter = tmp_path / "cpm_bee_finetune-delta-last"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 16
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny, tmp_path):
    flags = ["--model-config", str(tiny / "config-int4.json"), "--load", str(tiny / "base-int4.safetensors"),
             "--use-delta", "--lr", "5e-3", "--log-interval", "1", "--save-iters", "4"]
    full = finetune(base_args(tiny, tmp_path / "a", 10, *flags))
    assert full["step"] == 10
    finetune(base_args(tiny, tmp_path / "b", 4, *flags))
    resumed = finetune(base_args(tiny, tmp_path / "b", 10, *flags, "--resume", "auto"))
    assert resumed["step"] == 10
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 10
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    latest = (tmp_path / "b" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000010"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT (Ctrl-C)"])
def test_a_signal_saves_a_checkpoint_exits_nonzero_then_resumes(tiny, tmp_path, signum):
    save = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "src" / "finetune_cpm_bee_qlora.py"), "--model-config",
           str(tiny / "config-int4.json"), "--load", str(tiny / "base-int4.safetensors"),
           *base_args(tiny, save, 100000, "--log-interval", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "log.txt"  # a file, not a pipe that could fill up while nobody reads it
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    metrics = save / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    out = log.read_text()
    # Saved but not finished: 128 + the signal, as a shell reports it, so a scheduler does not see success.
    assert proc.returncode == 128 + signum, out[-3000:]
    assert f"({signal.Signals(signum).name}); checkpoint saved, continue with --resume auto" in out
    assert "Traceback" not in out
    latest = (save / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert stopped_at >= 3
    result = finetune(base_args(tiny, save, stopped_at + 2, "--model-config", str(tiny / "config-int4.json"),
                                "--load", str(tiny / "base-int4.safetensors"), "--use-delta", "--resume", "auto"))
    assert result["step"] == stopped_at + 2


def test_malformed_data_line_fails_naming_file_and_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "<ans>": "b"}\n{"input": "broken\n')
    args = base_args(tiny, tmp_path / "out", 5, "--model-config", str(tiny / "config.json"))
    args[args.index("--dataset") + 1] = str(bad)
    with pytest.raises(SystemExit, match=r"error: .*bad\.jsonl:2"):
        finetune(args)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_vocab_fails_clearly(tiny, tmp_path):
    args = base_args(tiny, tmp_path / "out", 5, "--model-config", str(tiny / "config.json"))
    del args[0:2]  # no --vocab, and no vocab.txt beside a checkpoint
    with pytest.raises(SystemExit, match="error: no vocab.*--vocab"):
        finetune(args)


def test_unwritable_save_fails_before_training(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match="not a writable directory"):
        finetune(base_args(tiny, blocker / "sub", 5, "--model-config", str(tiny / "config.json")))


def test_int4_without_lora_is_refused(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--use-delta"):
        finetune(base_args(tiny, tmp_path, 5, "--model-config", str(tiny / "config-int4.json")))


def test_qlora_script_trains_the_int8_base_its_config_asks_for(tiny, tmp_path):
    """finetune_cpm_bee_qlora.py's int4 default applies only when neither a flag nor the config
    chooses a quantization: a config with "int8": true gets an int8 base, without --int8."""
    config = tmp_path / "config-int8.json"
    CPMBeeConfig.from_json_file(tiny / "config.json", int8=True).to_json_file(config)
    run = tmp_path / "run"
    qlora_main(base_args(tiny, run, 2, "--model-config", str(config), "--load", str(tiny / "base.pt"),
                         "--lora-r", "4"))
    saved = CPMBeeConfig.from_json_file(run / "model_config.cpm_live.json")
    assert saved.quantization.kind == "int8"
    assert len(losses(run)) == 2
