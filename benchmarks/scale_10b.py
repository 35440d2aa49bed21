"""CPM-Bee-10B at its real shapes on a CPU machine: write, quantize, load, one QLoRA step, measured.

Every stage runs in a fresh process (its own RSS high-water mark, ``VmHWM``) and has a progress bar:

1. ``write``: a random fp16 checkpoint of ``src/config/cpm-bee-10b.json`` in CPM-Bee's key layout
   (435 keys, 19.2 GB, safetensors), written tensor by tensor (``bench_quantize.write_random_checkpoint``);
2. ``quantize``: ``quantize_state_dict`` on it, all cores (input GB, seconds, MB/s, peak RSS);
3. ``load``: ``build_model`` of the int4 model from the compressed file (meta build, then load);
4. ``load_quantize_on_the_fly``: the same from the fp16 file (each projection quantized as it loads);
5. ``step``: LoRA (r=8, project_q/project_v), activation checkpointing, one forward + loss + backward
   + AdamW step on one packed row of ``tokens`` tokens; then a few greedy tokens of generation when
   the CPM-Bee vocabulary is at hand;
6. ``decode``: the int4 model (fp32 activations, ``int4_compute_dtype: auto``) decoding greedily at
   batch 1 from a 64-token prompt, on all cores: the prompt's prefill, then decoding steps that
   alternate between the 4-bit kernels of ``cpm_live.quant.gemv`` and dequantize-then-matmul (every
   matmul dequantizes its weight first, as before the kernels), and the logits projection of one
   token alone. Its model is built in
   memory (layer 0 quantized from random weights and copied to every layer, a synthetic
   86,583-entry vocabulary; see ``bench_decode``), so it needs no checkpoint and runs alone with
   ``--stages decode``, which adds its result to an existing ``--out`` file.

CPU setting: fp32 activations, non-quantized weights and 4-bit compute (a CPU without native bf16
runs bf16 matmuls an order of magnitude slower; see README). The step's peak RSS is compared with
``estimate_10b.estimate`` for the same setting (qlora, fp32, ``tokens``), which counts tensors only,
plus the process's RSS before the model was built (interpreter and libraries): ``estimate_gib``.
Files go to the run's work directory and are removed at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as bc
import bench_decode
import bench_quantize
import estimate_10b
import torch

GIB = 2**30


def _config(spec: dict[str, Any]):
    from cpm_live.models import CPMBeeConfig

    # fp32 on CPU: non-quantized weights, activations and the dequantized weight of each matmul.
    return CPMBeeConfig.from_json_file(spec["config_path"], int4=True, half=False, int4_compute_dtype="float32")


def _peak(baseline: int) -> dict[str, float]:
    peak = bc.rss_bytes()[1]
    return {"peak_rss_gib": peak / GIB, "baseline_rss_gib": baseline / GIB, "peak_above_baseline_gib":
            (peak - baseline) / GIB}


def job_write(spec: dict[str, Any]) -> dict[str, Any]:
    from cpm_live.models import CPMBeeConfig

    config = CPMBeeConfig.from_json_file(spec["config_path"])
    baseline = bc.rss_bytes()[0]
    start = time.perf_counter()
    size = bench_quantize.write_random_checkpoint(config, spec["path"], seed=0, progress=spec["progress"])
    return {"bytes": size, "gb": size / 1e9, "seconds": time.perf_counter() - start, **_peak(baseline)}


def job_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the int4 model from ``spec['path']`` (compressed, or fp16 quantized while loading)."""
    from cpm_live.checkpoint import build_model

    config = _config(spec)
    baseline = bc.rss_bytes()[0]
    start = time.perf_counter()
    model = build_model(config, spec["path"])
    seconds = time.perf_counter() - start
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"seconds": seconds, "model_tensors_gib": tensors / GIB, **_peak(baseline)}


def _generate(model, config, max_length: int) -> dict[str, Any]:
    from cpm_live.generation import CPMBeeGreedy
    from cpm_live.tokenizers import CPMBeeTokenizer

    vocab = bc.REPO_ROOT.parent / "shared" / "cpm-bee" / "vocab" / "bee.txt"
    if not vocab.is_file():
        return {"skipped": f"no CPM-Bee vocabulary at {vocab}"}
    tokenizer = CPMBeeTokenizer(vocab)
    if tokenizer.vocab_size != config.vocab_size:
        return {"skipped": f"tokenizer has {tokenizer.vocab_size} entries, the config {config.vocab_size}"}
    start = time.perf_counter()
    with torch.no_grad():
        out = CPMBeeGreedy(model, tokenizer).generate([{"input": "今天天气很好", "<ans>": ""}],
                                                      max_length=max_length)
    return {"seconds": time.perf_counter() - start, "max_new_tokens": max_length, "answer": out[0]["<ans>"]}


def job_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the compressed model, add LoRA, one QLoRA step on one row of ``tokens``, then generate.

    glibc's mmap threshold is pinned (as in every memory job of these benchmarks): otherwise tensors
    freed while loading, and each dequantized weight freed in forward and backward, stay in the heap
    and RSS measures fragmentation. The peak is restarted after loading (the load has its own job).
    """
    from cpm_live.checkpoint import build_model
    from cpm_live.engine import recompute_activations
    from cpm_live.lora import LoraSettings, add_lora

    bc.pin_mmap_threshold()
    config = _config(spec)
    baseline = bc.rss_bytes()[0]
    model = build_model(config, spec["path"])
    add_lora(model, LoraSettings())
    recompute_activations(model.encoder.layers)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch, target = bc.make_batch(1, spec["tokens"], config.vocab_size, "cpu")
    bc.reset_peak_rss()
    start = time.perf_counter()
    loss = bc.train_step(model, optimizer, batch, target)
    seconds = time.perf_counter() - start
    out = {"tokens": spec["tokens"], "seconds": seconds, "loss": loss, "loss_finite": math.isfinite(loss),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), **_peak(baseline)}
    out["generation"] = _generate(model, config, spec["generate_tokens"]) if spec["generate_tokens"] else {
        "skipped": "generate_tokens is 0"}
    return out


def job_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding of the int4 model of ``config_path`` (see the module docstring, stage 6).

    One prefill, then ``pairs`` pairs of decoding steps of the same greedy answer, one step with the
    kernels and one with dequantize-then-matmul, the order alternating pair by pair: both paths
    decode the same tokens at the same cache lengths, and the ratio is the median of per-pair
    ratios, which survives the load of a shared machine changing during the run."""
    from cpm_live.generation import Decoder, GenerationStats, build_batch, build_prompt, greedy_choice
    from cpm_live.models import CPMBeeConfig
    from cpm_live.quant import gemv

    config = CPMBeeConfig.from_json_file(spec["config_path"], int4=True, half=False)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = bench_decode.synthetic_tokenizer(Path(tmp) / "vocab.txt", config.vocab_size)
    start = time.perf_counter()
    dense_layer = bench_decode.random_dense(dataclasses.replace(config.with_quantization(None), num_layers=1))
    model = bench_decode.int4_twin(config, dense_layer)
    del dense_layer
    build_seconds = time.perf_counter() - start
    bench_decode.first_use_checks(model)
    prompt = build_prompt(tokenizer, bench_decode.prompt_of(tokenizer, spec["prompt_tokens"]))
    stats = GenerationStats()
    seconds: dict[str, list[float]] = {"int4": [], "int4_dequantize": []}
    with torch.inference_mode():
        decoder = Decoder(model, tokenizer, build_batch(tokenizer, [prompt], torch.device("cpu")), stats=stats)
        cursor = decoder.start(0)
        for step in range(2 * spec["pairs"]):
            name = ("int4", "int4_dequantize")[(step + step // 2) % 2]  # A B, B A, A B, ...
            with gemv.kernels_enabled(name == "int4"):
                begin = time.perf_counter()
                word = int(greedy_choice(decoder.step([cursor]))[0])
                seconds[name].append(time.perf_counter() - begin)
            cursor, _ = decoder.advance(cursor, word, last_step=False)
            if cursor is None:  # the answer ended (eos): the pairs so far are all there is
                break
        ext = model.input_embedding(*(torch.zeros(1, dtype=torch.int32),) * 2)
        hidden = torch.randn(1, 1, config.dim_model)
        logits = bc.interleaved({"logits": lambda: model.input_embedding.projection(hidden, ext)}, reps=5)
    pairs = min(len(v) for v in seconds.values())
    per_token = {name: bc.median(v[:pairs]) for name, v in seconds.items()}
    projection = model.encoder.layers[0].ffn.ffn.w_out
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return {"prompt_tokens": stats.prompt_tokens, "prompt_seconds": stats.prompt_seconds,
            "prompt_tokens_per_s": stats.prompt_tokens_per_s, "step_seconds": seconds, "pairs": pairs,
            "decode_seconds_per_token": per_token,
            # the first kernel step also derives every projection's kernel layout (bnb_avx512bf16, once)
            "first_int4_step_seconds": seconds["int4"][0],
            "decode_tokens_per_s": {name: 1 / s for name, s in per_token.items()},
            "decode_speedup": bc.paired_ratio(seconds["int4_dequantize"][:pairs], seconds["int4"][:pairs]),
            "logits_seconds_per_token": bc.median(logits["logits"]), "peak_rss_bytes": bc.rss_bytes()[1],
            "int4_compute_dtype": str(projection.compute_dtype).removeprefix("torch."),
            "int4_kernel": gemv.kernel_for(projection.compute_dtype, projection.quant_state()),
            "kernel_checks": gemv.checked_cases(), "build_seconds": build_seconds,
            "model_tensors_gib": sum(t.numel() * t.element_size() for t in tensors) / GIB}


def job_estimate(spec: dict[str, Any]) -> dict[str, Any]:
    return estimate_10b.estimate("qlora", spec["tokens"], torch.float32, spec["config_path"])


def run_decode(config_path: str | os.PathLike = estimate_10b.CONFIG_PATH, prompt_tokens: int = 64, pairs: int = 5,
               threads: int | None = None) -> dict[str, Any]:
    """Stage 6 in a fresh process, on all cores unless ``threads``."""
    spec = {"config_path": str(config_path), "prompt_tokens": prompt_tokens, "pairs": pairs,
            "threads": threads or os.cpu_count() or 1}
    return {"setting": {k: v for k, v in spec.items() if k != "config_path"},
            **bc.run_isolated(job_decode, spec, timeout=6 * 3600)}


def run_scale(workdir: str, config_path: str | os.PathLike = estimate_10b.CONFIG_PATH, tokens: int = 256,
              generate_tokens: int = 4, workers: int | None = None, progress: bool = True,
              on_stage=None, log=print, decode_pairs: int = 5) -> dict[str, Any]:
    """All stages in order; ``on_stage(results)`` is called after each (the caller saves partial JSON)."""
    config_path = str(config_path)
    dense = os.path.join(workdir, "scale-fp16.safetensors")
    packed = os.path.join(workdir, "scale-int4.safetensors")
    base = {"config_path": config_path, "progress": progress}
    out: dict[str, Any] = {"config": os.path.relpath(config_path, bc.REPO_ROOT), "device": "cpu",
                           "setting": "fp32 activations/non-quantized weights/4-bit compute, nf4 double quant "
                                      "blocksize 64, LoRA r=8 on project_q/project_v, activation checkpointing",
                           "load_average_1m": {}}

    def stage(name: str, fn, spec: dict[str, Any]) -> dict[str, Any]:
        log(f"  scale10b {name} ...")
        out[name] = fn(**spec) if fn is run_decode else bc.run_isolated(fn, {**base, **spec}, timeout=6 * 3600)
        out["load_average_1m"][name] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        log(f"  scale10b {name}: {out[name]}")
        if on_stage is not None:
            on_stage(out)
        return out[name]

    try:
        out["estimate"] = bc.run_isolated(job_estimate, {**base, "tokens": tokens})
        stage("write", job_write, {"path": dense})
        q = stage("quantize", bench_quantize.job_quantize, {"input": dense, "output": packed, "device": "cpu",
                                                            "workers": workers, "progress": progress})
        out["quantize"].update(input_gb=q["input_bytes"] / 1e9, mb_per_s=q["throughput_mb_s"],
                               peak_rss_gib=q["peak_rss_bytes"] / GIB,
                               peak_above_baseline_gib=q["peak_above_baseline_bytes"] / GIB)
        stage("load", job_load, {"path": packed})
        stage("load_quantize_on_the_fly", job_load, {"path": dense})
        Path(dense).unlink()
        step = stage("step", job_step, {"path": packed, "tokens": tokens, "generate_tokens": generate_tokens})
        Path(packed).unlink()
        stage("decode", run_decode, {"config_path": config_path, "pairs": decode_pairs})
    finally:
        for path in (dense, packed):
            Path(path).unlink(missing_ok=True)
    out["estimate_gib"] = out["estimate"]["estimated_peak_gib"] + step["baseline_rss_gib"]
    out["step_peak_over_estimate"] = step["peak_rss_gib"] / out["estimate_gib"]
    out["step_within_15pct_of_estimate"] = abs(out["step_peak_over_estimate"] - 1) <= 0.15
    out["step_peak_under_20_gib"] = step["peak_rss_gib"] < 20
    out["estimate_note"] = ("estimate_gib = estimate_10b.estimate('qlora', tokens, fp32) (tensors: weights, LoRA "
                            "+ AdamW, checkpointed block inputs, position bias, saved tensors, one block's "
                            "recompute) + the step process's RSS before building the model (libraries)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python benchmarks/scale_10b.py --out benchmarks/results-cpu-10b.json [--workdir DIR]``."""
    import argparse
    import json
    import sys

    from cpm_live.utils import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON path")
    parser.add_argument("--workdir", default=None,
                        help="where the 19 GB + 5.5 GB checkpoints go (default: the temp dir); removed at the end")
    parser.add_argument("--config", default=str(estimate_10b.CONFIG_PATH), help="model config (default: 10B)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens in the training row (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="quantize workers (default: all cores)")
    parser.add_argument("--stages", choices=("all", "decode"), default="all",
                        help="decode: run stage 6 alone and add it to --out, keeping the other stages' results")
    parser.add_argument("--pairs", type=int, default=5,
                        help="decode: pairs of greedy steps, one with the kernels and one without (default 5)")
    args = parser.parse_args(argv)
    bc.check_out(parser, args.out, [args.config])
    bc.quiet()
    meta = {"command": " ".join(["python", "benchmarks/scale_10b.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": bc.environment("cpu", 1),
            "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB}

    if args.stages == "decode":
        results = json.loads(Path(args.out).read_text(encoding="utf-8")) if Path(args.out).is_file() else {}
        meta["env"] = bc.environment("cpu", os.cpu_count() or 1)  # the stage runs on all cores
        start = time.perf_counter()
        decode = run_decode(args.config, pairs=args.pairs)
        meta.update(runtime_s=time.perf_counter() - start,
                    load_average_1m_at_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        results["decode"] = {**decode, "meta": meta}
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
        return results

    def save(results: dict[str, Any]) -> None:
        atomic_write_text(args.out, json.dumps({**results, "meta": meta}, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="cpm-live-10b-", dir=args.workdir) as workdir:
        start = time.perf_counter()
        results = run_scale(workdir, args.config, args.tokens, workers=args.workers, on_stage=save,
                            log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True),
                            decode_pairs=args.pairs)
        meta["runtime_s"] = time.perf_counter() - start
    save(results)
    return results


if __name__ == "__main__":
    main()
