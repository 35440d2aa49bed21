"""4-bit dequantization and matmul that are exact on every CPU; bitsandbytes' own kernels elsewhere.

Why not bitsandbytes on CPU: its native CPU ``dequantize_4bit`` (0.50.2, the AVX-512 build, e.g.
AMD Zen 4 and Intel Xeon with AVX-512/AMX) returns wrong values whenever a row's length is not a
multiple of the blocksize (a block then spans two rows); see docs/bitsandbytes-cpu-dequantize-bug.md.
``matmul_4bit`` on CPU is "dequantize, then ``F.linear``" through that kernel, so forward, input
gradient and ``dequantize()`` were all wrong for such shapes. Here the dequantization is plain torch
(a byte -> two levels table lookup, then one fp32 multiply by the block's absmax), which gives
bitsandbytes' documented values bit for bit on any CPU and any shape. The native kernel is 4-7x
faster, so it is still used where it is right: for weights whose rows are whole blocks (every real
CPM-Bee projection), once its output for that shape and dtype has equalled the exact one in this
process (:func:`_native_is_exact`). CUDA keeps bitsandbytes' kernels.
"""

from __future__ import annotations

import ctypes
import math
import threading

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
import torch.nn.functional as F
from bitsandbytes.cextension import lib as bnb_native

PROFILER_LABEL = "cpm_live::dequantize_4bit"  # torch.profiler range around the CPU dequantization


class _Scratch(threading.local):
    """Per-thread CPU buffers reused by every dequantization (index, levels, and the matmul's weight).

    A fresh multi-MiB tensor per call is a fresh mmap whose pages the kernel faults in and zeroes
    first: that cost about as much as the dequantization itself (the bf16 QLoRA step times before and
    after are in docs/architecture.md; ``python benchmarks/run.py --quick --sections finetune``
    measures them). The buffers grow to the largest layer and stay (one dense bf16 weight plus 1.5x
    that in fp32 levels and indices).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            # A normal tensor even when first needed under torch.inference_mode (generation): an
            # inference tensor could not be written outside it later (training after evaluation).
            with torch.inference_mode(False):
                buffer = self.buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


_SCRATCH = _Scratch()


def _levels_by_byte(code: torch.Tensor) -> torch.Tensor:
    """``[256]`` int64 whose bytes are the two fp32 levels a packed byte stands for (high nibble first).

    One 8-byte lookup per packed byte: torch's 1-D ``index_select`` is faster on CPU than gathering
    rows of a ``[256, 2]`` fp32 table (``python benchmarks/run.py --quick --sections layers`` times
    the dequantization).
    """
    code = code.float()
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1).view(torch.int64).view(-1)


def absmax_of(state: bnbF.QuantState) -> torch.Tensor:
    """The fp32 per-block absmax ``[blocks]``, undoing double quantization as bitsandbytes does.

    Nested: ``nested_code[absmax_u8[i]] * nested_absmax[i // 256]`` in fp32, then ``+ offset``.
    """
    if not state.nested:
        return state.absmax.float()
    nested = state.state2
    blocks = state.absmax.numel()
    values = nested.code.float().index_select(0, state.absmax.reshape(-1).int())
    scale = nested.absmax.float().repeat_interleave(nested.blocksize)[:blocks]
    return values * scale + state.offset.float()


def dequantize_cpu(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                   shape: tuple[int, ...], dtype: torch.dtype, transient: bool = False) -> torch.Tensor:
    """Dense ``shape`` tensor in ``dtype`` from packed codes: ``code[nibble] * absmax[i // blocksize]``.

    Value ``i`` of the row-major weight is nibble ``i`` of the packed bytes (high nibble first); blocks
    run over the flattened weight, so a block may span rows. Computed in fp32, rounded once: for a
    16-bit ``dtype`` the multiply writes the rounded product straight into the result (one pass over
    the levels instead of multiply-then-cast, faster at bf16 QLoRA's layer sizes).

    ``transient``: the result (and the index and level arrays) live in per-thread scratch buffers that
    the next transient call on this thread overwrites (the matmul's weight, used once and dropped);
    otherwise everything is allocated for this call and only the result is kept.
    """
    n = math.prod(shape)
    with torch.profiler.record_function(PROFILER_LABEL):
        flat = packed.reshape(-1).view(torch.uint8)
        buffer = _SCRATCH.get if transient else (lambda name, numel, dtype: torch.empty(numel, dtype=dtype))
        index = buffer("index", flat.numel(), torch.int32).copy_(flat)
        pairs = torch.index_select(_levels_by_byte(code), 0, index, out=buffer("levels", flat.numel(), torch.int64))
        values = pairs.view(torch.float32)[:n]  # [n]; an odd n leaves a padding nibble in the last byte
        out = buffer("weight", n, dtype)
        full = n - n % blocksize
        torch.mul(values[:full].view(-1, blocksize), absmax[:full // blocksize, None],
                  out=out[:full].view(-1, blocksize))
        if full < n:
            torch.mul(values[full:], absmax[full // blocksize], out=out[full:])
        return out.view(shape)


def dequantize_4bit(packed: torch.Tensor, state: bnbF.QuantState, dtype: torch.dtype | None = None,
                    transient: bool = False) -> torch.Tensor:
    """The dense weight of ``packed`` in ``dtype`` (default ``state.dtype``): exact torch on CPU, bnb elsewhere.

    ``transient`` (CPU): reuse a per-thread buffer that the next transient call overwrites (see
    :func:`dequantize_cpu`); only for a weight that is dropped before the next dequantization."""
    dtype = dtype or state.dtype
    if packed.device.type != "cpu":
        if dtype != state.dtype:
            state = bnbF.QuantState(absmax=state.absmax, shape=state.shape, code=state.code,
                                    blocksize=state.blocksize, quant_type=state.quant_type, dtype=dtype,
                                    offset=state.offset, state2=state.state2)
        return bnbF.dequantize_4bit(packed, state)
    return _dequantize_cpu(packed, absmax_of(state), state, dtype, transient)


def _dequantize_cpu(packed: torch.Tensor, absmax: torch.Tensor, state: bnbF.QuantState, dtype: torch.dtype,
                    transient: bool) -> torch.Tensor:
    """CPU dequantization given the fp32 absmax: bitsandbytes' native kernel where it was checked
    exact for this case (:func:`_native_is_exact`), else :func:`dequantize_cpu`."""
    if _native_is_exact(packed, absmax, state, dtype):
        return _native(packed, absmax, state, dtype, transient)
    return dequantize_cpu(packed, absmax, state.code, state.blocksize, tuple(state.shape), dtype, transient)


_C_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _native(packed: torch.Tensor, absmax: torch.Tensor, state: bnbF.QuantState, dtype: torch.dtype,
            transient: bool = False) -> torch.Tensor:
    """bitsandbytes' own CPU dequantization kernel, ``cdequantize_blockwise_cpu_<type>_<dtype>``, the
    one its ``dequantize_4bit`` op calls for these shapes, called directly so that a transient result
    can go into the per-thread scratch buffer: a fresh output per call (and the op's dispatch) cost
    step time (``python benchmarks/run.py --quick --sections finetune``)."""
    shape = tuple(state.shape)
    out = _SCRATCH.get("weight", math.prod(shape), dtype).view(shape) if transient else torch.empty(shape, dtype=dtype)
    kernel = getattr(bnb_native, f"cdequantize_blockwise_cpu_{state.quant_type}_{_C_DTYPES[dtype]}")
    packed, absmax = packed.contiguous().view(torch.uint8), absmax.float().contiguous()
    kernel(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
           ctypes.c_longlong(state.blocksize), ctypes.c_longlong(shape[0]), ctypes.c_longlong(shape[1]))
    return out


# (shape, blocksize, quant type, dtype) -> whether bitsandbytes' native CPU kernel gave exactly
# dequantize_cpu's values the first time this process met that case.
_NATIVE_EXACT: dict[tuple, bool] = {}


def _native_is_exact(packed: torch.Tensor, absmax: torch.Tensor, state: bnbF.QuantState,
                     dtype: torch.dtype) -> bool:
    """Whether to use bitsandbytes' native CPU dequantization here: several times faster than
    :func:`dequantize_cpu`, but wrong on some CPUs when a block spans two rows. It is only considered
    when every row is whole blocks (and not at the blocksizes bnb sends to its slow fallback), and only
    trusted for a (shape, blocksize, quant type, dtype) case after its output equalled the exact one,
    bit for bit, on the first weight of that case in this process, on whatever CPU and kernel bnb
    picks here. The native kernel reads bnb's own levels for the quant type, which is what
    ``state.code`` holds (:func:`cpm_live.quant.format.validate` refuses any other table)."""
    shape = tuple(state.shape)
    key = (shape, state.blocksize, state.quant_type, dtype)
    verdict = _NATIVE_EXACT.get(key)
    if verdict is None:
        verdict = len(shape) == 2 and shape[1] % state.blocksize == 0 and shape[1] % 2 == 0 \
            and state.blocksize < 2048 and state.quant_type in ("nf4", "fp4") and dtype in _C_DTYPES
        if verdict:
            exact = dequantize_cpu(packed, absmax, state.code, state.blocksize, shape, dtype)
            try:
                verdict = torch.equal(_native(packed, absmax, state, dtype), exact)
            except (AttributeError, RuntimeError, OSError):  # a bnb build without this CPU kernel
                verdict = False
        _NATIVE_EXACT[key] = verdict
    return verdict


class _DequantizedLinear(torch.autograd.Function):
    """``x @ deq(W).T`` on CPU, keeping only the packed weight for backward (as bnb's ``MatMul4Bit``).

    Both directions use the weight dequantized in ``x``'s dtype, so the input gradient is the exact
    gradient of the forward (bnb's backward uses the weight rounded to ``state.dtype`` first).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
        absmax = absmax_of(state)
        # Kept as attributes, as bnb's MatMul4Bit keeps them; the fp32 absmax (1/16 of the bf16
        # weight's bytes) is kept too, so backward does not undo the double quantization again.
        ctx.packed, ctx.absmax, ctx.state = packed, absmax, state
        return F.linear(x, _dequantize_cpu(packed, absmax, state, x.dtype, transient=True))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ _dequantize_cpu(ctx.packed, ctx.absmax, ctx.state, grad.dtype, transient=True), None, None


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
    """``x @ deq(W).T`` for ``W = state.shape = [dim_out, dim_in]``; gradients reach ``x`` only."""
    if packed.device.type != "cpu":
        return bnb.matmul_4bit(x, packed.t(), quant_state=state)
    return _DequantizedLinear.apply(x, packed, state)
