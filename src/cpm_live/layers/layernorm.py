"""RMSNorm as CPM-Bee computes it (weight only, no mean subtraction, no bias)."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm(nn.Module):
    """``y = cast(x * rsqrt(mean(x^2) + eps)) * weight``.

    The statistics and the normalised product are computed in fp32 and cast back to the input dtype
    *before* the weight multiply, which is the rounding the released checkpoints were trained with.
    """

    def __init__(self, dim_norm: int, dtype: torch.dtype = torch.half, eps: float = 1e-6,
                 device: torch.device | str | None = None):
        super().__init__()
        self.dim_norm = dim_norm
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim_norm, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.dim_norm:
            raise ValueError(f"LayerNorm expects last dim {self.dim_norm}, got shape {tuple(x.shape)}")
        variance = x.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight
