"""Pre-norm residual blocks with CPM-Bee's damped residual ``(h + f(norm(h))) / 1.05``."""

from __future__ import annotations

import torch
from torch import nn

from cpm_live.config import CPMBeeConfig
from cpm_live.layers.attention import Attention, KVCache
from cpm_live.layers.feedforward import FeedForward
from cpm_live.layers.layernorm import LayerNorm
from cpm_live.layers.linear_factory import LinearFactory

RESIDUAL_DAMPING = 1.05


def _block_dropout(config: CPMBeeConfig) -> nn.Dropout | None:
    # Block-level dropout exists only for a truthy dropout_p, as in the original.
    return nn.Dropout(config.dropout_p) if config.dropout_p else None


class SelfAttentionBlock(nn.Module):
    def __init__(self, config: CPMBeeConfig, linear: LinearFactory):
        super().__init__()
        self.layernorm_before_attention = LayerNorm(config.dim_model, config.dtype, config.eps)
        self.self_attention = Attention(config.dim_model, config.num_heads, config.dim_head, linear,
                                        config.dropout_p)
        self.dropout = _block_dropout(config)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, query_valid: torch.Tensor,
                key_ranges: torch.Tensor, past_kv: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        x = self.layernorm_before_attention(h)
        x, kv = self.self_attention(x, bias, query_valid, key_ranges, past_kv)
        if self.dropout is not None:
            x = self.dropout(x)
        return (h + x) / RESIDUAL_DAMPING, kv


class FFNBlock(nn.Module):
    def __init__(self, config: CPMBeeConfig, linear: LinearFactory):
        super().__init__()
        self.layernorm_before_ffn = LayerNorm(config.dim_model, config.dtype, config.eps)
        self.ffn = FeedForward(config.dim_model, config.dim_ff, linear, config.dropout_p)
        self.dropout = _block_dropout(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.ffn(self.layernorm_before_ffn(h))
        if self.dropout is not None:
            x = self.dropout(x)
        return (h + x) / RESIDUAL_DAMPING


class TransformerBlock(nn.Module):
    """One layer; a sub-block masked by ``mask_modules`` is not built and acts as the identity."""

    def __init__(self, config: CPMBeeConfig, linear: LinearFactory, mask_att: bool = False,
                 mask_ffn: bool = False):
        super().__init__()
        self.self_att = None if mask_att else SelfAttentionBlock(config, linear)
        self.ffn = None if mask_ffn else FFNBlock(config, linear)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, query_valid: torch.Tensor,
                key_ranges: torch.Tensor, past_kv: KVCache | None = None, use_cache: bool = False,
                ) -> tuple[torch.Tensor, KVCache | None]:
        """Returns the new hidden states and, with ``use_cache``, this layer's ``(k, v)``."""
        kv = None
        if self.self_att is not None:
            h, kv = self.self_att(h, bias, query_valid, key_ranges, past_kv)
        if self.ffn is not None:
            h = self.ffn(h)
        # Without use_cache the (k, v) is dropped so activation checkpointing does not keep it alive.
        return h, kv if use_cache else None
