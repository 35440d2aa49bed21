"""CPM-Bee's projection with a frozen LLM.int8 weight in bitsandbytes' ``Linear8bitLt`` layout.

Lifecycle as :class:`~cpm_live.layers.Linear4bit`: quantized once when built (``reset_parameters``
quantizes an N(0, 1) init, ``from_weight`` a given dense weight) or replaced by ``load_state_dict``
with an int8 checkpoint; ``.to(device)`` only moves bytes and ``forward`` only reads.

    weight   int8 [dim_out, dim_in] Parameter (frozen)   round(W * 127 / SCB[row])
    SCB      fp32 [dim_out]         Parameter (frozen)   row absmax

Both are parameters so engines shard and gather them like the 4-bit state. The state dict adds
bitsandbytes' ``weight_format`` (0, row-major), so it loads into ``bnb.nn.Linear8bitLt``.
Forward: :func:`cpm_live.quant.int8.matmul_int8` (fp16 int8 matmul with outlier columns in fp16,
returned in the input's dtype), divided by ``sqrt(dim_in)`` like ``Linear``; gradients reach the
input only, computed in the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from cpm_live.layers.linear import Projection
from cpm_live.quant import int8
from cpm_live.quant.format import QuantFormatError


class Linear8bit(Projection):
    """``y = x @ deq(W).T / sqrt(dim_in)`` with ``W [dim_out, dim_in]`` frozen in 8 bits.

    Args:
        dim_in (int): input features.
        dim_out (int): output features.
        threshold (float): LLM.int8 outlier threshold on the input (default 6.0; 0: none).
        dtype (torch.dtype): dtype of the dense weight this stands for; ``dequantize()`` returns it.
        device: where to allocate; ``"meta"`` allocates nothing and skips the initial quantization.
    """

    def __init__(self, dim_in: int, dim_out: int, threshold: float = 6.0, dtype: torch.dtype = torch.half,
                 device: torch.device | str | None = None):
        super().__init__(dim_in, dim_out)
        self.threshold = float(threshold)
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.SCB = nn.Parameter(torch.empty(dim_out, dtype=torch.float32, device=device), requires_grad=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Quantize a fresh N(0, 1) weight (CPM-Bee's Linear init), so an int8 model works unloaded."""
        if self.weight.device.type == "meta":
            return
        self._store(torch.randn(self.dim_out, self.dim_in, dtype=self.dtype, device=self.weight.device))

    @torch.no_grad()
    def _store(self, dense: torch.Tensor) -> None:
        cb, scb = int8.quantize(dense.to(self.weight.device))
        self.weight.copy_(cb)
        self.SCB.copy_(scb)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, threshold: float = 6.0,
                    device: torch.device | str | None = None) -> Linear8bit:
        """Quantize dense ``weight [dim_out, dim_in]`` into a new layer (``dtype`` = the weight's)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [dim_out, dim_in], got shape {list(weight.shape)}")
        device = torch.device(device) if device is not None else weight.device
        layer = cls(weight.shape[1], weight.shape[0], threshold, weight.dtype, device="meta")
        layer.to_empty(device=device)
        layer._store(weight.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"Linear8bit expects inputs with last dim {self.dim_in}, got {list(x.shape)}")
        return int8.matmul_int8(x, self.weight, self.SCB, self.threshold) / math.sqrt(self.dim_in)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[dim_out, dim_in]`` weight in ``dtype`` (default ``self.dtype``; fp32 is exact)."""
        return int8.dequantize(self.weight, self.SCB, dtype or self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def validate_entries(self, key: str, entries: Mapping[str, torch.Tensor]) -> None:
        """Check the stored entries of this layer's weight ``key`` (``weight``, ``SCB``, ``weight_format``;
        see :func:`int8.validate`); the weight may be a meta tensor: only its shape and dtype are read."""
        if entries[key].is_floating_point():
            raise QuantFormatError(
                f"{key} is a dense {entries[key].dtype} weight {list(entries[key].shape)} but this layer "
                f"is int8: compress the checkpoint with cpm-bee-quantize --int8, or load it with "
                f"cpm_live.checkpoint.load_model_weights, which quantizes on the fly"
            )
        int8.validate(key, entries, (self.dim_out, self.dim_in))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        fmt_key = prefix + "weight_format"
        if key in state_dict:
            self.validate_entries(key, {fmt_key: torch.tensor(0, dtype=torch.uint8), **state_dict})
        internal = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != fmt_key}
        super()._load_from_state_dict(internal, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}, threshold={self.threshold}, dtype={self.dtype}"
