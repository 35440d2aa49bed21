"""CPM-Bee's gated-GELU feed-forward: ``w_out(GELU(w_0 x) * w_1 x)``."""

from __future__ import annotations

import torch
from torch import nn

from cpm_live.layers.linear_factory import LinearFactory


class DenseGatedACT(nn.Module):
    def __init__(self, dim_in: int, dim_ff: int, linear: LinearFactory):
        super().__init__()
        self.w_0 = linear(dim_in, dim_ff)
        self.w_1 = linear(dim_in, dim_ff)
        self.act = nn.GELU()  # exact erf GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.w_0(x)) * self.w_1(x)


class FeedForward(nn.Module):
    def __init__(self, dim_model: int, dim_ff: int, linear: LinearFactory, dropout_p: float | None = None):
        super().__init__()
        self.w_in = DenseGatedACT(dim_model, dim_ff, linear)
        self.dropout = nn.Dropout(dropout_p) if dropout_p is not None else None
        self.w_out = linear(dim_ff, dim_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.w_in(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.w_out(x)
