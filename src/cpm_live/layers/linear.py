"""CPM-Bee's dense projection: no bias, output divided by sqrt(dim_in)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Projection(nn.Linear):
    """Base of the dense, 4-bit and 8-bit projections: a bias-free ``nn.Linear`` by type.

    The type is what lets ``peft.PeftModel.from_pretrained(model, adapter_dir)`` wrap every projection
    with peft's own LoRA ``Linear`` (its default dispatch takes any ``nn.Linear``, as it does for
    bitsandbytes' quantized layers), whose output is ``base(x) + scaling * B(A(x))``: exactly this
    package's LoRA layers. ``nn.Linear.__init__`` is skipped (it would allocate a dense weight);
    subclasses own their tensors and forward.
    """

    def __init__(self, dim_in: int, dim_out: int):
        nn.Module.__init__(self)
        self.dim_in = self.in_features = dim_in
        self.dim_out = self.out_features = dim_out
        self.register_parameter("bias", None)


class Linear(Projection):
    """``y = x @ W.T / sqrt(dim_in)``, weight ``[dim_out, dim_in]``.

    The division keeps activations O(1) with N(0, 1) initialised weights; every CPM-Bee checkpoint
    was trained with it, so it is part of the weights' meaning, not an option.
    """

    def __init__(self, dim_in: int, dim_out: int, dtype: torch.dtype = torch.half, init_std: float = 1.0,
                 device: torch.device | str | None = None):
        super().__init__(dim_in, dim_out)
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) / math.sqrt(self.dim_in)

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}, dtype={self.weight.dtype}"
