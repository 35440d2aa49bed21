"""benchmarks/quality.py --quick end to end: a base built and cached, every format's row, and fine-tunes
that learn on each base.

The quick mode runs on the package's demo data with a tiny vocab (no ../shared needed). What must hold
on any machine is checked, never the measured quality: each fine-tune lowers its eval loss, bf16
rounding barely moves the base's perplexity, and the projection bytes keep the orders that hold at any
size (at d = 64 the per-weight tables of a 4-bit format outweigh what it saves, so int8 and the 4-bit
formats are only compared with bf16).
"""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # the benchmarks are scripts beside each other, not a package

import quality  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The quick run in two sessions, as a long one is split: two formats first, then the rest."""
    root = tmp_path_factory.mktemp("quality")
    out = root / "quality.json"
    args = ["--quick", "--out", str(out), "--cache-dir", str(root / "cache"), "--workdir", str(root / "work"),
            "--workers", "2"]
    assert quality.main([*args, "--formats", "fp32,bf16"]) == {} and not out.exists()
    quality.main(args)
    return root, json.loads(out.read_text(encoding="utf-8"))


def test_every_format_has_its_row_and_every_fine_tune_lowered_its_eval_loss(run):
    _, results = run
    plan = quality.PLANS["quick"]
    rows = results["rows"]
    assert results["data"]["kind"] == "demo" and results["meta"]["plan"] == plan
    assert list(rows) == list(quality.FORMATS)
    for name, row in rows.items():
        assert 1.0 < row["perplexity"] < math.exp(results["base"]["chance_loss"]), name
        assert row["file_bytes"] > row["projection_bytes"] > 0
        if name not in plan["finetuned"]:
            assert row["runs"] == {}
            continue
        assert sorted(row["runs"]) == [str(s) for s in plan["seeds"]]
        for seed, r in row["runs"].items():
            steps = [step for step, _ in r["eval_loss"]]
            assert steps == list(range(plan["finetune"]["eval_interval"], plan["finetune"]["steps"] + 1,
                                       plan["finetune"]["eval_interval"]))
            assert r["eval_loss"][-1][1] < row["task_loss_before"], (name, seed)
            assert 0.0 <= r["accuracy"] <= 1.0 and r["peak_rss_mib"] > 0
        assert row["eval_loss_lowered"]
        assert 0 < sum(row["answers_after"].values()) <= len(plan["seeds"]) * plan["task_eval_records"]
        assert 0.0 <= row["accuracy_before"] <= 1.0
        if name != quality.REFERENCE:
            assert set(row["paired_vs_reference"]) == {"accuracy", "final_eval_loss"}


def test_formats_shrink_the_projections_and_bf16_keeps_the_perplexity(run):
    _, results = run
    rows = results["rows"]
    size = {name: row["projection_bytes"] for name, row in rows.items()}
    assert size["fp32"] == 2 * size["bf16"]
    assert size["fp4"] == size["nf4"]  # same layout, another code table
    assert max(size["int8"], size["fp4"], size["nf4_dq"]) < size["bf16"]
    # Rounding to bf16 moves each weight by at most 2^-9 of itself.
    assert abs(rows["bf16"]["perplexity_over_reference"] - 1.0) < 0.01


def test_the_base_is_cached_and_its_build_recorded(run):
    root, results = run
    base = results["base"]
    assert len(results["sessions"]) == 2 and results["sessions"][0]["jobs"] == 2  # fp32 (3 seeds in one job), bf16
    assert base["cached"] and len(base["sessions"]) == 1 and base["build_seconds"] > 0  # built by the 1st session
    assert base["heldout_loss_curve"][-1][1] < 0.5 * base["chance_loss"]
    plan = quality.PLANS["quick"]
    data = quality.prepare_data("demo", plan, root / "again")
    again = quality.ensure_base(plan, data, root / "cache")
    assert again["cached"] and again["path"] == base["path"]
    assert (root / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
