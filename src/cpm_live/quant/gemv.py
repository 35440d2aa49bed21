"""4-bit matmul for inference on few rows (decoding): the dense weight is never built.

Decoding one token reads every weight once, so a 4-bit model should be bound by reading a quarter of
a bf16 model's bytes; dequantizing each weight first (the training path, :mod:`cpm_live.quant.dequant`)
instead writes and reads the whole dense weight per call. Here, on CPU, without autograd and for at
most :data:`MAX_ROWS` rows for its kernel (decoding, beam search, small batches; a longer prompt is faster through
the dequantize-then-matmul path, which it keeps), one of two kernels reads the packed weight directly:

- ``bnb_avx512bf16``: bitsandbytes' own CPU kernel (``gemv_4bit_inference_cpu_<type>_bf16``), for a
  bf16 compute dtype on CPUs with AVX512-BF16. It reads a tiled layout, which is derived from the
  stored one at first use (:func:`tile_for_bnb`) and cached beside the layer: never saved (the
  checkpoint keeps bitsandbytes' own layout), but it doubles the memory of the 4-bit weights while
  the model decodes. Its inputs, levels and absmax are rounded to bf16.
- ``avx2``: this package's kernel (``gemv_4bit.c``, AVX2 + FMA), for every other dtype on x86 CPUs
  with AVX2: it reads the stored layout as is, computes in fp32 and differs from the exact product
  only by rounding order.

A kernel is trusted for a case (kernel, weight shape, blocksize, quant type, double quant) only after
its output on the first weight of that case in this process stayed within :data:`TOLERANCE` of the
exact product (``|y - y_exact| <= tol * (|x| @ |W|.T)`` elementwise) for 1 to 7 rows; otherwise the
case keeps the dequantize-then-matmul path, with a warning. ``kernels_enabled(False)`` turns the
kernels off (to compare against that path).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import warnings
from collections.abc import Callable, Iterator

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.cextension import lib as bnb_native
from torch.utils.weak import WeakIdKeyDictionary

from cpm_live.quant import dequant, native

# Rows up to which each kernel beats dequantize-then-matmul (a generation's prompt has more), measured
# by ``python benchmarks/bench_decode.py --sections rows`` at 10B shapes on both CPU kinds at hand
# (benchmarks/README.md). bnb_avx512bf16 (Intel AVX512-BF16): wins to 32 rows, ties at 64. avx2: on an
# AMD AVX2 CPU it still won at 32 rows (0.66-0.82x) but on the Intel one it lost from 24 (1.1-1.7x),
# so 16, where it wins on both.
MAX_ROWS = {"avx2": 16, "bnb_avx512bf16": 32}

# Largest error allowed against the exact product, as a fraction of sum_k |x_k| |w_k| per output.
# avx2: fp32 with blocked sums, a few dozen roundings at most (~3e-6), so 1e-5. bnb_avx512bf16: x,
# level and absmax each rounded to bf16 (2^-9 relative) and the output too: at most ~7.8e-3, so 1.6e-2.
TOLERANCE = {"avx2": 1e-5, "bnb_avx512bf16": 1.6e-2}

PROFILER_LABEL = "cpm_live::gemv_4bit"  # torch.profiler range around a kernel call

# The first-use check runs 1..CHECK_ROWS rows: every tile of both kernels (1 to 4 rows, then 4 + 1..3).
CHECK_ROWS = 7

_ENABLED = True


@contextlib.contextmanager
def kernels_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, 4-bit inference uses the kernels (True, the default) or always dequantizes
    (False: the path training uses; benchmarks and tests compare the two)."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous


def _avx2(x: torch.Tensor, packed: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
    """``x [rows, K] @ deq(W).T`` through ``gemv_4bit.c``, fp32 inside, returned in ``x``'s dtype."""
    rows, (dim_out, dim_in) = x.shape[0], state.shape
    blocks = dim_out * dim_in // state.blocksize
    x32 = x.float().contiguous()
    out = torch.empty(rows, dim_out, dtype=torch.float32)
    code = state.code.float().contiguous()
    packed = packed.contiguous().view(torch.uint8)
    if state.nested:
        nested = state.state2
        qabsmax, nested_code = state.absmax.contiguous(), nested.code.float().contiguous()
        nested_absmax = nested.absmax.float().contiguous()
        sizes = (qabsmax.numel() >= blocks and qabsmax.dtype == torch.uint8 and nested_code.numel() == 256
                 and nested_absmax.numel() >= -(-blocks // nested.blocksize))
        absmax, nested_args = None, (qabsmax.data_ptr(), nested_code.data_ptr(), nested_absmax.data_ptr(),
                                     nested.blocksize, float(state.offset))
    else:
        absmax = state.absmax.float().contiguous()
        sizes = absmax.numel() >= blocks
        nested_args = (None, None, None, 1, 0.0)
    # The kernel trusts these sizes; a mismatch would read past the tensors.
    if not (sizes and code.numel() == 16 and packed.numel() >= dim_out * dim_in // 2):
        raise ValueError(f"4-bit state does not match the weight shape {list(state.shape)}")
    status = native.library().cpm_gemv_4bit(
        x32.data_ptr(), rows, x32.stride(0), packed.data_ptr(), dim_out, dim_in, code.data_ptr(),
        None if absmax is None else absmax.data_ptr(), *nested_args, state.blocksize, out.data_ptr(),
        out.stride(0), torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"gemv_4bit.c could not allocate its scratch for {rows} rows of {dim_in}")
    return out.to(x.dtype)


# packed weight -> (what it was derived from, bnb's tiled weight [N, K/2], bf16 absmax [K/blocksize, N])
_BNB_LAYOUT = WeakIdKeyDictionary()  # keyed by identity: tensors compare elementwise

# Output rows per tile of bitsandbytes' CPU layout (``block_n`` of its converter).
BNB_TILE_ROWS = 32


def _stamp(*tensors: torch.Tensor | None) -> tuple:
    """Identity and in-place version of each tensor: changes whenever any of them is replaced or written."""
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


def tile_for_bnb(packed: torch.Tensor, dim_out: int, dim_in: int) -> torch.Tensor:
    """bitsandbytes' tiled CPU layout ``[dim_out, dim_in / 2]`` of a weight stored in its plain layout.

    Stored: byte ``(n, k/2)`` holds codes ``(n, k)`` (high nibble) and ``(n, k+1)`` (low). Tiled: per
    32 output rows and per pair of inputs ``(k, k+1)``, 32 bytes ``(row r, input k+j)`` at ``2r + j``
    for ``r < 16``, each holding row ``r``'s code (low nibble) and row ``r + 16``'s (high). This is
    what ``_convert_weight_packed_for_cpu`` computes, in two passes over bytes instead of through int32
    (at 10B it took 26 s of the first decoded token; this takes about 2 s)."""
    halves = packed.view(torch.uint8).reshape(dim_out // BNB_TILE_ROWS, 2, BNB_TILE_ROWS // 2, dim_in // 2)
    low_rows, high_rows = halves[:, 0], halves[:, 1]  # [tiles, 16, K/2]: rows r and r + 16 of each tile
    tiled = torch.empty(dim_out // BNB_TILE_ROWS, dim_in // 2, BNB_TILE_ROWS // 2, 2, dtype=torch.uint8)
    by_row = tiled.permute(0, 2, 1, 3)  # [tiles, 16, K/2, 2]: write each row's pair in place
    torch.bitwise_or(high_rows & 0xF0, low_rows >> 4, out=by_row[..., 0])  # input k
    torch.bitwise_or(high_rows << 4, low_rows & 0x0F, out=by_row[..., 1])  # input k + 1
    return tiled.view(dim_out, dim_in // 2)


def _bnb_layout(packed: torch.Tensor, state: bnbF.QuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' tiled CPU layout of ``packed`` and its absmax (exact, then bf16, ``[K/blocksize, N]``),
    derived once and cached per layer weight."""
    stamp = _stamp(packed, state.absmax, state.state2.absmax if state.nested else None)
    cached = _BNB_LAYOUT.get(packed)
    if cached is not None and cached[0] == stamp:
        return cached[1], cached[2]
    dim_out, dim_in = state.shape
    tiled = tile_for_bnb(packed.detach(), dim_out, dim_in)
    absmax = dequant.absmax_of(state).reshape(dim_out, dim_in // state.blocksize).T.to(torch.bfloat16).contiguous()
    _BNB_LAYOUT[packed] = (stamp, tiled, absmax)
    return tiled, absmax


def _bnb_avx512bf16(x: torch.Tensor, packed: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
    """``x [rows, K] @ deq(W).T`` through bitsandbytes' AVX512-BF16 kernel, in ``x``'s dtype."""
    rows, (dim_out, dim_in) = x.shape[0], state.shape
    tiled, absmax = _bnb_layout(packed, state)
    xb = x.to(torch.bfloat16).contiguous()
    out = torch.empty(rows, dim_out, dtype=torch.bfloat16)
    kernel = getattr(bnb_native, f"gemv_4bit_inference_cpu_{state.quant_type}_bf16")
    kernel(ctypes.c_int64(rows), ctypes.c_int64(dim_out), ctypes.c_int64(dim_in), ctypes.c_void_p(xb.data_ptr()),
           ctypes.c_void_p(tiled.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
           ctypes.c_int64(state.blocksize), ctypes.c_int64(xb.stride(0)), ctypes.c_int64(out.stride(0)))
    return out.to(x.dtype)


@functools.cache
def bnb_kernel_available() -> bool:
    """bitsandbytes' AVX512-BF16 kernel runs on this CPU, in a release whose tiled layout and call this
    module follows (0.49 added it; read in 0.50's ``csrc/cpu_ops.cpp``, unchanged since 0.49)."""
    release = tuple(int(part) for part in bnb.__version__.split(".")[:2] if part.isdigit())
    return bool(bnbF.has_avx512bf16()) and release >= (0, 49) and all(
        hasattr(bnb_native, f"gemv_4bit_inference_cpu_{t}_bf16") for t in ("nf4", "fp4"))


Kernel = Callable[[torch.Tensor, torch.Tensor, bnbF.QuantState], torch.Tensor]
KERNELS: dict[str, Kernel] = {"avx2": _avx2, "bnb_avx512bf16": _bnb_avx512bf16}


def kernel_for(dtype: torch.dtype, state: bnbF.QuantState) -> str | None:
    """The kernel that would serve a weight of ``state`` for inputs of ``dtype``, before any check.

    Both need rows that are whole blocks (each output then owns its blocks) of a multiple of 32 values;
    bitsandbytes' kernel also needs ``dim_out % 32 == 0`` (its tiles; other sizes abort the process)."""
    if len(state.shape) != 2 or state.quant_type not in ("nf4", "fp4"):
        return None
    dim_out, dim_in = state.shape
    if dim_in % state.blocksize or state.blocksize % 32:
        return None
    if dtype == torch.bfloat16 and dim_out % 32 == 0 and bnb_kernel_available():
        return "bnb_avx512bf16"
    if native.library() is not None:
        return "avx2"
    return None


# (kernel, shape, blocksize, quant type, double quant) -> whether the kernel passed its check
_CHECKED: dict[tuple, bool] = {}


def _passes_check(name: str, packed: torch.Tensor, state: bnbF.QuantState) -> bool:
    key = (name, tuple(state.shape), state.blocksize, state.quant_type, state.nested)
    verdict = _CHECKED.get(key)
    if verdict is None:
        dim_in = state.shape[1]
        x = torch.randn(CHECK_ROWS, dim_in, generator=torch.Generator().manual_seed(0))
        weight = dequant.dequantize_cpu(packed, dequant.absmax_of(state), state.code, state.blocksize,
                                        tuple(state.shape), torch.float32)
        exact = x.double() @ weight.double().T
        bound = TOLERANCE[name] * (x.double().abs() @ weight.double().abs().T)
        verdict = all(bool(((KERNELS[name](x[:rows], packed, state).double() - exact[:rows]).abs()
                            <= bound[:rows]).all()) for rows in range(1, CHECK_ROWS + 1))
        if not verdict:
            warnings.warn(f"cpm_live: the {name} 4-bit kernel disagreed with the exact product for a "
                          f"{list(state.shape)} weight ({state.quant_type}, blocksize {state.blocksize}); such "
                          f"weights use the dequantize-then-matmul path", RuntimeWarning, stacklevel=4)
        _CHECKED[key] = verdict
    return verdict


def checked_cases() -> list[dict]:
    """The first-use checks this process ran and their verdicts (for benchmark and bug reports)."""
    return [{"kernel": name, "shape": list(shape), "blocksize": blocksize, "quant_type": quant_type,
             "double_quant": nested, "passed": passed}
            for (name, shape, blocksize, quant_type, nested), passed in _CHECKED.items()]


def matmul_4bit_inference(x: torch.Tensor, packed: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
    """``x @ deq(W).T`` (in ``x``'s dtype) without autograd: a kernel for few rows on CPU, else the
    dequantize-then-matmul path of :func:`cpm_live.quant.dequant.matmul_4bit`."""
    if torch.is_grad_enabled():
        raise RuntimeError("matmul_4bit_inference runs without autograd; use dequant.matmul_4bit to train")
    dim_in = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    name = kernel_for(x.dtype, state) if _ENABLED and packed.device.type == "cpu" and rows > 0 else None
    if name is None or rows > MAX_ROWS[name] or not _passes_check(name, packed, state):
        return dequant.matmul_4bit(x, packed, state)
    with torch.profiler.record_function(PROFILER_LABEL):
        out = KERNELS[name](x.reshape(rows, dim_in), packed, state)
    return out.reshape(*x.shape[:-1], state.shape[0])
