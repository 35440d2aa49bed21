"""The demo: bundled data that keeps eval inputs out of training, and a short end-to-end run."""

import json
import struct

from cpm_live.demo import demo_data_file, format_report
from cpm_live.demo import main as demo


def read(name):
    with open(demo_data_file(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_bundled_data_eval_is_held_out_and_new_to_the_base():
    base, train, evals = read("base_train.jsonl"), read("train.jsonl"), read("eval.jsonl")
    assert len(evals) == 64 and len(train) >= 400
    assert not {r["input"] for r in evals} & {r["input"] for r in train}
    new_question = evals[0]["question"]
    assert {r["question"] for r in train + evals} == {new_question}
    assert new_question not in {r["question"] for r in base}
    counts = {r["<ans>"] for r in evals}
    assert counts == {"0", "1", "2", "3", "4"}  # every answer occurs, so no constant answer scores 1


def test_demo_end_to_end_short(tmp_path, capsys):
    """Few steps (no accuracy claim): every stage runs and writes summary.json and loss.png."""
    summary = demo(["--out", str(tmp_path), "--base-steps", "12", "--qlora-steps", "10"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["seconds"] == summary["seconds"] > 0
    for name in ("base", "qlora"):
        assert set(written[name]) == {"accuracy", "rouge-1", "rouge-2", "rouge-l", "bleu-4"}
        assert 0.0 <= written[name]["accuracy"] <= 1.0
    assert written["loss_first"] > 0 and written["loss_last"] > 0
    assert (tmp_path / "qlora" / "demo-delta-best" / "adapter_model.safetensors").is_file()
    assert written["adapter"] == str(tmp_path / "qlora" / "demo-delta-best")
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 300
    assert len(written["examples"]) == 3 and written["examples"][0]["input"] == read("eval.jsonl")[0]["input"]
    out = capsys.readouterr().out
    assert format_report(written) in out and "4-bit base + QLoRA" in out


def test_report_table():
    scores = {"accuracy": 0.125, "bleu-4": 0.5}
    report = format_report({"task": "t", "eval_records": 64, "base": scores, "qlora": {**scores, "accuracy": 0.875},
                            "loss_first": 2.5, "loss_last": 0.25, "qlora_steps": 150, "loss_plot": "x/loss.png",
                            "examples": [{"input": "cat,cup,box,hat", "reference": "1", "base": "11", "qlora": "1"}],
                            "adapter": "x/a", "seconds": 61.2, "summary_file": "x/summary.json"})
    lines = report.splitlines()
    assert lines[2].split() == ["accuracy", "bleu-4"]
    assert lines[3].split()[-2:] == ["0.12", "0.50"] and lines[4].split()[-2:] == ["0.88", "0.50"]
    assert "2.500 -> 0.250 in 150 steps" in report and "cat,cup,box,hat" in report and "61 s" in report
