"""The GPU check's benchmark plan (``benchmarks/run.py --device cuda --quick``) and its ``--tiny`` twin on CPU:
rows of a chosen length, the 10B step's code with the tiny config, its estimate beside the measurement."""

import sys

import pytest

from tests.conftest import REPO

BENCH_DIR = REPO / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # the benchmarks are scripts beside each other, not a package

import bench_common as bc  # noqa: E402
import bench_finetune  # noqa: E402
import estimate_10b  # noqa: E402
import run  # noqa: E402

TINY_CONFIG = BENCH_DIR.parent / "src" / "config" / "cpm-bee-tiny.json"


def test_the_gpu_plan_compares_qlora_with_bf16_lora_in_rows_of_2048_tokens():
    plan = run.PLANS["gpu"]
    for cfg in plan["finetune"]["configs"]:
        rows, seqlen = bc.batch_shape(cfg["tokens"], cfg["row_len"])
        assert seqlen == 2048 and rows * seqlen == cfg["tokens"]
    assert plan["finetune"]["modes"] == ["lora_bf16", "qlora"]
    assert plan["measured_10b"]["tokens"] == 2048 and "config" not in plan["measured_10b"]  # the real 10B shapes
    assert set(run.PLANS["tiny"]) == {"finetune", "measured_10b"} <= set(plan)


def test_finetune_uses_the_configured_row_length():
    result = bench_finetune.run_finetune([{"dim": 64, "layers": 1, "tokens": 128, "row_len": 64}], "cpu", 1, reps=1,
                                         mem_steps=1, log=lambda _: None, only=["lora_fp32", "qlora"])
    entry = result["configs"][0]
    assert (entry["rows"], entry["seqlen"]) == (2, 64)
    assert entry["modes"]["qlora"]["tokens_per_s"] > 0 and "qlora_over_lora_fp32_time" in entry["ratios"]


def test_the_10b_step_code_runs_on_cpu_with_the_tiny_config_next_to_its_estimate():
    out = estimate_10b.run_measured_10b(tokens=64, steps=1, modes=("qlora",), config_path=TINY_CONFIG, device="cpu",
                                        log=lambda _: None)
    q = out["qlora"]
    assert q["peak_gib"] > 0 and q["step_s_median"] > 0 and q["tokens_per_s"] == pytest.approx(64 / q["step_s_median"])
    expected = estimate_10b.estimate("qlora", 64, config_path=TINY_CONFIG)["estimated_peak_gib"]
    assert q["estimated_peak_gib"] == pytest.approx(expected) and q["peak_over_estimate"] == pytest.approx(
        q["peak_gib"] / expected)
    assert "RSS" in out["peak_method"] and "interleaved" not in out  # one mode: nothing to interleave


def test_tiny_runs_only_the_sections_it_has_sizes_for(tmp_path):
    with pytest.raises(SystemExit):
        run.parse_args(["--tiny", "--sections", "profile", "--out", str(tmp_path / "r.json")])
    assert run.parse_args(["--tiny", "--out", str(tmp_path / "r.json")]).sections == ["finetune", "measured_10b"]
