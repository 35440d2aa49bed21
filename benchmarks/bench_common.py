"""Pieces every benchmark shares: the CPM-Bee-shaped model and batch, interleaved timing, peak memory.

Why the rules here: the benchmark machine is shared and noisy, so every comparison is measured
side by side in one process, repetitions of the compared variants are interleaved (A B C, B C A,
...), and we report medians plus the median of the per-repetition ratios (a paired ratio survives
slow drifts of the machine that shift both variants alike). Peak memory is a process-wide high-water
mark, so each configuration whose peak we report runs in a fresh process (see :func:`run_isolated`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cpm_live  # noqa: F401  first: its __init__ filters bnb's kernels-community notice before bnb loads
from cpm_live.data.tensors import IGNORE_INDEX, CPMBeeInputs, LabelledInputs
from cpm_live.training.loss import token_loss_sum

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Small vocabulary on purpose: in CPM-Bee-10B the embedding and logits are ~4% of a step's FLOPs; with
# 2-4 layers of d=256..1024 a real 86k vocabulary would dominate and hide the projections we compare.
BENCH_VOCAB = 1024
# Rows of 512 tokens: at d=512 attention is then ~17% of a layer's FLOPs (CPM-Bee-10B at 2048 tokens: ~9%),
# so the projections dominate as they do at 10B, and attention scores stay small enough for 2-4 layers.
ROW_LEN = 512
MIB = 2**20


def check_out(parser, out: str, inputs) -> None:
    """``--out`` is the benchmark's declared result file, replaced on every run, but never one of its
    ``inputs`` (by path, link or inode, or a file inside an input directory) nor a directory."""
    from cpm_live.errors import OutputError
    from cpm_live.outputs import check_output_file

    try:
        check_output_file(out, inputs, force=True, setting="--out")
    except OutputError as e:
        parser.error(str(e))


def quiet() -> None:
    """Silence peft's harmless layer-type notice (bnb's kernels-community notice: ``cpm_live.__init__``)."""
    warnings.filterwarnings("ignore", message=".*Unsupported layer type.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU has (Linux ``/proc/cpuinfo``; empty elsewhere): the flags
    that decide bitsandbytes' CPU kernels and whether bf16 is native."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in flags]


def environment(device: str, threads: int) -> dict[str, Any]:
    import bitsandbytes
    import peft

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": threads, "device": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cpu_flags": cpu_flags(),
    }
    if hasattr(os, "getloadavg"):  # other processes on the machine, for judging the noise
        env["load_average_1m_at_start"] = os.getloadavg()[0]
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def model_config(dim: int, layers: int, *, int4: bool = False, int8: bool = False, compute_dtype: str = "float32",
                 precision: str = "fp32", vocab: int = BENCH_VOCAB):
    """A CPM-Bee-10B-proportioned config: dim_ff = 2.5 d, heads of 64 (10B: 4096 / 10240 / 32x128)."""
    from cpm_live.models import CPMBeeConfig

    return CPMBeeConfig(vocab_size=vocab, dim_model=dim, dim_ff=dim * 5 // 2, num_layers=layers,
                        num_heads=max(1, dim // 64), dim_head=64, precision=precision, int4=int4, int8=int8,
                        int4_compute_dtype=compute_dtype)


def cast_floating(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters/buffers to ``dtype``; a Linear4bit keeps its 4-bit state and only changes
    the dense dtype it stands for (what its dequantized weight is produced in).

    ``model.to(bf16)`` would also cast the 4-bit layers' fp32 absmax statistics and lose precision.
    """
    from cpm_live.layers import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.dtype = dtype
            continue
        for tensors in (module._parameters, module._buffers):  # this module's own, not its children's
            for t in tensors.values():
                if t is not None and t.is_floating_point():
                    t.data = t.data.to(dtype)
    return model


def make_batch(rows: int, seqlen: int, vocab: int, device: str, seed: int = 0) -> tuple[CPMBeeInputs, torch.Tensor]:
    """Random packed rows in CPM-Bee's training layout: each row is one sample whose first 3/4 is
    context (segment 0) and whose last 1/4 is the predicted answer (segment 1). Returns the model
    inputs and the targets (``IGNORE_INDEX`` on context tokens)."""
    g = torch.Generator().manual_seed(seed)
    i32 = torch.int32
    tail = max(1, seqlen // 4)
    context = torch.ones(rows, seqlen, dtype=torch.bool)
    context[:, -tail:] = False
    batch = CPMBeeInputs(
        input=torch.randint(11, vocab, (rows, seqlen), generator=g, dtype=i32),
        input_sub=torch.zeros(rows, seqlen, dtype=i32),
        length=torch.full((rows,), seqlen, dtype=i32),
        context=context,
        sample_ids=torch.zeros(rows, seqlen, dtype=i32),
        num_segments=torch.full((rows, seqlen), 2, dtype=i32),
        segment=(~context).to(i32),
        segment_rel_offset=torch.zeros(rows, seqlen, dtype=i32),
        segment_rel=torch.tensor([[0, 2, 3, 0]] * rows, dtype=i32),  # 2x2 relation buckets, 0 on the diagonal
        span=torch.zeros(rows, seqlen, dtype=i32),
        ext_table_ids=torch.tensor([0], dtype=i32),
        ext_table_sub=torch.tensor([0], dtype=i32),
    )
    target = torch.randint(0, vocab, (rows, seqlen), generator=g)
    target[context] = IGNORE_INDEX
    return batch.to(device), target.to(device)


def batch_shape(tokens: int, row_len: int = ROW_LEN) -> tuple[int, int]:
    """(rows, seqlen) for a micro-batch of ``tokens`` tokens in rows of at most ``row_len``."""
    seqlen = min(tokens, row_len)
    return max(1, tokens // seqlen), seqlen


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: CPMBeeInputs, target: torch.Tensor
               ) -> float:
    """forward + loss + backward + AdamW step, as the training loop does it: its own loss function
    (``training.loss.token_loss_sum``), divided by the labelled token count."""
    labelled = LabelledInputs(batch, target)
    loss = token_loss_sum(model, labelled) / max(labelled.num_labels, 1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, device: str = "cpu", warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds of each call, repetitions interleaved and the order rotated every repetition."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-repetition ratios num[i] / den[i] (both measured in the same repetition)."""
    return median([a / b for a, b in zip(num, den)])


def rss_bytes() -> tuple[int, int]:
    """(current RSS, RSS high-water mark) of this process, from /proc (Linux) or getrusage."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
        return peak, peak


def reset_peak_rss() -> bool:
    """Restart this process's RSS high-water mark at its current RSS (Linux >= 4.0; False elsewhere).

    Lets a job first run a tiny warm-up (lazy library initialisation, first-touch of kernel code) and
    then measure only what the configuration itself adds.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def pin_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Serve every allocation above ``threshold`` bytes by mmap, so freeing it returns it to the OS.

    glibc otherwise raises its mmap threshold after the first large free, and later transient
    tensors (e.g. each dequantized 4-bit weight) land in the heap, where freed space stays resident:
    RSS then measures fragmentation, not live tensors. Pinning the threshold (mallopt) disables that
    adjustment; it slows allocation, so only memory jobs use it. False where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


# Imported once by the fork server, so each isolated job starts in a few milliseconds instead of
# re-importing torch + bitsandbytes + peft (20+ s on a loaded 2-core machine).
# cpm_live before bitsandbytes: its __init__ filters bnb's kernels-community notice, logged at bnb's import.
PRELOAD = ["torch", "cpm_live", "bitsandbytes", "peft", "safetensors.torch", "cpm_live.models", "cpm_live.lora",
           "cpm_live.convert.compress", "bench_common"]
_context = None


def _mp_context():
    global _context
    if _context is None:
        if torch.cuda.is_available():
            # Importing bitsandbytes initialises CUDA, and a process forked after that cannot use it
            # ("Cannot re-initialize CUDA in forked subprocess", seen on an H100): start each job fresh.
            _context = multiprocessing.get_context("spawn")
        else:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(fn: Callable[[dict[str, Any]], Any], spec: dict[str, Any], conn) -> None:
    quiet()
    torch.set_num_threads(int(spec.get("threads", 1)))
    try:
        conn.send(("ok", fn(spec)))
    except BaseException:  # the parent re-raises it with the traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn: Callable[[dict[str, Any]], Any], spec: dict[str, Any], timeout: float = 3600.0) -> Any:
    """``fn(spec)`` in a fresh process forked from a server that has only imported the libraries.

    A fresh process has a fresh RSS high-water mark and no allocator state left by earlier jobs, so
    each measured peak belongs to one configuration. ``fn`` must be a module-level function.
    """
    ctx = _mp_context()
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(fn, spec, sender))
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"benchmark job {fn.__module__}.{fn.__name__}({spec}) ran over {timeout:.0f} s")
        status, payload = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"benchmark job {fn.__module__}.{fn.__name__}({spec}) died before reporting "
                           f"(exit code {process.exitcode}; a negative code is the signal, e.g. -9 when "
                           "killed for memory; its stderr is above)") from None
    finally:
        if process.is_alive():
            process.join(timeout=60)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"benchmark job {fn.__module__}.{fn.__name__}({spec}) failed:\n{payload}")
    return payload
