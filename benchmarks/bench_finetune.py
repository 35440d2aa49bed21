"""Fine-tuning step time and peak memory: QLoRA (NF4 and int8 bases) vs LoRA (fp32, bf16) vs full fine-tuning.

QLoRA runs as a user gets it by default: ``int4_compute_dtype: auto``, and a bf16 model where the
device computes bf16 natively (CUDA sm80+, CPUs with avx512_bf16/AMX), fp32 elsewhere. Its baseline is
the LoRA of the same model dtype (``lora_bf16`` / ``lora_fp32``); the ratios against both LoRA
variants are reported when both ran. ``qlora_int8`` is the same LoRA on an LLM.int8 base (int8 rows,
fp32 row scales, threshold 6.0) in the same model dtype, compared with that LoRA and with NF4 QLoRA.

One step = CPMBee.forward + cross-entropy over the predicted tail + backward + AdamW over the
trainable parameters. Step times of all variants of one configuration are measured interleaved in
one worker process; each variant's peak memory is measured in its own fresh worker (RSS high-water
mark on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Also profiles where a QLoRA step's time
goes compared with LoRA (torch.profiler, self time per op).

Each job runs in a fresh process (:func:`bench_common.run_isolated`).
"""

from __future__ import annotations

import gc
from typing import Any

import bench_common as bc
import torch

from cpm_live.config import native_bf16
from cpm_live.quant.dequant import PROFILER_LABEL

MODES = ("full", "lora_fp32", "lora_bf16", "qlora", "qlora_int8")
PEAK_METHOD = {
    "cpu": "RSS high-water mark (VmHWM) of a fresh process per variant, forked from a server that only imported "
           "the libraries, glibc's mmap threshold pinned to 128 KiB so freed tensors leave RSS; restarted once the "
           "model is built; *_above_baseline subtracts the RSS before building (after a tiny warm-up step)",
    "cuda": "torch.cuda.max_memory_allocated in a fresh process, reset once the model is built; "
            "*_above_baseline subtracts what was allocated before building",
}


def qlora_precision(device: str) -> str:
    """The model dtype QLoRA runs in here: bf16 where the device has it natively, else fp32."""
    return "bf16" if native_bf16(device) else "fp32"


def qlora_baseline(device: str) -> str:
    """The LoRA variant of QLoRA's model dtype (what QLoRA has to match)."""
    return f"lora_{qlora_precision(device)}"


def available_modes(device: str, force_bf16: bool = False) -> tuple[list[str], dict[str, str]]:
    """The variants worth timing here, and why any is skipped."""
    if device == "cpu" and not force_bf16 and not native_bf16(device):
        reason = ("this CPU has no native bf16 (avx512_bf16/AMX); emulated bf16 matmuls run ~10x slower than "
                  "fp32 and would not show bf16 LoRA's cost (pass --bf16 to measure anyway)")
        return ["full", "lora_fp32", "qlora", "qlora_int8"], {"lora_bf16": reason}
    return list(MODES), {}


def build_variant(mode: str, dim: int, layers: int, device: str, checkpointing: bool = False):
    """(model, AdamW over its trainable parameters) for one variant, on ``device``."""
    from cpm_live.engine import recompute_activations
    from cpm_live.lora import LoraSettings, add_lora
    from cpm_live.models import CPMBee

    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose from {MODES}")
    precision = {"lora_bf16": "bf16", "qlora": qlora_precision(device),
                 "qlora_int8": qlora_precision(device)}.get(mode, "fp32")
    config = bc.model_config(dim, layers, int4=mode == "qlora", int8=mode == "qlora_int8", compute_dtype="auto",
                             precision=precision)
    if config.int4:
        config = config.resolve_compute_dtype(device)
    with torch.device(device):
        model = CPMBee(config)
    if mode != "full":
        add_lora(model, LoraSettings())  # CPM-Bee's delta-tuning defaults: r=8, alpha=16, q and v
    if checkpointing:
        recompute_activations(model.encoder.layers)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer


def _stored_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def job_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of ``spec['steps']`` steps of one variant (this process runs nothing else).

    The peak counts from after the model is built (so build-time transients are not charged) and is
    reported above the memory in use before building. On CPU the allocator returns freed large
    tensors to the OS (:func:`bench_common.pin_mmap_threshold`), and a tiny model of the same variant
    takes one step first, so library warm-up (kernel code paged in) is not charged either.
    """
    device = spec["device"]
    rows, seqlen = bc.batch_shape(spec["tokens"], spec.get("row_len", bc.ROW_LEN))
    batch, target = bc.make_batch(rows, seqlen, bc.BENCH_VOCAB, device)
    pinned = device == "cuda" or bc.pin_mmap_threshold()
    if device == "cpu":
        tiny, tiny_opt = build_variant(spec["mode"], 64, 1, device)
        bc.train_step(tiny, tiny_opt, *bc.make_batch(1, 64, bc.BENCH_VOCAB, device))
        del tiny, tiny_opt
        gc.collect()
    baseline = torch.cuda.memory_allocated() if device == "cuda" else bc.rss_bytes()[0]
    model, optimizer = build_variant(spec["mode"], spec["dim"], spec["layers"], device,
                                     spec.get("checkpointing", False))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        bc.reset_peak_rss()
    for _ in range(spec["steps"]):  # not timed: pinned mmap makes CPU allocation slow
        bc.train_step(model, optimizer, batch, target)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else bc.rss_bytes()[1]
    return {
        "peak_bytes": peak, "baseline_bytes": baseline, "peak_above_baseline_bytes": peak - baseline,
        "stored_bytes": _stored_bytes(model),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "mmap_threshold_pinned": pinned,
    }


def job_timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Interleaved step times of every variant in ``spec['modes']`` (all built in this process)."""
    device = spec["device"]
    rows, seqlen = bc.batch_shape(spec["tokens"], spec.get("row_len", bc.ROW_LEN))
    batch, target = bc.make_batch(rows, seqlen, bc.BENCH_VOCAB, device)
    steps = {}
    for mode in spec["modes"]:
        model, optimizer = build_variant(mode, spec["dim"], spec["layers"], device)
        steps[mode] = (lambda m=model, o=optimizer: bc.train_step(m, o, batch, target))
    return bc.interleaved(steps, reps=spec["reps"], device=device, warmup=1)


CATEGORIES = (  # first match wins; op names are torch.profiler's
    # bnb's dequantize_4bit + nested absmax dequantize_blockwise (CUDA), cpm_live's exact one (CPU)
    ("dequantize_4bit", ("bitsandbytes::", PROFILER_LABEL)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("softmax", ("aten::_softmax",)),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::masked_fill", "aten::gelu",
                     "aten::pow", "aten::rsqrt", "aten::mean", "aten::fill_", "aten::neg", "aten::cat")),
    ("optimizer", ("adam", "_foreach")),
    ("copy_cast", ("aten::copy_", "aten::to", "aten::_to_copy")),
)


def _category(name: str) -> str:
    lowered = name.lower()
    for category, needles in CATEGORIES:
        if any(n.lower() in lowered for n in needles):
            return category
    return "other"


def _summarize_profiles(steps: list[dict[str, tuple[float, int]]], top: int) -> dict[str, Any]:
    """Medians over profiled steps (``op -> (self ms, calls)`` each), so one step slowed by another
    process does not skew the result: step self time, per category (ms and share of its step), top ops."""
    totals = [sum(ms for ms, _ in step.values()) for step in steps]
    per_category = []
    for step in steps:
        cats: dict[str, float] = {}
        for name, (ms, _) in step.items():
            cats[_category(name)] = cats.get(_category(name), 0.0) + ms
        per_category.append(cats)
    cat_ms = {c: bc.median([cats.get(c, 0.0) for cats in per_category]) for c in set().union(*per_category)}
    op_ms = {n: bc.median([step.get(n, (0.0, 0))[0] for step in steps]) for n in set().union(*steps)}
    step_ms = bc.median(totals)
    return {
        "self_ms_per_step": step_ms,
        "categories_ms": {c: round(cat_ms[c], 3) for c in sorted(cat_ms, key=cat_ms.get, reverse=True)},
        "category_shares": {c: round(bc.median([cats.get(c, 0.0) / t for cats, t in zip(per_category, totals)]), 4)
                            for c in sorted(cat_ms, key=cat_ms.get, reverse=True)},
        "top_ops": [{"op": n, "self_ms": round(op_ms[n], 3), "calls": steps[0].get(n, (0.0, 0))[1],
                     "share": round(op_ms[n] / step_ms, 4)}
                    for n in sorted(op_ms, key=op_ms.get, reverse=True)[:top]],
    }


def _fold_range(ops: dict[str, tuple[float, int]], events, label: str) -> dict[str, tuple[float, int]]:
    """Move the self CPU time of every op run inside a ``record_function(label)`` range onto ``label``
    (cpm_live's CPU dequantization is a few aten ops, which would otherwise count as elementwise)."""
    ops = {k: list(v) for k, v in ops.items()}
    for event in events:
        if event.name != label:
            continue
        stack = list(event.cpu_children)
        while stack:
            child = stack.pop()
            stack.extend(child.cpu_children)
            ops[child.key][0] -= child.self_cpu_time_total / 1e3
            ops[label][0] += child.self_cpu_time_total / 1e3
    return {k: (ms, count) for k, (ms, count) in ops.items()}


def job_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Self time per op of each variant over ``spec['reps']`` profiled steps each, interleaved."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = spec["device"]
    rows, seqlen = bc.batch_shape(spec["tokens"], spec.get("row_len", bc.ROW_LEN))
    batch, target = bc.make_batch(rows, seqlen, bc.BENCH_VOCAB, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    variants = {mode: build_variant(mode, spec["dim"], spec["layers"], device) for mode in spec["modes"]}
    for model, optimizer in variants.values():  # warm-up, not profiled
        bc.train_step(model, optimizer, batch, target)
    steps: dict[str, list[dict[str, tuple[float, int]]]] = {mode: [] for mode in spec["modes"]}

    def profiled_step(mode: str) -> None:
        model, optimizer = variants[mode]
        with profile(activities=activities) as prof:
            bc.train_step(model, optimizer, batch, target)
            bc.sync(device)
        # Op rows only: on CUDA each kernel also has a row of its own, and its time is already in the
        # launching op's self device time. Values: op name -> (self ms, calls).
        ops = {e.key: (getattr(e, attr) / 1e3, e.count) for e in prof.key_averages()
               if e.device_type == DeviceType.CPU}
        steps[mode].append(_fold_range(ops, prof.events(), PROFILER_LABEL) if device == "cpu" else ops)

    bc.interleaved({mode: (lambda m=mode: profiled_step(m)) for mode in spec["modes"]}, reps=spec["reps"],
                   device=device, warmup=0)
    return {mode: _summarize_profiles(mode_steps, spec.get("top", 12)) for mode, mode_steps in steps.items()}


def run_finetune(configs: list[dict[str, Any]], device: str, threads: int, reps: int, mem_steps: int,
                 force_bf16: bool = False, log=print, only: list[str] | None = None) -> dict[str, Any]:
    """Every (dim, layers, tokens) in ``configs``: interleaved step times and per-variant peak memory
    (of the variants in ``only``, when given)."""
    modes, skipped = available_modes(device, force_bf16)
    if only is not None:
        skipped.update({m: "not in this plan" for m in modes if m not in only})
        modes = [m for m in modes if m in only]
    baseline = qlora_baseline(device)
    results = []
    for cfg in configs:
        row_len = cfg.get("row_len", bc.ROW_LEN)
        rows, seqlen = bc.batch_shape(cfg["tokens"], row_len)
        base = {"dim": cfg["dim"], "layers": cfg["layers"], "tokens": cfg["tokens"], "row_len": row_len,
                "device": device, "threads": threads}
        log(f"  finetune d={cfg['dim']} layers={cfg['layers']} tokens={cfg['tokens']} in rows of {seqlen}: "
            f"timing {modes}")
        times = bc.run_isolated(job_timing, {**base, "modes": modes, "reps": reps})
        entry: dict[str, Any] = {**cfg, "rows": rows, "seqlen": seqlen, "modes": {}}
        for mode in modes:
            mem = bc.run_isolated(job_memory, {**base, "mode": mode, "steps": mem_steps})
            entry["modes"][mode] = {
                "step_s_median": bc.median(times[mode]), "step_s": times[mode],
                "tokens_per_s": cfg["tokens"] / bc.median(times[mode]),
                "peak_mib": mem["peak_bytes"] / bc.MIB,
                "peak_above_baseline_mib": mem["peak_above_baseline_bytes"] / bc.MIB,
                "stored_mib": mem["stored_bytes"] / bc.MIB, "trainable_params": mem["trainable_params"],
                "mmap_threshold_pinned": mem["mmap_threshold_pinned"],
            }
        ratios = {}
        # qlora_over_lora_*: against QLoRA's baseline (same model dtype); *_fp32 / *_bf16: against each.
        for mode, name, ref in (("qlora", "qlora_over_lora", baseline),
                                ("qlora", "qlora_over_lora_fp32", "lora_fp32"),
                                ("qlora", "qlora_over_lora_bf16", "lora_bf16"),
                                ("qlora_int8", "int8_over_lora", baseline),
                                ("qlora_int8", "int8_over_qlora", "qlora"),
                                ("full", "full_over_lora", "lora_fp32")):
            if mode in entry["modes"] and ref in entry["modes"]:
                m, r = entry["modes"][mode], entry["modes"][ref]
                ratios[f"{name}_time"] = bc.paired_ratio(times[mode], times[ref])
                ratios[f"{name}_peak_mem"] = m["peak_above_baseline_mib"] / r["peak_above_baseline_mib"]
                ratios[f"{name}_stored_mem"] = m["stored_mib"] / r["stored_mib"]
        entry["ratios"] = ratios
        results.append(entry)
        log(f"    ratios {({k: round(v, 3) for k, v in ratios.items()})}")
    auto = bc.model_config(64, 1, int4=True, compute_dtype="auto").resolve_compute_dtype(device)
    return {
        "baseline_for_qlora": baseline, "qlora_precision": qlora_precision(device),
        "qlora_compute_dtype": auto.int4_compute_dtype,
        "modes": modes, "skipped": skipped,
        "peak_memory_method": PEAK_METHOD[device],
        "lora": {"r": 8, "alpha": 16, "targets": ["project_q", "project_v"]},
        "vocab": bc.BENCH_VOCAB, "row_len": bc.ROW_LEN, "configs": results,
    }


def run_profile(dim: int, layers: int, tokens: int, device: str, threads: int, reps: int = 3) -> dict[str, Any]:
    """Where a QLoRA step's time goes versus LoRA at the same shape (top ops and categories per step)."""
    baseline = qlora_baseline(device)
    prof = bc.run_isolated(job_profile, {"dim": dim, "layers": layers, "tokens": tokens, "device": device,
                                         "threads": threads, "modes": ["qlora", baseline], "reps": reps})
    q, b = prof["qlora"], prof[baseline]
    return {
        "dim": dim, "layers": layers, "tokens": tokens, "baseline": baseline, "profiled_steps": reps, **prof,
        "qlora_minus_baseline_ms": q["self_ms_per_step"] - b["self_ms_per_step"],
        "dequantize_share_of_qlora": q["category_shares"].get("dequantize_4bit", 0.0),
        "matmul_share": {"qlora": q["category_shares"]["matmul"], baseline: b["category_shares"]["matmul"]},
    }
