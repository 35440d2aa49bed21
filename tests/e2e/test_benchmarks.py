"""Smoke test of benchmarks/: every benchmark function at a tiny size, and the JSON it produces.

The numbers are not checked for speed, only for being present and sane (positive times, ratios
that must hold whatever the machine: 4-bit weights are smaller, sharding halves per-rank bytes).
"""

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO

BENCH_DIR = REPO / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # the benchmarks are scripts beside each other, not a package

import bench_decode  # noqa: E402
import bench_finetune  # noqa: E402
import bench_layers  # noqa: E402
import bench_peer  # noqa: E402
import bench_quantize  # noqa: E402
import bench_scaling  # noqa: E402
import chart  # noqa: E402
import estimate_10b  # noqa: E402
import run  # noqa: E402
import scale_10b  # noqa: E402


def quiet_log(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Each section once, at a tiny size (shared by the tests below).

    The torchrun launch runs on a thread beside the rest: both mostly wait for child processes, and
    the numbers of a smoke test need not be clean, so overlapping them halves the wall time.
    """
    work = str(tmp_path_factory.mktemp("bench"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        scaling = pool.submit(bench_scaling.run_scaling, "qlora", 64, 1, 64, steps=1, reps=1, threads=1,
                              rank_counts=(2,), log=quiet_log)
        out = {
            "finetune": bench_finetune.run_finetune([{"dim": 64, "layers": 1, "tokens": 64}], "cpu", 1, reps=2,
                                                    mem_steps=1, log=quiet_log),
            "profile": bench_finetune.run_profile(64, 1, 64, "cpu", 1, reps=1),
            "layers": bench_layers.run_layers([(64, 128)], tokens=16, reps=2, device="cpu", threads=1),
            "peer": bench_peer.run_peer([{"dim": 128, "dim_ff": 352, "layers": 1, "tokens": t} for t in (32, 64)],
                                        "cpu", 1, reps=2, mem_reps=2, mem_steps=1, log=quiet_log),
            "compression": bench_quantize.run_compression(work, [(64, 256)], {"dim": 64, "layers": 1, "tokens": 64}),
            "quantize_streaming": bench_quantize.run_streaming(work, 64, [1, 2], ["safetensors"], 1,
                                                               log=quiet_log),
            "estimate_10b": estimate_10b.run_estimate(),
        }
        out["scaling"] = {"qlora": scaling.result()}
    return out


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_finetune_reports_every_variant(results):
    section = results["finetune"]
    assert section["modes"] == ["full", "lora_fp32", "qlora", "qlora_int8"] or "lora_bf16" in section["modes"]
    (config,) = section["configs"]
    for mode in section["modes"]:
        m = config["modes"][mode]
        assert all(positive(t) for t in m["step_s"]) and len(m["step_s"]) == 2
        assert positive(m["peak_mib"]) and positive(m["tokens_per_s"])
    modes = config["modes"]
    # 4-bit < 8-bit < fp32 base
    assert modes["qlora"]["stored_mib"] < modes["qlora_int8"]["stored_mib"] < modes["lora_fp32"]["stored_mib"]
    assert modes["full"]["trainable_params"] > modes["lora_fp32"]["trainable_params"] == \
        modes["qlora"]["trainable_params"] == modes["qlora_int8"]["trainable_params"] > 0
    for key in ("qlora_over_lora_time", "qlora_over_lora_peak_mem", "full_over_lora_time", "int8_over_lora_time",
                "int8_over_lora_peak_mem", "int8_over_qlora_time"):
        assert positive(config["ratios"][key])


def test_profile_sees_dequantize_only_in_qlora(results):
    prof = results["profile"]
    assert prof["qlora"]["categories_ms"].get("dequantize_4bit", 0) > 0
    assert "dequantize_4bit" not in prof[prof["baseline"]]["categories_ms"]
    assert prof["qlora"]["top_ops"] and 0 < prof["dequantize_share_of_qlora"] < 1


def test_layers_compare_the_same_quantized_weight(results):
    (row,) = results["layers"]["results"]
    assert row["max_abs_diff_vs_hf"] < 1e-3
    assert set(row["dequantize_seconds_median"]) == {"cpm_live", "bnb"}
    assert set(row["seconds_median"]) == {"hf_bnb", "cpm_live", "dense"}
    assert positive(row["cpm_live_over_hf_bnb"]) and positive(row["hf_bnb_over_dense"])


def test_compression_figures(results):
    c = results["compression"]
    (w,) = c["linear_weights"]
    assert w["bytes_per_param_without_constants"] == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))
    assert w["bytes_per_param"] > w["bytes_per_param_without_constants"]
    (w8,) = c["linear_weights_int8"]
    assert w8["bytes_per_param_without_constants"] == pytest.approx(1 + 4 / 256) == w8["expected_int8"]
    assert w8["bytes"] == 64 * 256 + 4 * 64 + 1  # int8 rows, fp32 SCB, the uint8 layout tag
    assert 0 < c["tiny_checkpoint"]["ratio_to_fp16"] < c["tiny_checkpoint"]["int8_ratio_to_fp16"] < 1
    assert 0.25 < c["cpm_bee_10b_analytic"]["ratio_to_fp16"] < 0.32  # 9.26B of 9.62B params are 4-bit
    assert 0.5 < c["cpm_bee_10b_analytic"]["int8_ratio_to_fp16"] < 0.55  # ... or 8-bit
    err = c["logit_error"]
    assert 0 < err["int8"]["logits_relative_l2"] < err["nf4"]["logits_relative_l2"] < 1
    assert 0 < err["int8"]["weight_relative_l2_median"] < 0.02 < err["nf4"]["weight_relative_l2_median"] < 0.15
    assert 0 < err["nf4"]["top1_agreement"] <= err["int8"]["top1_agreement"] <= 1


def test_quantize_streaming(results):
    data = results["quantize_streaming"]["formats"]["safetensors"]
    assert len(data["runs"]) == 2 and all(positive(r["throughput_mb_s"]) for r in data["runs"])
    assert data["runs"][1]["input_bytes"] > data["runs"][0]["input_bytes"]
    assert math.isfinite(data["peak_slope_mib_per_input_mib"])


def test_scaling_shards_parameters(results):
    two = results["scaling"]["qlora"]["ranks"]["2"]
    per_rank = two["param_bytes_per_rank"]
    assert len(per_rank) == 2 and sum(per_rank) >= two["unsharded_param_bytes"]
    assert max(per_rank) < 0.6 * two["unsharded_param_bytes"]
    assert positive(two["step_s_median"])


def test_peer_runs_the_same_size_side_by_side(results):
    p = results["peer"]
    assert [c["tokens"] for c in p["configs"]] == [32, 64]
    for c in p["configs"]:
        assert positive(c["time_ratio"]) and positive(c["peak_ratio"])
        assert [len(c["step_s"][s]) for s in bench_peer.STACKS] == [2, 2]
        assert [len(c["peak_above_baseline_mib"][s]) for s in bench_peer.STACKS] == [2, 2]
        # the same model size: LoRA r=16 on seven projections of the same shapes; 4-bit bases of equal size
        ours, peer = c["stacks"]["cpm_live"], c["stacks"]["peer"]
        assert ours["trainable_params"] == peer["trainable_params"]
        assert ours["stored_bytes"] == pytest.approx(peer["stored_bytes"], rel=0.01)
    growth = p["growth_over_fewest_tokens"]["d128_L1"]
    assert growth["cpm_live"]["32tok"] == {"time": 1.0, "peak": 1.0} and positive(growth["peer"]["64tok"]["time"])


def test_peer_parts_combine_into_one_section(results, tmp_path):
    configs = results["peer"]["configs"]
    parts = []
    for i, config in enumerate(configs):  # as if each configuration had run alone (one lock hold each)
        part = tmp_path / f"part{i}.json"
        part.write_text(json.dumps({"meta": {"env": {"device": "cpu"}}, "peer": {"configs": [config]}}))
        parts.append(str(part))
    out = tmp_path / "peer.json"
    combined = bench_peer.main(["--combine", *parts, "--out", str(out)])
    assert json.loads(out.read_text()) == combined
    assert combined["peer"]["configs"] == configs
    assert combined["peer"]["growth_over_fewest_tokens"] == results["peer"]["growth_over_fewest_tokens"]
    assert set(combined["summary"]) == {"d128_L1_32tok", "d128_L1_64tok"}
    before = (tmp_path / "part0.json").read_text()
    with pytest.raises(SystemExit):  # the output may not be one of the inputs
        bench_peer.main(["--combine", *parts, "--out", parts[0]])
    assert (tmp_path / "part0.json").read_text() == before


def test_peer_is_skipped_with_one_line_without_transformers(monkeypatch):
    real = bench_peer.importlib.util.find_spec
    monkeypatch.setattr(bench_peer.importlib.util, "find_spec",
                        lambda name: None if name == "transformers" else real(name))
    out = bench_peer.run_peer([{"dim": 128, "dim_ff": 352, "layers": 1, "tokens": 32}], "cpu", 1, 1, 1, 1,
                              log=quiet_log)
    assert out == {"skipped": 'transformers not installed (pip install -e ".[peer]")'}


def test_10b_estimate(results):
    e = results["estimate_10b"]
    assert e["qlora"]["estimated_peak_gib"] < e["lora_bf16"]["estimated_peak_gib"]
    assert e["qlora_under_target"] == (e["qlora"]["estimated_peak_gib"] < 12)
    assert e["lora_bf16"]["parts_gib"]["weights"] == pytest.approx(9.616e9 * 2 / 2**30, rel=0.01)
    assert e["linear_bytes_per_param"] == pytest.approx(0.5159, abs=1e-3)


def test_summary_and_chart(results, tmp_path):
    summary = run.summarize(results)
    assert set(summary) >= {"finetune_ratios", "layers_cpm_live_over_hf_bnb", "linear_bytes_per_param",
                            "linear_bytes_per_param_int8", "logits_relative_l2_vs_fp32", "quantize",
                            "scaling_2_over_1", "estimate_10b_peak_gib", "peer_cpm_live_over_peer"}
    png = tmp_path / "chart.png"
    chart.write_chart(results, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_workers_gives_identical_bytes(tmp_path):
    w = bench_quantize.run_workers(str(tmp_path), dim=64, dim_ff=160, layers=1, worker_counts=(1, 2), reps=2,
                                   log=quiet_log)
    assert w["identical_bytes"] and [len(w["runs"][n]) for n in ("1", "2")] == [2, 2]
    assert w["speedup_over_1"]["1"] == 1 and positive(w["speedup_over_1"]["2"])
    assert [r["workers"] for r in w["runs"]["2"]] == [2, 2]
    assert not list(tmp_path.iterdir())  # the checkpoints are removed


def test_scale_10b_stages_at_a_tiny_size(tmp_path):
    """Every stage of the 10B run on a 1-layer, d=64 model with the real 86,583-entry vocabulary
    (so generation runs when ../shared has the CPM-Bee vocab)."""
    config = json.loads((BENCH_DIR.parent / "src" / "config" / "cpm-bee-tiny.json").read_text())
    config.update(vocab_size=86583, num_layers=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    work = tmp_path / "work"
    work.mkdir()
    saved = []
    out = scale_10b.run_scale(str(work), path, tokens=32, generate_tokens=2, progress=False,
                              on_stage=lambda r: saved.append(sorted(r)), log=quiet_log)
    stages = ["write", "quantize", "load", "load_quantize_on_the_fly", "step", "decode"]
    assert [s for s in stages if s in saved[-1]] == stages and len(saved) == 6
    q = out["quantize"]
    assert positive(q["mb_per_s"]) and positive(q["input_gb"]) and q["peak_rss_gib"] * 2**30 >= q["baseline_rss_bytes"]
    for name in ("load", "load_quantize_on_the_fly"):
        assert positive(out[name]["seconds"]) and out[name]["peak_rss_gib"] >= out[name]["baseline_rss_gib"]
    # both loads build the same int4 model
    assert out["load"]["model_tensors_gib"] == out["load_quantize_on_the_fly"]["model_tensors_gib"]
    step = out["step"]
    assert step["loss_finite"] and step["tokens"] == 32 and step["trainable_params"] > 0
    assert positive(out["estimate_gib"]) and positive(out["step_peak_over_estimate"])
    assert out["step_within_15pct_of_estimate"] == (abs(out["step_peak_over_estimate"] - 1) <= 0.15)
    if (BENCH_DIR.parents[1] / "shared" / "cpm-bee" / "vocab" / "bee.txt").is_file():
        assert isinstance(step["generation"]["answer"], str) and step["generation"]["max_new_tokens"] == 2
    decode = out["decode"]
    assert decode["prompt_tokens"] == 64 and positive(decode["prompt_tokens_per_s"])
    assert decode["pairs"] > 0 and all(len(s) >= decode["pairs"] for s in decode["step_seconds"].values())
    assert all(positive(r) for r in decode["decode_tokens_per_s"].values())
    assert positive(decode["decode_speedup"]) and positive(decode["logits_seconds_per_token"])
    assert all(check["passed"] for check in decode["kernel_checks"])
    assert not list(work.iterdir())  # both checkpoints removed


def test_decode_benchmark_at_a_tiny_size():
    out = bench_decode.run_decode(64, 256, 2, 2, 3000, prompt_tokens=16, new_tokens=3, reps=2, threads=1)
    assert list(out["variants"]) == list(bench_decode.VARIANTS)
    for variant in out["variants"].values():
        assert variant["prompt_tokens"] == 16 and all(n > 0 for n in variant["decode_tokens"])
        assert all(positive(r) for r in variant["prompt_tokens_per_s"] + variant["decode_tokens_per_s"])
    assert all(positive(r) for r in out["ratios"].values()) and len(out["ratios"]) == 6
    assert all(check["passed"] for check in out["kernel_checks"])
    rows = bench_decode.run_rows(((64, 128),), (1, 5), reps=2, threads=1)
    for result in rows["results"]:
        if "skipped" not in result:
            assert set(result["rows"]) == {1, 5}
            assert all(positive(ms) for r in result["rows"].values() for ms in r["ms_median"].values())


def test_main_writes_json_and_png(tmp_path):
    out = tmp_path / "r.json"
    run.main(["--quick", "--sections", "measured_10b", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["meta"]["quick"] and saved["meta"]["env"]["torch_threads"] == 1
    assert "skipped" in saved["measured_10b"] and "measured_10b" in saved["meta"]["section_seconds"]
    assert (tmp_path / "r.png").stat().st_size > 0


def test_main_rejects_unknown_section(tmp_path):
    with pytest.raises(SystemExit):
        run.main(["--sections", "nope", "--out", str(tmp_path / "r.json")])


def test_benchmark_results_never_replace_an_input_or_a_directory(tmp_path):
    """``--out`` is replaced on every run, but never when it is one of the run's inputs or a directory."""
    data = tmp_path / "eval.jsonl"
    data.write_text('{"input": "a", "<ans>": "b"}\n')
    part = tmp_path / "part.json"
    part.write_text("{}")
    before = data.read_bytes(), part.read_bytes()
    runs = [lambda: bench_decode.main(["--sections", "agree", "--load", str(data), "--data", str(data),
                                       "--out", str(data)]),
            lambda: bench_peer.main(["--combine", str(part), "--out", str(part)]),
            lambda: scale_10b.main(["--stages", "decode", "--config", str(data), "--out", str(data)])]
    for run_it in runs:
        with pytest.raises(SystemExit, match="2"):
            run_it()
    with pytest.raises(SystemExit):
        bench_decode.main(["--sections", "rows", "--out", str(tmp_path)])
    assert (data.read_bytes(), part.read_bytes()) == before
