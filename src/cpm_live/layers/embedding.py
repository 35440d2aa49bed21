"""Token embedding with CPM-Bee's subscript rotary, and the tied output projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cpm_live.layers.projection_loss import projection_cross_entropy


def rotate_by_subscript(x: torch.Tensor, sub: torch.Tensor, distance_scale: int = 16,
                        base: float = 10000.0) -> torch.Tensor:
    """Half-split rotary embedding of ``x (..., d)`` at integer positions ``sub * distance_scale``.

    CPM-Bee rotates by the token's *subscript* (which ``<option_k>`` / unknown-run instance it is),
    not by its position; subscript 0 is the identity. ``inv_freq`` is computed in fp32 and then cast
    to ``x.dtype``, and the angles are formed in ``x.dtype``, as in the original.
    """
    dim = x.size(-1)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    inv_freq = inv_freq.to(x.dtype)
    freqs = (sub * distance_scale)[..., None].to(x.dtype) * inv_freq  # (..., d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., d)
    rotated = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


class EmbeddingExt(nn.Module):
    """``embed(ids, sub) = rotary(E[ids] / sqrt(d), sub)``; ``projection`` reuses ``E`` (tied)."""

    def __init__(self, vocab_size: int, dim_model: int, dtype: torch.dtype = torch.half,
                 init_std: float = 0.02, distance_scale: int = 16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.dim_model = dim_model
        self.init_std = init_std
        self.distance_scale = distance_scale
        self.weight = nn.Parameter(torch.empty(vocab_size, dim_model, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, ids: torch.Tensor, ids_sub: torch.Tensor) -> torch.Tensor:
        embeds = F.embedding(ids, self.weight) / math.sqrt(self.dim_model)  # (..., d)
        return rotate_by_subscript(embeds, ids_sub, self.distance_scale)

    def projection(self, hidden: torch.Tensor, ext_table: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[(h / sqrt(d)) E^T ; h ext_table^T]`` of shape ``(B, L, V + X)``.

        ``ext_table`` rows are already-embedded (scaled and rotated) ext tokens, so their column
        needs no further scaling.
        """
        logits = F.linear(hidden / math.sqrt(self.dim_model), self.weight)
        if ext_table is not None:
            logits = torch.cat([logits, F.linear(hidden, ext_table)], dim=-1)
        return logits

    def cross_entropy_sum(self, hidden: torch.Tensor, ext_table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross entropy (fp32) of ``projection(hidden (N, d), ext_table)`` against ``targets (N,)``,
        computed a chunk of rows at a time without the ``(N, V + X)`` logits (``projection_loss``)."""
        return projection_cross_entropy(hidden / math.sqrt(self.dim_model), self.weight, hidden, ext_table,
                                        targets.long())
