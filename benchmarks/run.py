"""Run every cpm_live benchmark and write one JSON file plus a PNG chart.

    python benchmarks/run.py --quick --out benchmarks/results-cpu-quick.json     # ~5 min on 2 CPU cores
    python benchmarks/run.py --out results.json                                  # the full sweep
    python benchmarks/run.py --device cuda --out results-gpu.json                # adds the measured 10B step
    python benchmarks/run.py --device cuda --quick --sections finetune,measured_10b --out r.json  # GPU, minutes
    python benchmarks/run.py --tiny --bf16 --out /tmp/r.json     # those GPU sections at tiny sizes, on CPU (seconds)

Sections: finetune (QLoRA on NF4 and int8 bases vs LoRA vs full: step time and peak memory), profile (where
QLoRA time goes), layers (our Linear4bit+LoRA vs bitsandbytes Linear4bit+peft), peer (a whole QLoRA step
against transformers + peft + bitsandbytes at the same size, 512 to 4096 tokens), compression and
quantize_streaming (bytes/param and checkpoint sizes for NF4 and int8, the logits' error of both vs fp32,
quantize_state_dict MB/s and peak memory), quantize_workers
(quantize_state_dict at 1 vs all cores on a 1 GiB checkpoint of 10B shapes, same bytes), scaling (1 vs 2 ranks,
FSDP2 on gloo), estimate_10b (CPM-Bee-10B QLoRA peak memory, analytic), on CUDA, measured_10b, and only when
named, quality (held-out perplexity and LoRA fine-tunes of a pretrained base in every format; also ``python
benchmarks/quality.py``, which draws docs/quality.md's plot) and scale10b (CPM-Bee-10B end to end on CPU; also
``python benchmarks/scale_10b.py``).
Ratios are measured side by side (interleaved repetitions, medians); see bench_common.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import bench_common as bc
import bench_finetune
import bench_layers
import bench_peer
import bench_quantize
import bench_scaling
import chart
import estimate_10b
import quality
import scale_10b
import torch

from cpm_live.utils import atomic_write_text

SECTIONS = ("finetune", "profile", "layers", "peer", "compression", "quantize_streaming", "quantize_workers", "scaling",
            "estimate_10b", "measured_10b", "quality", "scale10b")
# Only when asked for by name: quality builds a base for most of an hour the first time and then fine-tunes
# for half an hour; scale10b writes a 19 GB checkpoint and runs for an hour or more.
ON_DEMAND = ("quality", "scale10b")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in ON_DEMAND)

# What each mode runs. --quick fits in a few minutes on 2 CPU cores; the full sweep takes much longer.
PLANS: dict[str, dict[str, Any]] = {
    "quick": {
        "finetune": {"configs": [{"dim": 256, "layers": 2, "tokens": 512}, {"dim": 512, "layers": 2, "tokens": 2048},
                                 {"dim": 1024, "layers": 2, "tokens": 512}], "reps": 5, "mem_steps": 2},
        "profile": {"dim": 512, "layers": 2, "tokens": 2048, "reps": 3},
        "layers": {"shapes": [(1024, 1024), (1024, 2560), (2560, 1024)], "tokens": 1024, "reps": 5},
        "peer": {"configs": [{"dim": 1024, "dim_ff": 2816, "layers": 4, "tokens": t} for t in (512, 2048)],
                 "reps": 3, "mem_reps": 2, "mem_steps": 1},
        "compression": {"bpp_shapes": [(4096, 4096)], "logit_error": {"dim": 512, "layers": 2, "tokens": 512}},
        "quantize_streaming": {"dim": 1024, "layers": [2, 4, 8], "formats": ["pt", "safetensors"]},
        "quantize_workers": {"layers": 1, "reps": 2},
        "scaling": {"modes": ["qlora"], "dim": 512, "layers": 2, "tokens": 512, "steps": 3, "reps": 1},
    },
    "full": {
        "finetune": {"configs": [{"dim": d, "layers": 4, "tokens": t} for d in (256, 512, 1024)
                                 for t in (512, 1024, 2048, 4096)], "reps": 7, "mem_steps": 2},
        "profile": {"dim": 512, "layers": 4, "tokens": 2048, "reps": 5},
        "layers": {"shapes": [(1024, 1024), (1024, 2560), (2560, 1024), (4096, 4096), (4096, 10240),
                              (10240, 4096)], "tokens": 2048, "reps": 7},
        # The shapes (Llama-like d/ff) at CPM-Bee's default 2048 tokens, and around it.
        "peer": {"configs": [{"dim": d, "dim_ff": ff, "layers": 4, "tokens": t}
                             for d, ff in ((1024, 2816), (2048, 5632)) for t in (512, 2048, 4096)],
                 "reps": 5, "mem_reps": 2, "mem_steps": 2},
        "compression": {"bpp_shapes": [(4096, 4096), (10240, 4096), (4096, 10240)],
                        "logit_error": {"dim": 1024, "layers": 4, "tokens": 1024}},
        "quantize_streaming": {"dim": 2048, "layers": [2, 4, 8, 16], "formats": ["pt", "safetensors"]},
        "quantize_workers": {"layers": 3, "reps": 2},  # 1.08 GiB of fp16 at CPM-Bee-10B's shapes
        "scaling": {"modes": ["qlora", "full"], "dim": 1024, "layers": 4, "tokens": 1024, "steps": 5, "reps": 3},
    },
    # --device cuda --quick: what fits a few minutes of a lent H100/H200 (tools/gpu_check.sh). QLoRA against
    # its GPU baseline only (all four modes at two sizes ran past 3 minutes on an H100), in rows of 2048
    # tokens at CPM-Bee-10B's layer shapes, so that the GPU is busy enough for the ratio to mean something;
    # the 10B step in QLoRA only (bf16 LoRA of 10B is estimate_10b's comparison).
    "gpu": {
        "finetune": {"configs": [{"dim": 4096, "layers": 4, "tokens": 4096, "row_len": 2048}], "reps": 5,
                     "mem_steps": 2, "modes": ["lora_bf16", "qlora"]},
        "measured_10b": {"tokens": 2048, "steps": 3, "modes": ["qlora"]},
        "profile": {"dim": 2048, "layers": 4, "tokens": 2048, "reps": 3},
        "layers": {"shapes": [(4096, 4096), (4096, 10240), (10240, 4096)], "tokens": 4096, "reps": 7},
        "peer": {"configs": [{"dim": 2048, "dim_ff": 5632, "layers": 4, "tokens": t} for t in (2048, 4096)],
                 "reps": 5, "mem_reps": 2, "mem_steps": 2},
        "compression": {"bpp_shapes": [(4096, 4096)], "logit_error": {"dim": 512, "layers": 2, "tokens": 512}},
        "quantize_streaming": {"dim": 2048, "layers": [2, 4, 8], "formats": ["safetensors"]},
        "scaling": {"modes": ["qlora"], "dim": 512, "layers": 2, "tokens": 512, "steps": 3, "reps": 1},
    },
    # --tiny: the GPU plan's code paths at tiny sizes, on any device (tools/gpu_check.sh --dry-run on CPU).
    "tiny": {
        "finetune": {"configs": [{"dim": 128, "layers": 2, "tokens": 512, "row_len": 256}], "reps": 2,
                     "mem_steps": 1, "modes": ["lora_bf16", "qlora"]},
        "measured_10b": {"tokens": 256, "steps": 1, "modes": ["qlora"],
                         "config": str(bc.REPO_ROOT / "src" / "config" / "cpm-bee-tiny.json")},
    },
}
# The 10B step of the CPU and full plans (it runs on CUDA only): both modes, then interleaved.
MEASURED_10B = {"tokens": 2048, "steps": 3, "modes": ["qlora", "lora_bf16"]}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_section(name: str, plan: dict[str, Any], args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    device, threads = args.device, args.threads
    if name == "finetune":
        p = plan["finetune"]
        return bench_finetune.run_finetune(p["configs"], device, threads, p["reps"], p["mem_steps"],
                                           force_bf16=args.bf16, log=log, only=p.get("modes"))
    if name == "profile":
        p = plan["profile"]
        return bench_finetune.run_profile(p["dim"], p["layers"], p["tokens"], device, threads, p["reps"])
    if name == "layers":
        p = plan["layers"]
        return bench_layers.run_layers(p["shapes"], p["tokens"], p["reps"], device, threads)
    if name == "peer":
        p = plan["peer"]
        return bench_peer.run_peer(p["configs"], device, threads, p["reps"], p["mem_reps"], p["mem_steps"], log=log)
    if name == "compression":
        p = plan["compression"]
        return bench_quantize.run_compression(workdir, p["bpp_shapes"], p.get("logit_error"))
    if name == "quantize_streaming":
        p = plan["quantize_streaming"]
        return bench_quantize.run_streaming(workdir, p["dim"], p["layers"], p["formats"], threads, device, log=log)
    if name == "quantize_workers":
        p = plan["quantize_workers"]
        counts = tuple(sorted({1, max(2, os.cpu_count() or 1)}))
        return bench_quantize.run_workers(workdir, layers=p["layers"], worker_counts=counts, reps=p["reps"], log=log)
    if name == "scaling":
        p = plan["scaling"]
        return {mode: bench_scaling.run_scaling(mode, p["dim"], p["layers"], p["tokens"], p["steps"], p["reps"],
                                                threads, log=log) for mode in p["modes"]}
    if name == "estimate_10b":
        return estimate_10b.run_estimate()
    if name == "measured_10b":
        p = plan.get("measured_10b", MEASURED_10B)
        config = p.get("config", estimate_10b.CONFIG_PATH)
        if device != "cuda" and config == estimate_10b.CONFIG_PATH:
            return {"skipped": "needs --device cuda (a CPM-Bee-10B step does not fit this machine's budget)"}
        return estimate_10b.run_measured_10b(p["tokens"], p["steps"], tuple(p["modes"]), config, device, log=log)
    if name == "quality":
        return quality.run_section(args.quick, os.path.join(workdir, "quality"), threads)
    if name == "scale10b":
        return scale_10b.run_scale(workdir, log=log)
    raise ValueError(f"unknown section {name!r}; choose from {SECTIONS}")


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, flattened for reading without the details."""
    out: dict[str, Any] = {}
    if "finetune" in results:
        out["finetune_ratios"] = {f"d{c['dim']}_L{c['layers']}_{c['tokens']}tok": c["ratios"]
                                  for c in results["finetune"]["configs"]}
    if "layers" in results:
        out["layers_cpm_live_over_hf_bnb"] = {f"{r['dim_in']}x{r['dim_out']}": r["cpm_live_over_hf_bnb"]
                                              for r in results["layers"]["results"]}
    if "configs" in results.get("peer", {}):
        out["peer_cpm_live_over_peer"] = {f"d{c['dim']}_L{c['layers']}_{c['tokens']}tok":
                                          {"time": c["time_ratio"], "peak": c["peak_ratio"]}
                                          for c in results["peer"]["configs"]}
    if "profile" in results:
        p = results["profile"]
        out["profile_qlora_categories_ms"] = p["qlora"]["categories_ms"]
        out["profile_baseline_categories_ms"] = p[p["baseline"]]["categories_ms"]
        out["profile_dequantize_share_of_qlora"] = p["dequantize_share_of_qlora"]
    if "compression" in results:
        c = results["compression"]
        out["linear_bytes_per_param"] = [w["bytes_per_param"] for w in c["linear_weights"]]
        out["linear_bytes_per_param_int8"] = [w["bytes_per_param"] for w in c["linear_weights_int8"]]
        out["tiny_checkpoint_int4_over_fp16"] = c["tiny_checkpoint"]["ratio_to_fp16"]
        out["tiny_checkpoint_int8_over_fp16"] = c["tiny_checkpoint"]["int8_ratio_to_fp16"]
        out["cpm_bee_10b_checkpoint_int4_over_fp16"] = c["cpm_bee_10b_analytic"]["ratio_to_fp16"]
        out["cpm_bee_10b_checkpoint_int8_over_fp16"] = c["cpm_bee_10b_analytic"]["int8_ratio_to_fp16"]
        if "logit_error" in c:
            out["logits_relative_l2_vs_fp32"] = {k: c["logit_error"][k]["logits_relative_l2"] for k in ("nf4", "int8")}
    if "quantize_streaming" in results:
        out["quantize"] = {fmt: {"mb_s": d["throughput_mb_s_median"],
                                 "peak_slope_mib_per_mib": d["peak_slope_mib_per_input_mib"]}
                           for fmt, d in results["quantize_streaming"]["formats"].items()}
    if "quantize_workers" in results:
        w = results["quantize_workers"]
        out["quantize_workers"] = {"mb_per_s": w["mb_per_s_median"], "speedup": w["speedup_over_1"],
                                   "identical_bytes": w["identical_bytes"]}
    if "scaling" in results:
        out["scaling_2_over_1"] = {mode: {k: v for k, v in s.items() if k.endswith("_2_over_1")}
                                   for mode, s in results["scaling"].items()}
    if "estimate_10b" in results:
        e = results["estimate_10b"]
        out["estimate_10b_peak_gib"] = {"qlora": e["qlora"]["estimated_peak_gib"],
                                        "lora_bf16": e["lora_bf16"]["estimated_peak_gib"]}
    if "quality" in results:
        out["quality"] = quality.headline(results["quality"]["rows"])
    measured = results.get("measured_10b", {})
    if "peak_gib" in measured.get("qlora", {}):
        q = measured["qlora"]
        out["measured_10b"] = {"qlora_peak_gib": q["peak_gib"], "qlora_estimated_peak_gib": q["estimated_peak_gib"],
                               "qlora_step_s": q["step_s_median"], "qlora_under_12_gib": measured["qlora_under_12_gib"]}
        for k in ("qlora_over_lora_peak", "qlora_over_lora_time"):
            if k in measured:
                out["measured_10b"][k] = measured[k]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="results JSON path; the chart goes beside it (.png)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (minutes on a CPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="the --device cuda --quick plan's sections at tiny sizes, on any device (seconds): "
                             "checks the GPU plan's code paths without a GPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on a shared machine multi-threaded CPU "
                             "timings swing with other load; ratios are what we compare)")
    parser.add_argument("--bf16", action="store_true", help="time bf16 LoRA on CPU even without native bf16")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all but "
                             f"{' and '.join(ON_DEMAND)}; with --tiny: {', '.join(PLANS['tiny'])})")
    args = parser.parse_args(argv)
    default = PLANS["tiny"] if args.tiny else DEFAULT_SECTIONS
    args.sections = [s for s in (args.sections or ",".join(default)).split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.tiny and set(args.sections) - set(PLANS["tiny"]):
        parser.error(f"--tiny has sizes for {', '.join(PLANS['tiny'])} only; got {', '.join(args.sections)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    bc.quiet()
    torch.set_num_threads(args.threads)
    plan = PLANS["tiny" if args.tiny else ("gpu" if args.device == "cuda" else "quick") if args.quick else "full"]
    start = time.perf_counter()
    results: dict[str, Any] = {"meta": {
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "tiny": args.tiny, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": bc.environment(args.device, args.threads), "plan": plan}}
    with tempfile.TemporaryDirectory(prefix="cpm-live-bench-") as workdir:
        for name in args.sections:
            log(f"{name} ...")
            section_start = time.perf_counter()
            results[name] = run_section(name, plan, args, workdir)
            results["meta"].setdefault("section_seconds", {})[name] = time.perf_counter() - section_start
            log(f"{name} done in {time.perf_counter() - section_start:.0f} s")
            # Written after every section, so a long run that fails later keeps what it measured.
            atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    results["meta"]["runtime_s"] = time.perf_counter() - start
    results["summary"] = summarize(results)
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    png = os.path.splitext(args.out)[0] + ".png"
    chart.write_chart(results, png)
    log(f"wrote {args.out} and {png} in {results['meta']['runtime_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
