"""Side by side with the stack a user would pick instead: transformers + peft + bitsandbytes 4-bit.

The peer is a Llama of CPM-Bee's size (hidden d, intermediate ff, layers, heads of 64, vocabulary 32000,
tied embeddings as CPM-Bee's), built from a ``LlamaConfig`` with random weights, saved to a temporary
directory and loaded back with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, compute
dtype)`` (``local_files_only``: it never reaches a hub), with peft's LoRA r=16, alpha=32 on its seven
projections (q, k, v, o, gate, up, down) and transformers' default attention (SDPA, causal). Ours is
CPM-Bee at the same shape: nf4, double quant, ``int4_compute_dtype: auto``, LoRA r=16, alpha=32 on
its seven projections (project_q/k/v, attention_out, w_0, w_1, w_out). Both compute in bf16 where the
device has it natively (CUDA sm80+, avx512_bf16/AMX CPUs), else in fp32; no activation checkpointing.

The work is the same: one row of ``tokens`` tokens, a loss on every token after the first (the peer's
causal-LM loss; here one CPM-Bee sample whose context is its first token, so its mask is causal too),
AdamW over the LoRA weights. Our step is the training loop's own loss (``bench_common.train_step``);
the peer's is ``model(input_ids, labels=input_ids).loss``. Step times of both stacks are interleaved
in one worker (median of per-repetition ratios); each peak is measured in a fresh worker per stack and
repetition, the stacks alternating (median per stack), as the RSS high-water mark above the memory in
use before the model is built (libraries loaded and warmed up by a tiny model of the same stack).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import bench_common as bc
import torch

# Only local files are read (from_pretrained(local_files_only=True)); this makes sure of it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 32000
HEAD_DIM = 64
LORA_R, LORA_ALPHA = 16, 32
OUR_TARGETS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
PEER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STACKS = ("cpm_live", "peer")


def missing_peer() -> str | None:
    """Why the peer cannot run here (one line), or None."""
    absent = [name for name in ("transformers", "peft", "bitsandbytes") if importlib.util.find_spec(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed (pip install -e \".[peer]\")"
    return None


def compute_dtype(device: str) -> torch.dtype:
    from cpm_live.config import native_bf16

    return torch.bfloat16 if native_bf16(device) else torch.float32


def build_ours(dim: int, dim_ff: int, layers: int, device: str):
    """CPM-Bee QLoRA at this shape: (model, AdamW over the LoRA weights)."""
    from cpm_live.lora import LoraSettings, add_lora
    from cpm_live.models import CPMBee, CPMBeeConfig

    dtype = compute_dtype(device)
    config = CPMBeeConfig(vocab_size=VOCAB, dim_model=dim, dim_ff=dim_ff, num_layers=layers, num_heads=dim // HEAD_DIM,
                          dim_head=HEAD_DIM, precision="bf16" if dtype == torch.bfloat16 else "fp32", int4=True,
                          int4_compute_dtype="auto").resolve_compute_dtype(device)
    with torch.device(device):
        model = CPMBee(config)
    add_lora(model, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, targets=OUR_TARGETS))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def build_peer(dim: int, dim_ff: int, layers: int, device: str):
    """The transformers + peft + bitsandbytes QLoRA Llama at this shape: (model, AdamW over the LoRA weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per save and load would bury the benchmark's log
    # peft asks transformers a question transformers 5 renamed; the answer is the same.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    dtype = compute_dtype(device)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=dim, intermediate_size=dim_ff, num_hidden_layers=layers,
                         num_attention_heads=dim // HEAD_DIM, num_key_value_heads=dim // HEAD_DIM,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="cpm-live-peer-") as path:
        LlamaForCausalLM(config).to(dtype).save_pretrained(path)
        gc.collect()
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype,
                                                 device_map=device, local_files_only=True)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PEER_TARGETS),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def causal_rows(tokens: int, device: str, seed: int = 0):
    """One row of ``tokens`` random ids: CPM-Bee inputs + targets (every token after the first is
    predicted, seeing all earlier ones) and the peer's ``input_ids``."""
    from cpm_live.data.tensors import IGNORE_INDEX

    batch, target = bc.make_batch(1, tokens, VOCAB, "cpu", seed=seed)
    batch.context = torch.zeros(1, tokens, dtype=torch.bool)
    batch.context[:, 0] = True
    batch.segment = torch.zeros(1, tokens, dtype=torch.int32)
    batch.num_segments = torch.ones(1, tokens, dtype=torch.int32)
    batch.segment_rel = torch.zeros(1, 1, dtype=torch.int32)
    target = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed + 1))
    target[:, 0] = IGNORE_INDEX
    return batch.to(device), target.to(device), batch.input.long().to(device)


def _stack(name: str, spec: dict[str, Any], dim: int | None = None, layers: int | None = None):
    """(model, optimizer, one step) of one stack; ``dim``/``layers`` override the spec's (warm-up)."""
    dim = dim or spec["dim"]
    dim_ff = spec["dim_ff"] * dim // spec["dim"]
    layers = layers or spec["layers"]
    device = spec["device"]
    tokens = spec["tokens"] if dim == spec["dim"] else 64
    batch, target, ids = causal_rows(tokens, device)
    if name == "cpm_live":
        model, optimizer = build_ours(dim, dim_ff, layers, device)
        return model, optimizer, lambda: bc.train_step(model, optimizer, batch, target)
    model, optimizer = build_peer(dim, dim_ff, layers, device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, optimizer, step


def job_timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Both stacks in this worker, steps interleaved (order rotated every repetition)."""
    steps = {name: _stack(name, spec)[2] for name in STACKS}
    return bc.interleaved(steps, reps=spec["reps"], device=spec["device"], warmup=1)


def job_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of ``spec['steps']`` steps of one stack, alone in a fresh worker."""
    device, name = spec["device"], spec["stack"]
    pinned = device == "cuda" or bc.pin_mmap_threshold()
    if device == "cpu":
        warm = _stack(name, spec, dim=HEAD_DIM, layers=1)
        warm[2]()
        del warm
        gc.collect()
    baseline = torch.cuda.memory_allocated() if device == "cuda" else bc.rss_bytes()[0]
    model, optimizer, step = _stack(name, spec)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        bc.reset_peak_rss()
    for _ in range(spec["steps"]):
        step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else bc.rss_bytes()[1]
    return {"peak_above_baseline_bytes": peak - baseline, "baseline_bytes": baseline,
            "stored_bytes": sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "mmap_threshold_pinned": pinned}


def measure(cfg: dict[str, Any], device: str, threads: int, reps: int, mem_reps: int, mem_steps: int,
            log=print) -> dict[str, Any]:
    """One ``{dim, dim_ff, layers, tokens}``: interleaved step times, alternating fresh-worker peaks, and
    the paired ratios of cpm_live over the peer."""
    spec = {**cfg, "device": device, "threads": threads}
    log(f"  peer d={cfg['dim']} layers={cfg['layers']} tokens={cfg['tokens']}: timing")
    times = bc.run_isolated(job_timing, {**spec, "reps": reps})
    peaks: dict[str, list[float]] = {name: [] for name in STACKS}
    info: dict[str, dict[str, Any]] = {}
    for rep in range(mem_reps):  # fresh workers, the stacks alternating
        for name in STACKS[rep % 2:] + STACKS[:rep % 2]:
            mem = bc.run_isolated(job_memory, {**spec, "stack": name, "steps": mem_steps})
            peaks[name].append(mem["peak_above_baseline_bytes"] / bc.MIB)
            info[name] = {k: mem[k] for k in ("stored_bytes", "trainable_params", "mmap_threshold_pinned")}
    entry = {**cfg, "step_s": times, "peak_above_baseline_mib": peaks,
             "step_s_median": {n: bc.median(times[n]) for n in STACKS},
             "peak_above_baseline_mib_median": {n: bc.median(peaks[n]) for n in STACKS},
             "stacks": info,
             "time_ratio": bc.paired_ratio(times["cpm_live"], times["peer"]),
             "peak_ratio": bc.median(peaks["cpm_live"]) / bc.median(peaks["peer"])}
    log(f"    cpm_live / peer: time {entry['time_ratio']:.3f}, peak {entry['peak_ratio']:.3f} "
        f"({entry['peak_above_baseline_mib_median']})")
    return entry


def growth(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shape, each stack's step time and peak relative to its fewest-tokens configuration."""
    out = {}
    for shape in sorted({(c["dim"], c["layers"]) for c in configs}):
        rows = sorted((c for c in configs if (c["dim"], c["layers"]) == shape), key=lambda c: c["tokens"])
        if len(rows) > 1:
            first = rows[0]
            out[f"d{shape[0]}_L{shape[1]}"] = {
                name: {f"{c['tokens']}tok": {"time": c["step_s_median"][name] / first["step_s_median"][name],
                                             "peak": c["peak_above_baseline_mib_median"][name]
                                             / first["peak_above_baseline_mib_median"][name]}
                       for c in rows} for name in STACKS}
    return out


def describe(device: str, configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The section's JSON around measured ``configs``."""
    import peft
    import transformers

    return {
        "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
        "vocab": VOCAB, "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "cpm_live_targets": list(OUR_TARGETS),
                                 "peer_targets": list(PEER_TARGETS)},
        "peer_versions": {"transformers": transformers.__version__, "peft": peft.__version__},
        "peak_memory_method": "fresh worker per stack and repetition, stacks alternating; RSS high-water mark "
                              "(CUDA: max_memory_allocated) above the memory in use before the model was built",
        "configs": configs,
        "growth_over_fewest_tokens": growth(configs),
    }


def run_peer(configs: list[dict[str, Any]], device: str, threads: int, reps: int, mem_reps: int, mem_steps: int,
             log=print) -> dict[str, Any]:
    """Every ``{dim, dim_ff, layers, tokens}`` in ``configs`` (:func:`measure`), and how both stacks grow
    with the tokens of a shape."""
    reason = missing_peer()
    if reason is not None:
        log(f"  peer skipped: {reason}")
        return {"skipped": reason}
    return describe(device, [measure(cfg, device, threads, reps, mem_reps, mem_steps, log) for cfg in configs])


def _parse_config(text: str) -> dict[str, Any]:
    dim, dim_ff, layers, tokens = (int(x) for x in text.split(":"))
    return {"dim": dim, "dim_ff": dim_ff, "layers": layers, "tokens": tokens}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure a few configurations (each run fits one hold of a shared machine's lock), then combine.

    ``python benchmarks/bench_peer.py --config 1024:2816:4:2048 --out part.json`` (dim:ff:layers:tokens,
    repeatable); ``python benchmarks/bench_peer.py --combine part1.json part2.json --out peer.json``
    merges the parts' configurations into one section (``run.py --sections peer`` runs all in one go).
    """
    import argparse

    from cpm_live.utils import atomic_write_text

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON path")
    parser.add_argument("--config", action="append", type=_parse_config, default=[],
                        help="dim:dim_ff:layers:tokens to measure (repeatable)")
    parser.add_argument("--combine", nargs="+", default=[], help="part JSON files written by --config runs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timing repetitions (default 5)")
    parser.add_argument("--mem-reps", type=int, default=2, help="fresh workers per stack for the peak (default 2)")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps per peak measurement (default 2)")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.combine):
        parser.error("give either --config (measure) or --combine (merge parts), not both or neither")
    bc.check_out(parser, args.out, args.combine)
    command = " ".join(["python", "benchmarks/bench_peer.py", *(argv if argv is not None else sys.argv[1:])])
    if args.combine:
        parts = []
        for path in args.combine:
            with open(path, encoding="utf-8") as f:
                parts.append(json.load(f))
        devices = {part["meta"]["env"]["device"] for part in parts}
        if len(devices) != 1:
            parser.error(f"the parts ran on different devices {sorted(devices)}; combine one device's parts")
        configs = [c for part in parts for c in part["peer"]["configs"]]
        result = {"meta": {"command": command, "parts": [{"file": os.path.basename(path), **part["meta"]}
                                                           for path, part in zip(args.combine, parts)]},
                  "peer": describe(devices.pop(), configs)}
    else:
        bc.quiet()
        torch.set_num_threads(args.threads)
        meta = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "env": bc.environment(args.device, args.threads)}
        start = time.perf_counter()

        def log(message: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

        result = {"meta": meta, "peer": run_peer(args.config, args.device, args.threads, args.reps, args.mem_reps,
                                                 args.mem_steps, log=log)}
        meta["runtime_s"] = time.perf_counter() - start
        meta["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["summary"] = {f"d{c['dim']}_L{c['layers']}_{c['tokens']}tok": {"time": c["time_ratio"],
                                                                          "peak": c["peak_ratio"]}
                         for c in result["peer"].get("configs", [])}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
