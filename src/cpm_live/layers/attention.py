"""Multi-head self-attention of CPM-Bee (bias from BucketPositionBias, boolean mask, KV cache)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cpm_live.layers.linear_factory import LinearFactory

KVCache = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, dim_model: int, num_heads: int, dim_head: int, linear: LinearFactory,
                 dropout_p: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.dim_head = dim_head
        self.project_q = linear(dim_model, num_heads * dim_head)
        self.project_k = linear(dim_model, num_heads * dim_head)
        self.project_v = linear(dim_model, num_heads * dim_head)
        self.attention_out = linear(num_heads * dim_head, dim_model)
        self.dropout = nn.Dropout(dropout_p) if dropout_p is not None else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.dim_head).permute(0, 2, 1, 3)  # (B, H, L, dh)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, position_bias: torch.Tensor,
                past_kv: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """``x (B, Lq, d)``, ``attention_mask (B, Lq, Lk)`` bool, ``position_bias (B, H, Lq, Lk)``.

        Returns the output ``(B, Lq, d)`` and the ``(k, v)`` cache ``(B, H, Lk, dh)`` including the
        past. q and k are each divided by ``dh^(1/4)``, as in CPM-Bee's training code.
        """
        batch, len_q, _ = x.shape
        scale = math.sqrt(math.sqrt(self.dim_head))
        q = self._heads(self.project_q(x) / scale)
        k = self._heads(self.project_k(x) / scale)
        v = self._heads(self.project_v(x))
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=-2)
            v = torch.cat([past_kv[1], v], dim=-2)
        masked = ~attention_mask.view(batch, 1, len_q, k.size(-2))
        score = torch.matmul(q, k.transpose(-1, -2)) + position_bias  # (B, H, Lq, Lk)
        score = score.masked_fill(masked, float("-inf"))
        # Softmax, then zero masked entries: a fully masked row (padding) gives zeros, not NaN.
        score = torch.softmax(score, dim=-1).masked_fill(masked, 0.0)
        if self.dropout is not None:
            score = self.dropout(score)
        out = torch.matmul(score, v)  # (B, H, Lq, dh)
        out = out.permute(0, 2, 1, 3).reshape(batch, len_q, self.num_heads * self.dim_head)
        return self.attention_out(out), (k, v)
