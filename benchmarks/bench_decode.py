"""Decoding speed of a 4-bit model against the dense models a user would run instead.

    python benchmarks/bench_decode.py --out benchmarks/results-cpu-decode.json     # rows, decode: 10B shapes
    python benchmarks/bench_decode.py --sections rows --out rows.json               # the kernel vs rows only
    python benchmarks/bench_decode.py --sections agree --out agree.json --model-config demo_out/config-int4.json \
        --load demo_out/base-int4.safetensors --delta demo_out/qlora/demo-delta-best --vocab demo_out/vocab.txt \
        --data src/cpm_live/demo_data/eval.jsonl                                   # the demo's QLoRA model

Sections:

- ``decode``: greedy decoding at batch 1 from a 64-token prompt through the real generation stack
  (``CPMBeeGreedy`` and its prompt/decode timers) at CPM-Bee-10B's layer shapes (d 4096, ff 10240,
  32 heads of 128, vocabulary 86583), 4 layers. Variants, in one process, repetitions interleaved
  with the order rotated: ``int4`` (the kernels of ``cpm_live.quant.gemv``), ``int4_dequantize``
  (the same model with the kernels off: every 4-bit matmul dequantizes its weight first, as before
  the kernels), ``bf16`` and ``fp32`` dense. The int4 model runs in bf16 where the CPU computes bf16
  natively and in fp32 elsewhere (what ``precision`` and ``int4_compute_dtype: auto`` would choose);
  without native bf16 torch emulates bf16 matmuls, so ``fp32`` is the dense model such a user runs.
  Ratios are medians of per-repetition ratios of decode tokens/s.
- ``agree`` (only when named): greedy answers of a saved model (e.g. the demo's QLoRA model) with the
  kernels and with dequantize-then-matmul, token by token (:func:`compare_greedy`).
- ``rows``: one projection per 10B shape, ``x [rows, K] @ W.T`` through each kernel this CPU has,
  through dequantize-then-matmul, and dense ``F.linear`` in fp32 and bf16, for 1 to 64 rows: where
  a kernel stops paying (``cpm_live.quant.gemv.MAX_ROWS`` comes from it).

Every layer holds layer 0's weights (copied, so decoding still reads each layer's own bytes; speed
does not depend on the values) and the vocabulary is synthetic (``build_tiny_vocab`` padded to the
size), so nothing from CPM-Bee is needed. One torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as bc
import torch
import torch.nn.functional as F

SHAPE_10B = {"dim": 4096, "dim_ff": 10240, "heads": 32, "vocab": 86583}
SHAPES_10B = ((4096, 4096), (10240, 4096), (4096, 10240))  # (dim_out, dim_in): attention, w_in, w_out
ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 64)
VARIANTS = ("int4", "int4_dequantize", "bf16", "fp32")


def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def synthetic_tokenizer(path: Path, size: int):
    """A CPM-Bee tokenizer with exactly ``size`` entries: the tiny vocab padded with made-up words."""
    from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab

    base = CPMBeeTokenizer(build_tiny_vocab(path)).vocab_size
    if size < base:
        raise ValueError(f"vocab {size} is smaller than the tiny vocab ({base} entries)")
    return CPMBeeTokenizer(build_tiny_vocab(path, [f"tok{i}" for i in range(size - base)]))


def prompt_of(tokenizer, tokens: int) -> dict[str, Any]:
    """A sample whose prompt has ``tokens`` tokens (or the next length up, if none has exactly that)."""
    from cpm_live.generation import build_prompt

    for words in range(1, 4 * tokens):  # each " a" is one token
        sample = {"input": " ".join(["a"] * words), "<ans>": ""}
        if len(build_prompt(tokenizer, sample).input_ids) >= tokens:
            return sample
    raise ValueError(f"found no prompt of {tokens} tokens")


def _empty(config):
    from cpm_live.models import CPMBee

    with torch.device("meta"):
        model = CPMBee(config.resolve_compute_dtype("cpu"))
    return model.to_empty(device="cpu").eval()


def random_dense(config):
    """A dense model of ``config``: N(0, 1) matrices (CPM-Bee's init scale), unit norms, and every
    layer a copy of layer 0 (so an int4 twin needs one layer quantized)."""
    model = _empty(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.fill_(1.0)
        first = model.encoder.layers[0].state_dict()
        for layer in model.encoder.layers[1:]:
            layer.load_state_dict(first)
    return model


def int4_twin(config, dense):
    """An int4 model of ``config`` (any number of layers) holding ``dense``'s weights: each projection
    of ``dense``'s layer 0 quantized once and loaded into every layer; the embedding is ``dense``'s own
    tensor when the dtypes agree (one 86k x d table less in memory), else a cast copy."""
    from cpm_live.layers import Linear4bit

    model = _empty(config)
    source = dict(dense.named_modules())
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            within_layer = name.split(".", 3)[3]  # encoder.layers.N.<within_layer>
            if within_layer not in quantized:
                weight = source[f"encoder.layers.0.{within_layer}"].weight
                quantized[within_layer] = Linear4bit.from_weight(
                    weight, module.quant_type, module.double_quant, module.blocksize, module.compute_dtype
                ).state_dict()
            module.load_state_dict(quantized[within_layer])
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name if not name.startswith("encoder.layers.") else \
                "encoder.layers.0." + name.split(".", 3)[3]
            if p.is_floating_point() and key in params:
                p.copy_(params[key])
    if dense.input_embedding.weight.dtype == model.config.dtype:
        model.input_embedding.weight = dense.input_embedding.weight
    return model


def ten_b_config(layers: int, precision: str, int4: bool = False, dim: int = SHAPE_10B["dim"],
                 dim_ff: int = SHAPE_10B["dim_ff"], heads: int = SHAPE_10B["heads"], vocab: int = SHAPE_10B["vocab"]):
    from cpm_live.models import CPMBeeConfig

    return CPMBeeConfig(vocab_size=vocab, dim_model=dim, dim_ff=dim_ff, num_layers=layers, num_heads=heads,
                        dim_head=dim // heads, precision=precision, int4=int4)


def build_models(dim: int, dim_ff: int, heads: int, layers: int, vocab: int, int4_precision: str):
    """``{"fp32", "bf16", "int4"}`` CPM-Bee models holding the same weights (int4: quantized from them)."""
    def config(precision: str, int4: bool = False):
        return ten_b_config(layers, precision, int4, dim, dim_ff, heads, vocab)

    fp32 = random_dense(config("fp32"))
    bf16 = _empty(config("bf16"))
    bf16.load_state_dict(fp32.state_dict())
    int4 = int4_twin(config(int4_precision, int4=True), fp32 if int4_precision == "fp32" else bf16)
    return {"fp32": fp32, "bf16": bf16, "int4": int4}


def job_decode(spec: dict[str, Any]) -> dict[str, Any]:
    from cpm_live.generation import CPMBeeGreedy
    from cpm_live.quant import gemv

    int4_precision = "bf16" if native_bf16() else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = synthetic_tokenizer(Path(tmp) / "vocab.txt", spec["vocab"])
    start = time.perf_counter()
    models = build_models(spec["dim"], spec["dim_ff"], spec["heads"], spec["layers"], spec["vocab"], int4_precision)
    build_seconds = time.perf_counter() - start
    sample = prompt_of(tokenizer, spec["prompt_tokens"])
    runs = {"int4": (models["int4"], True), "int4_dequantize": (models["int4"], False),
            "bf16": (models["bf16"], True), "fp32": (models["fp32"], True)}

    def generate(name: str, new_tokens: int) -> dict[str, Any]:
        model, kernels = runs[name]
        generator = CPMBeeGreedy(model, tokenizer)
        with gemv.kernels_enabled(kernels):
            generator.generate([dict(sample)], max_length=new_tokens)
        return generator.stats.report(torch.device("cpu"))

    for name in runs:  # warm-up: the kernel build and first-use checks, oneDNN's first calls
        generate(name, 1)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(spec["reps"]):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(generate(name, spec["new_tokens"]))

    def rates(name: str, key: str) -> list[float]:
        return [s[key] for s in samples[name]]

    per_variant = {name: {
        "prompt_tokens": samples[name][0]["prompt_tokens"],
        "decode_tokens": [s["decode_tokens"] for s in samples[name]],
        "prompt_tokens_per_s": rates(name, "prompt_tokens_per_s"),
        "decode_tokens_per_s": rates(name, "decode_tokens_per_s"),
        "prompt_tokens_per_s_median": bc.median(rates(name, "prompt_tokens_per_s")),
        "decode_tokens_per_s_median": bc.median(rates(name, "decode_tokens_per_s")),
        "decode_ms_per_token_median": 1e3 / bc.median(rates(name, "decode_tokens_per_s")),
    } for name in names}
    ratios = {f"int4_over_{other}_decode_tokens_per_s": bc.paired_ratio(rates("int4", "decode_tokens_per_s"),
                                                                        rates(other, "decode_tokens_per_s"))
              for other in names[1:]}
    ratios.update({f"int4_over_{other}_prompt_tokens_per_s": bc.paired_ratio(
        rates("int4", "prompt_tokens_per_s"), rates(other, "prompt_tokens_per_s")) for other in names[1:]})
    projection = models["int4"].encoder.layers[0].ffn.ffn.w_out
    return {"variants": per_variant, "ratios": ratios, "int4_precision": int4_precision,
            "int4_compute_dtype": str(projection.compute_dtype).removeprefix("torch."),
            "int4_kernel": gemv.kernel_for(projection.compute_dtype, projection.quant_state()),
            "kernel_checks": gemv.checked_cases(), "build_seconds": build_seconds}


def run_decode(dim: int, dim_ff: int, heads: int, layers: int, vocab: int, prompt_tokens: int, new_tokens: int,
               reps: int, threads: int) -> dict[str, Any]:
    spec = {"dim": dim, "dim_ff": dim_ff, "heads": heads, "layers": layers, "vocab": vocab,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "reps": reps, "threads": threads}
    return {"setting": spec, **bc.run_isolated(job_decode, spec, timeout=6 * 3600)}


def _time_rows(kernel, packed: torch.Tensor, state, dense: dict[torch.dtype, torch.Tensor], x: torch.Tensor,
               reps: int) -> dict[str, Any]:
    """One row count: the kernel, dequantize-then-matmul and dense ``F.linear`` (fp32, bf16), interleaved."""
    from cpm_live.quant import dequant

    x32, x16 = x.float(), x.bfloat16()
    with torch.no_grad():
        times = bc.interleaved({
            "kernel": lambda: kernel(x, packed, state),
            "dequantize": lambda: dequant.matmul_4bit(x, packed, state),
            "dense_fp32": lambda: F.linear(x32, dense[torch.float32]),
            "dense_bf16": lambda: F.linear(x16, dense[torch.bfloat16]),
        }, reps=reps)
    return {"ms_median": {k: 1e3 * bc.median(v) for k, v in times.items()},
            "kernel_over_dequantize": bc.paired_ratio(times["kernel"], times["dequantize"]),
            "kernel_over_dense_fp32": bc.paired_ratio(times["kernel"], times["dense_fp32"]),
            "kernel_over_dense_bf16": bc.paired_ratio(times["kernel"], times["dense_bf16"])}


def first_use_checks(model) -> None:
    """One row through one layer of each 4-bit shape, so the kernel's build and first-use checks are
    not timed as decoding."""
    from cpm_live.layers import Linear4bit

    seen = set()
    with torch.no_grad():
        for module in model.encoder.layers[0].modules():
            if isinstance(module, Linear4bit) and (module.dim_out, module.dim_in) not in seen:
                seen.add((module.dim_out, module.dim_in))
                module(torch.zeros(1, module.dim_in, dtype=model.config.dtype))


# Greedy paths may pick different tokens only where the reference's two best logits are this close,
# relative to max(1, |best|): a few roundings of fp32 (fp32 compute) or bf16 (bf16 compute) apart.
TIE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _greedy_logged(model, tokenizer, sample: dict[str, Any], max_length: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy answer tokens of ``sample`` and the edited logits each was chosen from (``CPMBeeGreedy``'s path)."""
    from cpm_live.generation import Decoder, build_batch, build_prompt, greedy_choice
    from cpm_live.generation import sample as decode

    logged: list[torch.Tensor] = []

    def choose(logits: torch.Tensor) -> torch.Tensor:
        logged.append(logits[0].clone())
        return greedy_choice(logits)

    batch = build_batch(tokenizer, [build_prompt(tokenizer, sample)], next(model.parameters()).device)
    with torch.inference_mode():
        (tokens,) = decode(Decoder(model, tokenizer, batch), choose, max_length)
    return [token for token, _ in tokens], logged


def compare_greedy(model, tokenizer, samples: list[dict[str, Any]], max_length: int) -> dict[str, Any]:
    """Greedy answers with the 4-bit kernels against the dequantize-then-matmul path, sample by sample.

    Both decode the same prompt; up to the first differing token they saw the same prefix, so their
    logits there are compared (``max_abs_logit_diff``), and a differing token is a tie when the
    reference's two best logits are within ``TIE_TOLERANCE`` (of the 4-bit compute dtype)."""
    from cpm_live.layers import Linear4bit
    from cpm_live.quant import gemv

    model.eval()
    dtype = next(m for m in model.modules() if isinstance(m, Linear4bit)).compute_dtype
    tolerance = TIE_TOLERANCE[dtype]
    details = []
    for index, sample in enumerate(samples):
        with gemv.kernels_enabled(False):
            reference, reference_logits = _greedy_logged(model, tokenizer, sample, max_length)
        with gemv.kernels_enabled(True):
            tokens, logits = _greedy_logged(model, tokenizer, sample, max_length)
        same = 0
        while same < min(len(tokens), len(reference)) and tokens[same] == reference[same]:
            same += 1
        compared = min(same + 1, len(logits), len(reference_logits))
        diff = max(float((a - b).abs().max()) for a, b in zip(logits[:compared], reference_logits[:compared]))
        entry = {"sample": index, "identical": tokens == reference, "tokens": len(reference),
                 "max_abs_logit_diff": diff}
        if not entry["identical"]:
            top2 = reference_logits[same].topk(2).values.tolist()
            entry.update(first_difference=same, top2_gap=top2[0] - top2[1],
                         within_tie=top2[0] - top2[1] <= tolerance * max(1.0, abs(top2[0])))
        details.append(entry)
    differing = [d for d in details if not d["identical"]]
    return {"samples": len(details), "identical": len(details) - len(differing), "differing": len(differing),
            "differing_within_tie": sum(d["within_tie"] for d in differing),
            "tie_tolerance": tolerance, "compute_dtype": str(dtype).removeprefix("torch."),
            "max_abs_logit_diff": max((d["max_abs_logit_diff"] for d in details), default=0.0), "details": details}


def job_agree(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`compare_greedy` on a saved model (``cpm-bee-generate``'s loading) and a jsonl of samples."""
    from cpm_live.checkpoint import build_model
    from cpm_live.checkpoint.adapters import load_adapter
    from cpm_live.checkpoint.base_model import find_vocab
    from cpm_live.data.jsonl import answered_records
    from cpm_live.model_dir import load_config
    from cpm_live.tokenizers import CPMBeeTokenizer

    model = build_model(load_config(spec["model_config"], spec["load"]), spec["load"], device=torch.device("cpu"))
    if spec["delta"]:
        load_adapter(model, spec["delta"])
    tokenizer = CPMBeeTokenizer(find_vocab(spec["vocab"], spec["load"]))
    samples = [record for _, record in answered_records(spec["data"])]
    return {"setting": spec, **compare_greedy(model, tokenizer, samples, spec["max_length"])}


def job_rows(spec: dict[str, Any]) -> dict[str, Any]:
    from cpm_live.layers import Linear4bit
    from cpm_live.quant import gemv, native

    kernels = {"avx2": torch.float32}
    if native_bf16():
        kernels["bnb_avx512bf16"] = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    results = []
    for dim_out, dim_in in spec["shapes"]:
        weight = torch.randn(dim_out, dim_in, generator=g)
        dense = {torch.float32: weight, torch.bfloat16: weight.bfloat16()}
        for name, dtype in kernels.items():
            layer = Linear4bit.from_weight(weight, compute_dtype=dtype)
            packed, state = layer.weight, layer.quant_state()
            if gemv.kernel_for(dtype, state) != name:
                results.append({"kernel": name, "dim_out": dim_out, "dim_in": dim_in,
                                "skipped": f"not available here ({native.unavailable_reason()})"})
                continue
            by_rows = {rows: _time_rows(gemv.KERNELS[name], packed, state, dense,
                                        torch.randn(rows, dim_in, generator=g).to(dtype), spec["reps"])
                       for rows in spec["rows"]}
            slower = [rows for rows, r in by_rows.items() if r["kernel_over_dequantize"] >= 1.0]
            results.append({"kernel": name, "dtype": str(dtype).removeprefix("torch."), "dim_out": dim_out,
                            "dim_in": dim_in, "rows": by_rows,
                            "first_rows_where_dequantize_is_faster": min(slower) if slower else None})
    return {"results": results, "max_rows": dict(gemv.MAX_ROWS)}


def run_rows(shapes: tuple[tuple[int, int], ...], rows: tuple[int, ...], reps: int, threads: int) -> dict[str, Any]:
    return bc.run_isolated(job_rows, {"shapes": [list(s) for s in shapes], "rows": list(rows), "reps": reps,
                                      "threads": threads}, timeout=6 * 3600)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cpm_live.utils import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON path")
    parser.add_argument("--sections", default="rows,decode", help="comma-separated: rows, decode, agree")
    parser.add_argument("--layers", type=int, default=4, help="decode: layers of 10B shapes (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: greedy tokens per repetition")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (rows: 5 more)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    agree = parser.add_argument_group("agree: greedy answers of a saved model, kernels vs dequantize-then-matmul")
    agree.add_argument("--model-config", default=None)
    agree.add_argument("--load", default=None, help="checkpoint (e.g. demo_out/base-int4.safetensors)")
    agree.add_argument("--delta", default=None, help="LoRA adapter (e.g. demo_out/qlora/demo-delta-best)")
    agree.add_argument("--vocab", default=None)
    agree.add_argument("--data", default=None, help="jsonl of samples with <ans> (e.g. the demo's eval.jsonl)")
    agree.add_argument("--max-length", type=int, default=8, help="greedy tokens per answer (the demo's 8)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if set(sections) - {"rows", "decode", "agree"}:
        parser.error(f"unknown section(s) in {args.sections!r}; choose from rows, decode, agree")
    if "agree" in sections and not (args.load and args.data):
        parser.error("the agree section needs --load and --data")
    bc.check_out(parser, args.out, [args.model_config, args.load, args.delta, args.vocab, args.data])
    bc.quiet()
    results: dict[str, Any] = {"meta": {
        "command": " ".join(["python", "benchmarks/bench_decode.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": bc.environment("cpu", args.threads)}}
    for section in sections:
        if section == "rows":
            results["rows"] = run_rows(SHAPES_10B, ROWS, args.reps + 5, args.threads)
        elif section == "decode":
            results["decode"] = run_decode(SHAPE_10B["dim"], SHAPE_10B["dim_ff"], SHAPE_10B["heads"], args.layers,
                                           SHAPE_10B["vocab"], args.prompt_tokens, args.new_tokens, args.reps,
                                           args.threads)
        else:
            spec = {key: getattr(args, key) for key in ("model_config", "load", "delta", "vocab", "data",
                                                        "max_length", "threads")}
            results["agree"] = bc.run_isolated(job_agree, spec)
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    results["meta"]["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
