"""Multi-head self-attention of CPM-Bee through ``scaled_dot_product_attention``, with a KV cache.

CPM-Bee's bucketed position bias and its mask enter attention as one additive float mask, built
once per forward by :func:`attention_bias` and shared by every layer, with a plan of which keys each
block of queries can see at all: attention runs per query block over those keys only, so the
causal half of a prediction span costs no work (the kernels cannot skip ``-inf`` entries of a float
mask). Which kernel runs (docs/architecture.md, "Attention"): on CPU the flash kernel, unless the
mask needs a gradient (the bias table trains in full fine-tuning) or dropout is on, when torch takes
its math kernel; on CUDA cuDNN or the memory-efficient kernel, which also give the bias its gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cpm_live.layers.linear_factory import LinearFactory

KVCache = tuple[torch.Tensor, torch.Tensor]

# Queries per attention call. Smaller blocks skip more of a causal mask (at 2048 tokens 256 rows do
# 56% of the full square's work, 512 rows 62%) but make more kernel calls; both measured alike on CPU.
QUERY_BLOCK = 256
# Key ranges start and end on multiples of this: CUDA's memory-efficient kernel copies a bias slice
# whose rows are not 16-element aligned. Widening a range is harmless: the extra keys are masked.
KEY_ALIGN = 16


def attention_bias(position_bias: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold ``mask (B, Lq, Lk)`` (True = may attend) into ``position_bias (B, H, Lq, Lk)``, in place.

    Returns the additive mask (the bias, ``-inf`` where masked), ``query_valid (B, Lq, 1)``, False for
    a query that may attend to nothing (padding), and the plan ``key_ranges``: an int64 CPU tensor
    ``(nb, 3)``, for the queries of block ``i`` (rows ``i * QUERY_BLOCK ...``) the keys ``[start, end)``
    that any of them may see and whether one of them sees nothing. Such a query keeps its finite
    bias, so no kernel meets a row of only ``-inf`` (a NaN in some kernels); :class:`Attention`
    zeroes its output instead, as CPM-Bee's softmax-then-zero does.
    """
    batch, len_q, len_k = mask.shape
    query_valid = mask.any(dim=-1, keepdim=True)  # (B, Lq, 1)
    bias = position_bias.masked_fill_((~mask & query_valid)[:, None], float("-inf"))
    blocks = -(-len_q // QUERY_BLOCK)
    if mask.is_meta:  # a shape-only run (the memory estimate): no values to plan by, every key is seen
        return bias, query_valid, torch.tensor([[0, len_k, 1]] * blocks)
    pad = blocks * QUERY_BLOCK - len_q
    seen = F.pad(mask.any(dim=0), (0, 0, 0, pad)).view(blocks, QUERY_BLOCK, len_k).any(dim=1)  # (nb, Lk)
    keys = torch.arange(len_k, device=mask.device)
    start = torch.where(seen, keys, len_k).amin(dim=1) // KEY_ALIGN * KEY_ALIGN
    end = ((torch.where(seen, keys + 1, 0).amax(dim=1) + KEY_ALIGN - 1) // KEY_ALIGN * KEY_ALIGN).clamp(max=len_k)
    # A block of padding only sees nothing; it attends to the first key and is zeroed.
    empty = ~seen.any(dim=1)
    start, end = start.masked_fill(empty, 0), end.masked_fill(empty, 1)
    blind = F.pad(~query_valid[..., 0], (0, pad)).view(batch, blocks, QUERY_BLOCK).any(dim=2).any(dim=0)
    return bias, query_valid, torch.stack([start, end, blind.long()], dim=1).cpu()


class _Slices(torch.autograd.Function):
    """Views ``x[index]`` for each index, whose gradients backward adds into one zero tensor.

    Slicing through autograd one view at a time would give each view's gradient a zero-filled copy
    of the whole ``x`` (a ``(B, H, L, L)`` one for the bias, when it trains) and add them all up.
    """

    @staticmethod
    def forward(ctx, x, *indices):
        ctx.shape, ctx.indices = x.shape, indices
        return tuple(x[index] for index in indices)

    @staticmethod
    def backward(ctx, *grads):
        grad = next(g for g in grads if g is not None).new_zeros(ctx.shape)
        for index, g in zip(ctx.indices, grads):
            if g is not None:
                grad[index] += g
        return (grad, *(None for _ in ctx.indices))


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
        self.dropout_p = dropout_p or 0.0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.dim_head).transpose(1, 2)  # (B, H, L, dh), a view

    def forward(self, x: torch.Tensor, bias: torch.Tensor, query_valid: torch.Tensor, key_ranges: torch.Tensor,
                past_kv: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """``x (B, Lq, d)``; ``bias (B, H, Lq, Lk)``, ``query_valid (B, Lq, 1)`` and ``key_ranges``
        from :func:`attention_bias`.

        Returns the output ``(B, Lq, d)`` and the ``(k, v)`` cache ``(B, H, Lk, dh)`` including the
        past. CPM-Bee divides q and k each by ``dh^(1/4)``; the kernels' scale ``1/sqrt(dh)`` is the
        same product (torch's math kernel even scales q and k by its square root).
        """
        batch, len_q, _ = x.shape
        q = self._heads(self.project_q(x))
        k = self._heads(self.project_k(x))
        v = self._heads(self.project_v(x))
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=-2)
            v = torch.cat([past_kv[1], v], dim=-2)
        dropout_p = self.dropout_p if self.training else 0.0
        plan = key_ranges.tolist()
        rows = [slice(i * QUERY_BLOCK, min(len_q, (i + 1) * QUERY_BLOCK)) for i in range(len(plan))]
        keys = [(slice(None), slice(None), slice(start, end)) for start, end, _ in plan]
        q_blocks = _Slices.apply(q, *((slice(None), slice(None), r) for r in rows))
        k_blocks, v_blocks = _Slices.apply(k, *keys), _Slices.apply(v, *keys)
        biases = _Slices.apply(bias, *((slice(None), slice(None), r, key[2]) for r, key in zip(rows, keys)))
        outs = []
        for i, (_, _, blind) in enumerate(plan):
            out = F.scaled_dot_product_attention(q_blocks[i], k_blocks[i], v_blocks[i], attn_mask=biases[i],
                                                 dropout_p=dropout_p, scale=1.0 / math.sqrt(self.dim_head))
            out = out.transpose(1, 2)  # (B, rows, H, dh)
            outs.append(out * query_valid[:, rows[i], :, None] if blind else out)
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return self.attention_out(out.reshape(batch, len_q, self.num_heads * self.dim_head)), (k, v)
