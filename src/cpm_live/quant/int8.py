"""The LLM.int8 format of one weight and its matmul, through bitsandbytes' int8 ops.

Format (bitsandbytes' ``Linear8bitLt`` state dict, so bitsandbytes reads the checkpoint)::

    <prefix>weight          int8 [dim_out, dim_in]   round(W * 127 / SCB[row])
    <prefix>SCB             fp32 [dim_out]           per-row absmax of W (W rounded to fp16 first, as bnb)
    <prefix>weight_format   uint8 []                 0 = row-major (the only layout bnb still writes)

Matmul (LLM.int8, Dettmers et al. 2022): the input is cast to fp16 and quantized row-wise to int8;
input columns holding any ``|x| >= threshold`` are zeroed there and multiplied in fp16 against the
dequantized weight columns instead; int32 products are scaled by ``SCA * SCB / 127^2`` and the
result is cast to the input's dtype. Backward gives the input gradient only, ``grad @ deq(W)`` in the
input's dtype (bnb's ``MatMul8bitLt`` does it in the fp16 of its output), and keeps nothing but the
int8 weight and its scales. So an fp32 or bf16 model's gradients never pass through fp16, where small
ones underflow and where a CPU without fp16 GEMMs computes far slower (benchmarks/README.md, int8;
``python benchmarks/run.py --quick --sections finetune``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
import bitsandbytes.functional as bnbF
import torch

from cpm_live.quant.format import QuantFormatError, has_format

FORMAT_NAME = "cpm_live.int8"
FORMAT_VERSION = 1
SUFFIXES = ("SCB", "weight_format")  # entries beside ``<prefix>weight``
COMPUTE_DTYPE = torch.float16


def module_prefix(key: str) -> str:
    """``a.b.weight`` -> ``a.b.`` (the keys of one int8 weight share it)."""
    if not key.endswith("weight"):
        raise ValueError(f"{key} is not a weight key")
    return key[:-len("weight")]


def entry_keys(key: str) -> list[str]:
    prefix = module_prefix(key)
    return [key] + [prefix + s for s in SUFFIXES]


def tensor_layout(shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Stored shape and dtype of each entry of a ``shape`` weight, keyed by suffix (``""`` = weight)."""
    return {"": (tuple(shape), torch.int8), "SCB": ((shape[0],), torch.float32), "weight_format": ((), torch.uint8)}


@torch.no_grad()
def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB int8 [out, in], SCB fp32 [out])`` of a dense 2-D weight, bit-identical to bitsandbytes'
    ``Int8Params`` (which rounds the weight to fp16, then calls ``int8_vectorwise_quant``)."""
    if weight.dim() != 2:
        raise ValueError(f"int8 weights are 2-D [dim_out, dim_in], got shape {list(weight.shape)}")
    cb, scb, _ = bnbF.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return cb, scb.float()


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[out, in]`` weight ``CB * SCB / 127``, computed in fp32 and cast once to ``dtype``."""
    return (cb.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype)


def quantize_entries(key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three state-dict entries of ``weight`` stored under ``key``."""
    cb, scb = quantize(weight)
    return {key: cb, **side_entries(key, scb)}


def side_entries(key: str, scb: torch.Tensor) -> dict[str, torch.Tensor]:
    """The entries stored beside int8 weight ``key``: its row scales and the layout tag."""
    prefix = module_prefix(key)
    return {prefix + "SCB": scb, prefix + "weight_format": torch.tensor(0, dtype=torch.uint8)}


def validate(key: str, entries: Mapping[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> None:
    """Raise :class:`QuantFormatError` unless ``entries`` hold a well-formed int8 weight ``key``."""
    prefix = module_prefix(key)
    missing = [k for k in entry_keys(key) if k not in entries]
    if missing:
        raise QuantFormatError(f"int8 weight {key} lacks {missing}: re-create the checkpoint with "
                               f"cpm-bee-quantize --int8")
    cb, scb, fmt = entries[key], entries[prefix + "SCB"], entries[prefix + "weight_format"]
    if cb.dtype != torch.int8 or cb.dim() != 2:
        raise QuantFormatError(f"{key} is {cb.dtype} {list(cb.shape)}, not an int8 [dim_out, dim_in] weight")
    if shape is not None and tuple(cb.shape) != tuple(shape):
        raise QuantFormatError(f"{key} has shape {list(cb.shape)} but the model expects {list(shape)}")
    if scb.dtype != torch.float32 or tuple(scb.shape) != (cb.shape[0],):
        raise QuantFormatError(f"{prefix}SCB is {scb.dtype} {list(scb.shape)}, expected float32 [{cb.shape[0]}]")
    if fmt.numel() != 1 or int(fmt.reshape(())) != 0:
        raise QuantFormatError(f"{prefix}weight_format is {fmt.tolist()}: only 0 (row-major) is supported; "
                               f"save the layer with bitsandbytes >= 0.45 or re-quantize the fp16 checkpoint")


def logical_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Drop the ``SCB``/``weight_format`` entries beside an int8 weight (its stored shape is its dense
    shape), so int8, int4 and dense checkpoints compare key for key."""
    side = {prefix + s for k in shapes if k.endswith("weight") and (prefix := k[:-len("weight")]) + "SCB" in shapes
            for s in SUFFIXES}
    return {k: v for k, v in shapes.items() if k not in side}


def checkpoint_metadata(threshold: float, source: str,
                        weights: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, str]:
    """``__metadata__`` of an int8 checkpoint: the format, the threshold it was made for, each weight's
    original dtype/shape (the threshold is a runtime setting: any value loads the same bytes)."""
    originals = {key: {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
                 for key, (shape, dtype) in weights.items()}
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "threshold": repr(float(threshold)),
            "source": source, "weights": json.dumps(originals, separators=(",", ":"))}


def is_int8_metadata(metadata: Mapping[str, str], path: str) -> bool:
    return has_format(metadata, FORMAT_NAME, FORMAT_VERSION, path)


class _MatMul8bit(torch.autograd.Function):
    """``x @ deq(W).T`` via bitsandbytes' int8 kernels; gradient to ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
        shape = x.shape
        a = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE).contiguous()
        # int8_vectorwise_quant zeroes outliers in its input while it works: give it a copy.
        ca, sca, outlier_cols = bnbF.int8_vectorwise_quant(a.clone(), threshold=threshold)
        if threshold > 0.0:
            out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(a, ca, cb, sca, scb, outlier_cols, None)
        else:
            out = torch.ops.bitsandbytes.int8_scaled_mm(ca, cb, sca, scb, dtype=COMPUTE_DTYPE)
        ctx.save_for_backward(cb, scb)
        return out.reshape(*shape[:-1], cb.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cb, scb = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # grad has the input's dtype: the forward returned it
            grad_x = grad @ dequantize(cb, scb, grad.dtype)
        return grad_x, None, None, None


def matmul_int8(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x @ deq(W).T`` (bitsandbytes' LLM.int8 matmul in fp16, outlier columns above ``threshold``),
    returned in ``x``'s dtype."""
    return _MatMul8bit.apply(x, cb, scb.float(), float(threshold))
