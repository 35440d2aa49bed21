"""Generation's speed report: prompt and decode tokens counted and timed apart, the stderr line and
``--stats`` JSON of ``cpm-bee-generate``, and ``--stats`` never written over one of the run's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cpm_live.generation import Decoder, GenerationStats, build_batch, build_prompt, greedy_choice, sample
from cpm_live.generation.cli import main as generation_main
from cpm_live.models import CPMBee, CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from tests.conftest import CONFIG_DIR

SAMPLES = [{"input": "今天天气很好", "<ans>": ""}, {"input": "hello world", "question": "what?", "<ans>": {"a": ""}}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CPMBeeTokenizer:
    return CPMBeeTokenizer(build_tiny_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


@pytest.fixture(scope="module")
def model(tokenizer) -> CPMBee:
    config = CPMBeeConfig.from_json_file(CONFIG_DIR / "cpm-bee-tiny.json", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = CPMBee(config)
    nn.init.normal_(model.input_embedding.weight, std=1.0)  # decisive logits, as in test_generation
    return model.eval()


@pytest.fixture()
def checkpoint(tmp_path, tokenizer, model) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "vocab.txt").write_text(Path(tokenizer.vocab_file).read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "config.json").write_text(model.config.to_json_string(), encoding="utf-8")
    return folder


def test_decoder_counts_prompt_and_generated_tokens(tokenizer, model):
    prompts = [build_prompt(tokenizer, s) for s in SAMPLES]
    stats = GenerationStats()
    with torch.inference_mode():
        decoder = Decoder(model, tokenizer, build_batch(tokenizer, prompts, torch.device("cpu")), stats=stats)
        answers = sample(decoder, greedy_choice, max_length=5)
    assert stats.prompt_tokens == sum(len(p.input_ids) for p in prompts)  # left padding not counted
    assert stats.decode_tokens == sum(len(a) for a in answers) > 0  # one token per row and step
    assert stats.prompt_seconds > 0 and stats.decode_seconds > 0
    assert stats.decode_tokens_per_s == pytest.approx(stats.decode_tokens / stats.decode_seconds)
    assert GenerationStats().decode_tokens_per_s == 0.0  # nothing decoded yet, no division by zero


def test_cli_reports_prompt_and_decode_speed(tmp_path, checkpoint, tokenizer, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES), encoding="utf-8")
    stats_file = tmp_path / "reports" / "stats.json"
    assert generation_main(["--model-config", str(checkpoint / "config.json"), "--load", str(checkpoint / "model.pt"),
                            "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), "--device", "cpu",
                            "--max-length", "4", "--beam-size", "2", "--stats", str(stats_file)]) == 0
    report = json.loads(stats_file.read_text(encoding="utf-8"))
    prompt_tokens = sum(len(build_prompt(tokenizer, s).input_ids) for s in SAMPLES)
    assert report["records"] == 2 and report["prompt_tokens"] == prompt_tokens and report["device"] == "cpu"
    assert report["decode_tokens"] > 0 and report["decode_seconds"] > 0 and report["prompt_seconds"] > 0
    assert report["decode_tokens_per_s"] == pytest.approx(report["decode_tokens"] / report["decode_seconds"])
    assert report["prompt_tokens_per_s"] == pytest.approx(prompt_tokens / report["prompt_seconds"])
    assert report["peak_rss_bytes"] > 2**20
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("prompt:")]
    assert len(line) == 1 and f"prompt: {prompt_tokens} tokens" in line[0]
    assert f"decode: {report['decode_tokens']} tokens" in line[0] and "peak memory:" in line[0]


@pytest.mark.parametrize("target", ["input", "output", "config", "vocab", "dir", "in-load-dir"])
def test_stats_is_never_written_over_a_file_of_the_run(tmp_path, checkpoint, target, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(SAMPLES[0]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("earlier answers\n", encoding="utf-8")
    (checkpoint / "notes.txt").write_text("mine\n", encoding="utf-8")
    stats = {"input": inp, "output": out, "config": checkpoint / "config.json", "vocab": checkpoint / "vocab.txt",
             "dir": tmp_path, "in-load-dir": checkpoint / "notes.txt"}[target]
    load = checkpoint if target == "in-load-dir" else checkpoint / "model.pt"
    before = {p: p.read_bytes() for p in (inp, out, checkpoint / "config.json", checkpoint / "vocab.txt",
                                          checkpoint / "notes.txt")}
    with pytest.raises(SystemExit) as exit_info:
        generation_main(["--model-config", str(checkpoint / "config.json"), "--load", str(load), "--input", str(inp),
                         "--output", str(out), "--device", "cpu", "--stats", str(stats), "--force"])
    assert str(exit_info.value).startswith("error: --stats ")
    assert all(p.read_bytes() == content for p, content in before.items())
