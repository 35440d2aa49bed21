"""CPM-Bee's projection with a frozen 4-bit (NF4/FP4) weight in bitsandbytes' format.

Quantization is bitsandbytes' own; the matmul and ``dequantize()`` go through
:mod:`cpm_live.quant.dequant` (exact torch on CPU, where bnb's native kernel is wrong for some shapes;
bitsandbytes' kernels on CUDA). Without autograd (generation, evaluation), a few rows on CPU go
through :mod:`cpm_live.quant.gemv` instead, which reads the packed weight without dequantizing it.

Lifecycle: the weight is quantized exactly once, when the module is built (``reset_parameters``
quantizes an N(0, 1) CPM-Bee init; ``from_weight`` / ``from_linear`` quantize a given dense weight)
or replaced by ``load_state_dict`` with an already-compressed checkpoint. Nothing quantizes later:
``.to(device)`` only moves bytes and ``forward`` only reads.

    layer = Linear4bit.from_weight(dense_weight)          # quantize now (bnb's quantize_4bit)
    y = layer(x)                                          # x @ deq(W).T / sqrt(dim_in)
    torch.save(layer.state_dict(), ...)                   # weight, weight.absmax, ... (bnb layout)

All 4-bit state lives on this module as tensors, so engines shard and gather it like any other
parameter (one owner; ``QuantState`` is rebuilt from them on every call and never stored):

    weight                  uint8 [(n+1)//2, 1] Parameter   packed codes
    weight_absmax           Parameter  fp32 [blocks], or uint8 [blocks] when double-quantized
    weight_nested_absmax    Parameter  fp32 [ceil(blocks/256)]           (double quant only)
    weight_quant_map        buffer     fp32 [16]                         the 4-bit levels
    weight_nested_quant_map buffer     fp32 [256]                        (double quant only)
    weight_nested_offset    buffer     fp32 []                           (double quant only)

Parameters are frozen (``requires_grad=False``); gradients reach the input only. Move the module
with ``.to(device)``, never ``.half()`` / ``.to(dtype)``: that would round the fp32 statistics
(forward still upcasts them, but the lost precision stays). The state dict
uses bitsandbytes' keys instead (``weight.absmax``, ..., ``weight.quant_state.bitsandbytes__nf4``,
see :mod:`cpm_live.quant.format`), which is also the compressed checkpoint's layout.

Sharded (FSDP2 ``fully_shard``): ``model.state_dict()`` returns DTensors for the three parameters
and plain tensors for the rest. Gather a full state dict with ``Engine.state_dict(model)`` and load
one with ``Engine.load_state_dict`` (every rank must take part; the engine cuts each entry to the
parameters' mesh/placements), or load the full one before ``fully_shard``.
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` is not supported: it resolves each
key as an attribute path, and ``weight.absmax`` is not an attribute of the packed parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import bitsandbytes.functional as bnbF
import torch
from torch import nn

from cpm_live.quant import dequant, gemv
from cpm_live.quant import format as qformat

_HINT = ("build the model with the checkpoint's int4 settings (int4_quant_type / int4_blocksize / "
         "int4_double_quant in the model config) or re-create the checkpoint with cpm-bee-quantize")


class Linear4bit(nn.Module):
    """``y = x @ deq(W).T / sqrt(dim_in)`` with ``W [dim_out, dim_in]`` frozen in 4 bits.

    Args:
        dim_in (int): input features.
        dim_out (int): output features.
        quant_type (str): ``"nf4"`` (default, QLoRA) or ``"fp4"``.
        double_quant (bool): also quantize the per-block absmax to 8 bits (default True).
        blocksize (int): values per absmax block, 32..4096 (default 64).
        compute_dtype (torch.dtype): dtype of the matmul; the input is cast to it and the output back.
        dtype (torch.dtype): dtype of the dense weight this stands for; ``dequantize()`` returns it.
        device: where to allocate; ``"meta"`` allocates nothing and skips the initial quantization.
    """

    def __init__(self, dim_in: int, dim_out: int, quant_type: str = "nf4", double_quant: bool = True,
                 blocksize: int = 64, compute_dtype: torch.dtype = torch.float32,
                 dtype: torch.dtype = torch.half, device: torch.device | str | None = None):
        super().__init__()
        self.dim_in = self.in_features = dim_in
        self.dim_out = self.out_features = dim_out
        self.settings = qformat.QuantSettings(quant_type, double_quant, blocksize)
        self.compute_dtype = compute_dtype
        self.dtype = dtype
        layout = qformat.tensor_layout((dim_out, dim_in), self.settings)

        def empty(suffix: str) -> torch.Tensor:
            shape, tensor_dtype = layout[suffix]
            return torch.empty(shape, dtype=tensor_dtype, device=device)

        self.weight = nn.Parameter(empty(""), requires_grad=False)
        self.weight_absmax = nn.Parameter(empty(".absmax"), requires_grad=False)
        self.register_buffer("weight_quant_map", empty(".quant_map"))
        if double_quant:
            self.weight_nested_absmax = nn.Parameter(empty(".nested_absmax"), requires_grad=False)
            self.register_buffer("weight_nested_quant_map", empty(".nested_quant_map"))
            self.register_buffer("weight_nested_offset", torch.empty((), dtype=torch.float32, device=device))
        self.reset_parameters()

    @property
    def quant_type(self) -> str:
        return self.settings.quant_type

    @property
    def double_quant(self) -> bool:
        return self.settings.double_quant

    @property
    def blocksize(self) -> int:
        return self.settings.blocksize

    def reset_parameters(self) -> None:
        """Quantize a fresh N(0, 1) weight (CPM-Bee's Linear init), so an int4 model works unloaded."""
        if self.weight.device.type == "meta":
            return
        dense = torch.randn(self.dim_out, self.dim_in, dtype=self.dtype, device=self.weight.device)
        self._store(dense)

    @torch.no_grad()
    def _store(self, dense: torch.Tensor) -> None:
        packed, state = qformat.quantize(dense.to(self.weight.device), self.settings)
        self.weight.copy_(packed)
        self.weight_absmax.copy_(state.absmax)
        self.weight_quant_map.copy_(state.code)
        if self.double_quant:
            self.weight_nested_absmax.copy_(state.state2.absmax)
            self.weight_nested_quant_map.copy_(state.state2.code)
            self.weight_nested_offset.copy_(state.offset)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Linear4bit:
        """Quantize dense ``weight [dim_out, dim_in]`` (on ``device``, default its own) into a new layer.

        ``dtype`` is the weight's dtype: quantizing is bit-identical to ``quantize_4bit(weight)``.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [dim_out, dim_in], got shape {list(weight.shape)}")
        device = torch.device(device) if device is not None else weight.device
        layer = cls(weight.shape[1], weight.shape[0], quant_type, double_quant, blocksize, compute_dtype,
                    weight.dtype, device="meta")
        layer.to_empty(device=device)
        layer._store(weight.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module | torch.Tensor, **settings) -> Linear4bit:
        """Quantize a :class:`cpm_live.layers.Linear` (or a bias-free ``nn.Linear``, or a weight tensor)."""
        if isinstance(linear, torch.Tensor):
            return cls.from_weight(linear, **settings)
        if getattr(linear, "bias", None) is not None:
            raise ValueError(f"{type(linear).__name__} has a bias; CPM-Bee projections have none")
        return cls.from_weight(linear.weight, **settings)

    def quant_state(self) -> bnbF.QuantState:
        """bitsandbytes' view of this layer's tensors, built fresh (never cached, so never stale)."""
        state2 = offset = None
        if self.double_quant:
            # .float() is a no-op unless an engine cast floating state (e.g. FSDP2 mixed precision);
            # bnb's kernels read fp32 statistics.
            state2 = bnbF.QuantState(absmax=self.weight_nested_absmax.float(),
                                     code=self.weight_nested_quant_map.float(),
                                     blocksize=qformat.NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = self.weight_nested_offset.float()
        absmax = self.weight_absmax if self.double_quant else self.weight_absmax.float()
        return bnbF.QuantState(absmax=absmax, shape=torch.Size((self.dim_out, self.dim_in)),
                               code=self.weight_quant_map.float(), blocksize=self.blocksize,
                               quant_type=self.quant_type, dtype=self.dtype, offset=offset, state2=state2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"Linear4bit expects inputs with last dim {self.dim_in}, got {list(x.shape)}")
        x_compute, state = x.to(self.compute_dtype), self.quant_state()
        if torch.is_grad_enabled():
            out = dequant.matmul_4bit(x_compute, self.weight, state)
        else:  # inference (generation, evaluation): few rows skip the dense weight
            out = gemv.matmul_4bit_inference(x_compute, self.weight, state)
        return out.to(x.dtype) / math.sqrt(self.dim_in)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[dim_out, dim_in]`` weight in ``dtype`` (default ``self.dtype``; fp32 is exact)."""
        return dequant.dequantize_4bit(self.weight, self.quant_state(), dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        state = self.quant_state()
        if state.offset is not None and state.offset.is_meta:
            state.offset = torch.zeros(())  # a meta (shape-only) model has no offset value but the same keys
        for key, value in qformat.pack(prefix + "weight", self.weight, state).items():
            destination[key] = value if keep_vars else value.detach()

    def validate_entries(self, key: str, entries: Mapping[str, torch.Tensor]) -> dict:
        """Check the stored entries of this layer's weight ``key`` (see :func:`qformat.validate`); the
        large ones may be meta tensors: only shapes, dtypes, the code table and the JSON are read.
        Returns the decoded quant-state JSON."""
        if entries[key].is_floating_point():
            raise qformat.QuantFormatError(
                f"{key} is a dense {entries[key].dtype} weight {list(entries[key].shape)} but this layer "
                f"is 4-bit: compress the checkpoint with cpm-bee-quantize, or load it with "
                f"cpm_live.checkpoint.load_model_weights, which quantizes on the fly"
            )
        return qformat.validate(key, entries, self.settings, (self.dim_out, self.dim_in), _HINT)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        entries = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        if key not in entries:
            missing_keys.extend(qformat.entry_keys(key, self.settings))
            return
        blob = self.validate_entries(key, entries)
        # The stored dense dtype only names dequantize()'s output; this layer's ``dtype`` wins.
        internal = {key: entries[key], prefix + "weight_absmax": entries[key + ".absmax"],
                    prefix + "weight_quant_map": entries[key + ".quant_map"]}
        if self.double_quant:
            internal[prefix + "weight_nested_absmax"] = entries[key + ".nested_absmax"]
            internal[prefix + "weight_nested_quant_map"] = entries[key + ".nested_quant_map"]
            internal[prefix + "weight_nested_offset"] = torch.tensor(float(blob["nested_offset"]))
        super()._load_from_state_dict(internal, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"dim_in={self.dim_in}, dim_out={self.dim_out}, quant_type={self.quant_type}, "
                f"double_quant={self.double_quant}, blocksize={self.blocksize}, "
                f"compute_dtype={self.compute_dtype}, dtype={self.dtype}")
