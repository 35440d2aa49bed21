"""CPM-Bee's bucketed relative position bias, with extra rows for segment relations."""

from __future__ import annotations

import math

import torch
from torch import nn


def position_bucket(relative_position: torch.Tensor, num_buckets: int = 256,
                    max_distance: int = 2048) -> torch.Tensor:
    """Bidirectional T5-style bucket of ``key_pos - query_pos`` (int32 in ``[0, num_buckets)``).

    Half the buckets are for positive distances; within a half, distances below a quarter of
    ``num_buckets`` are exact and larger ones are log-spaced up to ``max_distance``.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).to(torch.int32) * half
    distance = torch.abs(relative_position)
    max_exact = half // 2
    is_small = distance < max_exact
    # fp32 log, truncation toward zero: the bucket boundaries of the released checkpoints.
    if_large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).to(torch.int32)
    if_large = torch.clamp(if_large, max=half - 1)
    return buckets + torch.where(is_small, distance.to(torch.int32), if_large)


class BucketPositionBias(nn.Module):
    """Per-head attention bias ``(B, H, Lq, Lk)``.

    Row ``position_bucket(k - q)`` for tokens of the same segment (``rel_buckets == 0``), else row
    ``num_buckets + rel_buckets - 1`` for the segment relation (bucket 1: other sample or span).
    """

    def __init__(self, num_heads: int, num_buckets: int = 256, num_segment_bucket: int = 256,
                 max_distance: int = 2048, dtype: torch.dtype = torch.half, init_std: float = 1.0,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.num_segment_bucket = num_segment_bucket
        self.max_distance = max_distance
        self.init_std = init_std
        self.relative_attention_bias = nn.Parameter(
            torch.empty(num_buckets + num_segment_bucket, num_heads, dtype=dtype, device=device)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.relative_attention_bias.device.type != "meta":
            nn.init.normal_(self.relative_attention_bias, mean=0.0, std=self.init_std)

    def forward(self, query_pos: torch.Tensor, key_pos: torch.Tensor,
                rel_buckets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # indices only; the table itself still gets gradients
            inner = position_bucket(key_pos[..., None, :] - query_pos[..., :, None],
                                    self.num_buckets, self.max_distance)  # (B, Lq, Lk)
            bucket = torch.where(rel_buckets == 0, inner, rel_buckets - 1 + self.num_buckets)
        batch, len_q, len_k = bucket.shape
        # Gathering each head's row of the transposed table writes (H, B*Lq*Lk) contiguously; an
        # embedding lookup would give (B, Lq, Lk, H), whose permute to (B, H, Lq, Lk) is a strided copy
        # of the largest tensor of a long sequence.
        table = self.relative_attention_bias.t().contiguous()  # (H, buckets), a few KiB
        bias = torch.index_select(table, 1, bucket.reshape(-1).long())  # (H, B*Lq*Lk)
        return bias.view(self.num_heads, batch, len_q, len_k).transpose(0, 1)  # (B, H, Lq, Lk)
