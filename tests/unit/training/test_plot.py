"""cpm-bee-plot: a loss figure from a real run's metrics.jsonl, and one-line errors for bad input."""

import json
import random
import struct

import pytest

from cpm_live.training.plot import main as plot
from cpm_live.training.plot import plot_metrics


def write_metrics(path, steps=20, eval_every=5, seed=0):
    rng = random.Random(seed)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": 3.0 / step + rng.random() * 0.1, "lr": 1e-3})
        if step % eval_every == 0:
            lines.append({"step": step, "eval_loss": 3.0 / step + 0.2, "accuracy": step / steps})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_two_runs_svg(tmp_path):
    a = write_metrics(tmp_path / "a.jsonl", seed=1)
    b = write_metrics(tmp_path / "b.jsonl", seed=2)
    out = plot_metrics([str(a), str(b)], str(tmp_path / "both.svg"), title="two runs")
    text = (tmp_path / "both.svg").read_text()
    assert out.endswith("both.svg") and "<svg" in text
    assert text.count("train loss") == 2 and "eval accuracy" in text


def test_plot_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"missing\.jsonl does not exist"):
        plot([str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.png")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: not JSON"):
        plot([str(bad), "-o", str(tmp_path / "x.png")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(SystemExit, match=r"empty\.jsonl has no loss records"):
        plot([str(empty), "-o", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match=r"must end in \.png, \.svg or \.pdf"):
        plot([str(write_metrics(tmp_path / "ok.jsonl")), "-o", str(tmp_path / "x.jpeg")])
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*tmp"))
