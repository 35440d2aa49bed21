"""Compression: bytes per parameter (NF4 and int8), checkpoint size vs fp16, the logits' quantization
error against the fp32 model, and quantize_state_dict's speed and memory.

quantize_state_dict streams one tensor at a time, so its peak memory should depend on the largest
tensor, not on the checkpoint: we compress synthetic CPM-Bee checkpoints of growing depth (same
tensor shapes, more layers) each in a fresh process and fit peak RSS against input size; the slope
should be ~0 MiB per MiB.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import bench_common as bc
import torch

CONFIG_DIR = bc.REPO_ROOT / "src" / "config"
SETTINGS = {"quant_type": "nf4", "double_quant": True, "blocksize": 64}


def _settings():
    from cpm_live.quant import format as qformat

    return qformat.QuantSettings(**SETTINGS)


def _shapes(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a model's state dict, without allocating it (meta device)."""
    from cpm_live.models import CPMBee

    with torch.device("meta"):
        model = CPMBee(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def job_bytes_per_param(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured size of each quantized weight in ``spec['shapes']``: every stored tensor, and only the
    parts that scale with the weight (packed codes, absmax, nested absmax)."""
    from cpm_live.quant import format as qformat

    settings = _settings()
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in spec["shapes"]:
        weight = torch.randn(*shape, generator=g).half()
        entries = qformat.quantize_entries("w", weight, settings)
        total = sum(t.numel() * t.element_size() for t in entries.values())
        scaling = sum(entries[k].numel() * entries[k].element_size() for k in ("w", "w.absmax", "w.nested_absmax"))
        n = math.prod(shape)
        out.append({"shape": list(shape), "params": n, "bytes": total, "bytes_per_param": total / n,
                    "bytes_per_param_without_constants": scaling / n,
                    "expected_nf4_dq_64": 0.5 + 1 / 64 + 4 / (64 * 256)})
    return out


def job_int8_bytes_per_param(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """As :func:`job_bytes_per_param` for LLM.int8: int8 rows, fp32 ``SCB`` per row, the layout tag."""
    from cpm_live.quant import int8

    g = torch.Generator().manual_seed(0)
    out = []
    for shape in spec["shapes"]:
        entries = int8.quantize_entries("w.weight", torch.randn(*shape, generator=g).half())
        total = sum(t.numel() * t.element_size() for t in entries.values())
        scaling = sum(entries[k].numel() * entries[k].element_size() for k in ("w.weight", "w.SCB"))
        n = math.prod(shape)
        out.append({"shape": list(shape), "params": n, "bytes": total, "bytes_per_param": total / n,
                    "bytes_per_param_without_constants": scaling / n, "expected_int8": 1 + 4 / shape[1]})
    return out


def analytic_checkpoint_ratio(config, blob_bytes: int = 200) -> dict[str, Any]:
    """int4 and int8 vs fp16 checkpoint bytes of ``config`` from its shapes (projections quantized,
    the rest fp16)."""
    from cpm_live.convert.compress import is_quant_target
    from cpm_live.quant import format as qformat
    from cpm_live.quant import int8

    settings = _settings()
    fp16 = int4 = int8_bytes = quant_params = 0
    for key, (shape, _) in _shapes(config).items():
        n = math.prod(shape)
        fp16 += 2 * n
        if is_quant_target(key):
            quant_params += n
            int4 += qformat.quantized_bytes(shape, settings, blob_bytes)
            int8_bytes += sum(math.prod(s) * d.itemsize for s, d in int8.tensor_layout(shape).values())
        else:
            int4 += 2 * n
            int8_bytes += 2 * n
    return {"fp16_bytes": fp16, "int4_bytes": int4, "ratio_to_fp16": int4 / fp16,
            "int8_bytes": int8_bytes, "int8_ratio_to_fp16": int8_bytes / fp16,
            "params": fp16 // 2, "quantized_params": quant_params}


def job_tiny_checkpoint(spec: dict[str, Any]) -> dict[str, Any]:
    """Measured file sizes: the tiny config saved as fp16 safetensors, then compressed."""
    from safetensors.torch import save_file

    from cpm_live.convert.compress import quantize_state_dict
    from cpm_live.models import CPMBee, CPMBeeConfig

    config = CPMBeeConfig.from_json_file(CONFIG_DIR / "cpm-bee-tiny.json", half=True)
    torch.manual_seed(0)
    dense = os.path.join(spec["workdir"], "tiny-fp16.safetensors")
    packed = os.path.join(spec["workdir"], "tiny-int4.safetensors")
    packed8 = os.path.join(spec["workdir"], "tiny-int8.safetensors")
    save_file({k: v.contiguous() for k, v in CPMBee(config).state_dict().items()}, dense)
    quantize_state_dict(dense, packed, device="cpu", force=True, progress=False)
    quantize_state_dict(dense, packed8, device="cpu", force=True, progress=False, int8=True)
    sizes = {"fp16_file_bytes": os.path.getsize(dense), "int4_file_bytes": os.path.getsize(packed),
             "int8_file_bytes": os.path.getsize(packed8)}
    sizes["ratio_to_fp16"] = sizes["int4_file_bytes"] / sizes["fp16_file_bytes"]
    sizes["int8_ratio_to_fp16"] = sizes["int8_file_bytes"] / sizes["fp16_file_bytes"]
    return sizes


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def job_logit_error(spec: dict[str, Any]) -> dict[str, Any]:
    """Logits of one random fp32 CPM-Bee-shaped model against its NF4 and int8 quantizations (the same
    weights, quantized on load), on one packed batch: relative L2 error, share of positions whose top-1
    token agrees, and the projections' weight error (relative L2 of the dequantized weights)."""
    from cpm_live.checkpoint import build_model
    from cpm_live.layers import is_quantized
    from cpm_live.models import CPMBee

    config = bc.model_config(spec["dim"], spec["layers"])
    torch.manual_seed(0)
    dense = CPMBee(config).eval()
    path = os.path.join(spec["workdir"], "logit-error-fp32.pt")
    torch.save(dense.state_dict(), path)
    rows, seqlen = bc.batch_shape(spec["tokens"])
    batch, _ = bc.make_batch(rows, seqlen, config.vocab_size, "cpu")
    with torch.no_grad():
        reference = dense(**batch.forward_kwargs())[0]
        out: dict[str, Any] = {"dim": spec["dim"], "layers": spec["layers"], "tokens": spec["tokens"],
                               "vocab": config.vocab_size, "int8_threshold": config.int8_threshold}
        for name, kind in (("nf4", "int4"), ("int8", "int8")):
            model = build_model(config.with_quantization(kind), path).eval()  # nf4: fp32 compute
            logits = model(**batch.forward_kwargs())[0]
            weights = [_relative_error(m.dequantize(torch.float32), dense.get_submodule(n).weight)
                       for n, m in model.named_modules() if is_quantized(m)]
            out[name] = {"logits_relative_l2": _relative_error(logits, reference),
                         "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).double().mean().item(),
                         "weight_relative_l2_median": bc.median(weights)}
    Path(path).unlink()
    return out


def job_write_checkpoint(spec: dict[str, Any]) -> dict[str, Any]:
    """A random fp16 CPM-Bee checkpoint of ``spec['layers']`` layers at ``spec['dim']`` (.pt or .safetensors)."""
    from safetensors.torch import save_file

    config = bc.model_config(spec["dim"], spec["layers"])
    g = torch.Generator().manual_seed(spec["layers"])
    state = {k: torch.randn(shape, generator=g).half() for k, (shape, _) in _shapes(config).items()}
    if spec["path"].endswith(".safetensors"):
        save_file(state, spec["path"])
    else:
        torch.save(state, spec["path"])
    largest = max(t.numel() * t.element_size() for t in state.values())
    return {"bytes": os.path.getsize(spec["path"]), "largest_tensor_bytes": largest}


def job_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    """Compress one checkpoint in this (fresh) process; report time and the RSS high-water mark
    (restarted after quantizing one small tensor, so bitsandbytes' lazy set-up is not counted).

    glibc's default malloc settings are kept here: this is the memory a user of the tool sees.
    """
    from cpm_live.convert.compress import quantize_state_dict
    from cpm_live.quant import format as qformat

    qformat.quantize(torch.randn(256, 256, dtype=torch.half), _settings())
    bc.reset_peak_rss()
    baseline = bc.rss_bytes()[0]
    summary = quantize_state_dict(spec["input"], spec["output"], device=spec["device"], force=True,
                                  progress=spec.get("progress", False), workers=spec.get("workers"))
    peak = bc.rss_bytes()[1]
    return {"input_bytes": summary.input_bytes, "output_bytes": summary.output_bytes, "seconds": summary.seconds,
            "throughput_mb_s": summary.throughput, "workers": summary.workers, "peak_rss_bytes": peak,
            "baseline_rss_bytes": baseline, "peak_above_baseline_bytes": peak - baseline}


def write_random_checkpoint(config, path: str, seed: int = 0, progress: bool = False) -> int:
    """A random fp16 checkpoint of ``config`` in CPM-Bee's key layout, written tensor by tensor.

    Only one tensor is in memory at a time (generated in fp32 row chunks of <= 64 Mi values, cast to
    fp16), so a 19 GB CPM-Bee-10B checkpoint can be written on a machine with much less RAM.
    Returns the file size.
    """
    from tqdm import tqdm

    from cpm_live.checkpoint.writer import SafetensorsWriter
    from cpm_live.utils import atomic_path

    layout = {k: (shape, torch.float16) for k, (shape, _) in _shapes(config).items()}
    total = sum(math.prod(shape) * 2 for shape, _ in layout.values())
    g = torch.Generator().manual_seed(seed)
    with atomic_path(path) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="write fp16",
                                        disable=not progress) as bar:
        writer = SafetensorsWriter(tmp, layout)
        try:
            for key, (shape, dtype) in layout.items():
                tensor = torch.empty(shape, dtype=dtype)
                rows = tensor.view(shape[0], -1)
                step = max(1, 2**26 // max(1, rows.shape[1]))
                for start in range(0, rows.shape[0], step):
                    chunk = rows[start:start + step]
                    chunk.copy_(torch.randn(chunk.shape, generator=g))
                writer.write(key, tensor)
                bar.update(tensor.numel() * 2)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    return os.path.getsize(path)


def job_write_random_checkpoint(spec: dict[str, Any]) -> dict[str, Any]:
    import time

    from cpm_live.models import CPMBeeConfig

    config = CPMBeeConfig(**spec["config"])
    start = time.perf_counter()
    size = write_random_checkpoint(config, spec["path"], spec.get("seed", 0), spec.get("progress", False))
    return {"bytes": size, "seconds": time.perf_counter() - start, "peak_rss_bytes": bc.rss_bytes()[1]}


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def run_workers(workdir: str, dim: int = 4096, dim_ff: int = 10240, layers: int = 3,
                worker_counts: tuple[int, ...] = (1, 2), reps: int = 2, log=print) -> dict[str, Any]:
    """``quantize_state_dict`` at 1 and N workers on one checkpoint, side by side, same output bytes.

    The checkpoint has CPM-Bee-10B's projection shapes (default 3 layers: 1.08 GiB of fp16 .safetensors,
    vocabulary 1024). Runs alternate (1, 2, 2, 1, ...), each in a fresh process, and the speed-up is
    the median of the per-round ratios (a round is one run of each count), which survives the machine
    slowing down between rounds.
    """
    import time

    config = {"vocab_size": 1024, "dim_model": dim, "dim_ff": dim_ff, "num_layers": layers,
              "num_heads": max(1, dim // 128), "dim_head": 128, "half": True}
    src = os.path.join(workdir, "workers-fp16.safetensors")
    written = bc.run_isolated(job_write_random_checkpoint, {"config": config, "path": src})
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in worker_counts}
    digests = set()
    for rep in range(reps):
        order = list(worker_counts) if rep % 2 == 0 else list(reversed(worker_counts))
        for n in order:
            dst = os.path.join(workdir, f"workers-{n}.safetensors")
            result = bc.run_isolated(job_quantize, {"input": src, "output": dst, "device": "cpu", "workers": n})
            result["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            result["finished"] = time.strftime("%H:%M:%S")
            digests.add(sha256(dst))
            Path(dst).unlink()
            runs[n].append(result)
            log(f"  quantize {written['bytes'] / 2**30:.2f} GiB, {n} worker(s): {result['throughput_mb_s']:.1f} MB/s, "
                f"peak +{result['peak_above_baseline_bytes'] / bc.MIB:.0f} MiB, load {result['load_average_1m']}")
    Path(src).unlink()
    base = worker_counts[0]
    return {
        "config": config, "input_bytes": written["bytes"], "input_gib": written["bytes"] / 2**30,
        "cpu_count": os.cpu_count(), "runs": {str(n): r for n, r in runs.items()},
        "mb_per_s_median": {str(n): bc.median([r["throughput_mb_s"] for r in rs]) for n, rs in runs.items()},
        "speedup_over_1": {str(n): bc.paired_ratio([r["throughput_mb_s"] for r in runs[n]],
                                                   [r["throughput_mb_s"] for r in runs[base]])
                           for n in worker_counts},
        "identical_bytes": len(digests) == 1,
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run_streaming(workdir: str, dim: int, layer_counts: list[int], formats: list[str], threads: int,
                  device: str = "cpu", log=print) -> dict[str, Any]:
    """quantize_state_dict on growing checkpoints: MB/s of input and peak RSS, with the peak-vs-size slope."""
    out: dict[str, Any] = {"dim": dim, "layers": layer_counts, "device": device, "formats": {}}
    for fmt in formats:
        rows = []
        for layers in layer_counts:
            src = os.path.join(workdir, f"synthetic-d{dim}-l{layers}.{fmt}")
            dst = os.path.join(workdir, f"synthetic-d{dim}-l{layers}-int4.safetensors")
            written = bc.run_isolated(job_write_checkpoint, {"dim": dim, "layers": layers, "path": src})
            result = bc.run_isolated(job_quantize, {"input": src, "output": dst, "threads": threads,
                                                       "device": device})
            result.update(layers=layers, largest_tensor_bytes=written["largest_tensor_bytes"])
            rows.append(result)
            log(f"  quantize {fmt} {result['input_bytes'] / 1e6:.0f} MB: {result['throughput_mb_s']:.1f} MB/s, "
                f"peak +{result['peak_above_baseline_bytes'] / bc.MIB:.0f} MiB")
            for path in (src, dst):
                Path(path).unlink()
        xs = [r["input_bytes"] / bc.MIB for r in rows]
        ys = [r["peak_above_baseline_bytes"] / bc.MIB for r in rows]
        out["formats"][fmt] = {
            "runs": rows,
            "peak_slope_mib_per_input_mib": _slope(xs, ys),
            "throughput_mb_s_median": bc.median([r["throughput_mb_s"] for r in rows]),
            "output_over_input": rows[-1]["output_bytes"] / rows[-1]["input_bytes"],
        }
    return out


def run_compression(workdir: str, bpp_shapes: list[tuple[int, int]],
                    logit_error: dict[str, int] | None = None) -> dict[str, Any]:
    """Bytes per parameter and checkpoint ratios (NF4 and int8); with ``logit_error`` (dim, layers,
    tokens) also the logits' quantization error of both against the fp32 model."""
    from cpm_live.models import CPMBeeConfig

    config_10b = CPMBeeConfig.from_json_file(CONFIG_DIR / "cpm-bee-10b.json")
    out = {
        "settings": SETTINGS,
        "linear_weights": bc.run_isolated(job_bytes_per_param, {"shapes": bpp_shapes}),
        "linear_weights_int8": bc.run_isolated(job_int8_bytes_per_param, {"shapes": bpp_shapes}),
        "tiny_checkpoint": bc.run_isolated(job_tiny_checkpoint, {"workdir": workdir}),
        "cpm_bee_10b_analytic": analytic_checkpoint_ratio(config_10b),
    }
    if logit_error is not None:
        out["logit_error"] = bc.run_isolated(job_logit_error, {**logit_error, "workdir": workdir})
    return out
