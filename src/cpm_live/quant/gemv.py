"""4-bit matmul for inference on few rows (decoding): the dense weight is never built.

Decoding one token reads every weight once, so a 4-bit model should be bound by reading a quarter of
a bf16 model's bytes; dequantizing each weight first (the training path, :mod:`cpm_live.quant.dequant`)
instead writes and reads the whole dense weight per call. Here, on CPU, without autograd and for at
most :data:`MAX_ROWS` rows (decoding, beam search, small batches; a longer prompt is faster through
the dequantize-then-matmul path, which it keeps), one of two kernels reads the packed weight directly:

- ``bnb_avx512bf16``: bitsandbytes' own CPU kernel (``gemv_4bit_inference_cpu_<type>_bf16``), for a
  bf16 compute dtype on CPUs with AVX512-BF16. It reads a tiled layout, which is derived from the
  stored one at first use and cached beside the layer (never saved; the checkpoint keeps
  bitsandbytes' own layout). Its inputs, levels and absmax are rounded to bf16.
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

# Rows up to which a kernel beats dequantize-then-matmul (the prompt of a generation has more).
# Measured by ``python benchmarks/bench_decode.py --sections rows`` (benchmarks/README.md).
MAX_ROWS = 32

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


def _stamp(*tensors: torch.Tensor | None) -> tuple:
    """Identity and in-place version of each tensor: changes whenever any of them is replaced or written."""
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


def _bnb_layout(packed: torch.Tensor, state: bnbF.QuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' tiled CPU layout of ``packed``, derived once and cached per layer weight.

    Its own converter (``_convert_weight_packed_for_cpu``) is given the exact fp32 absmax, so it does
    not undo the double quantization with its own kernel; it returns the bf16 absmax transposed."""
    stamp = _stamp(packed, state.absmax, state.state2.absmax if state.nested else None)
    cached = _BNB_LAYOUT.get(packed)
    if cached is not None and cached[0] == stamp:
        return cached[1], cached[2]
    plain = bnbF.QuantState(absmax=dequant.absmax_of(state), shape=state.shape, code=state.code,
                            blocksize=state.blocksize, quant_type=state.quant_type, dtype=torch.bfloat16)
    tiled, tiled_state = bnbF._convert_weight_packed_for_cpu(packed.detach().view(torch.uint8), plain)
    _BNB_LAYOUT[packed] = (stamp, tiled, tiled_state.absmax)
    return tiled, tiled_state.absmax


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
    return bool(bnbF.has_avx512bf16()) and release >= (0, 49) and hasattr(bnbF, "_convert_weight_packed_for_cpu") \
        and all(hasattr(bnb_native, f"gemv_4bit_inference_cpu_{t}_bf16") for t in ("nf4", "fp4"))


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
    name = None
    if _ENABLED and packed.device.type == "cpu" and 0 < rows <= MAX_ROWS:
        name = kernel_for(x.dtype, state)
    if name is None or not _passes_check(name, packed, state):
        return dequant.matmul_4bit(x, packed, state)
    with torch.profiler.record_function(PROFILER_LABEL):
        out = KERNELS[name](x.reshape(rows, dim_in), packed, state)
    return out.reshape(*x.shape[:-1], state.shape[0])
