"""The encoder: a stack of TransformerBlocks and a final RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from cpm_live.config import CPMBeeConfig
from cpm_live.layers.attention import KVCache
from cpm_live.layers.blocks import TransformerBlock
from cpm_live.layers.layernorm import LayerNorm
from cpm_live.layers.linear_factory import LinearFactory


class Encoder(nn.Module):
    def __init__(self, config: CPMBeeConfig, linear: LinearFactory):
        super().__init__()
        masks = config.mask_modules or [[False, False]] * config.num_layers
        self.layers = nn.ModuleList(
            TransformerBlock(config, linear, mask_att, mask_ffn) for mask_att, mask_ffn in masks
        )
        self.output_layernorm = LayerNorm(config.dim_model, config.dtype, config.eps)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, query_valid: torch.Tensor,
                key_ranges: torch.Tensor, past_key_values: list[KVCache | None] | None = None,
                use_cache: bool = False,
                ) -> tuple[torch.Tensor, list[KVCache | None]]:
        """Returns the normalised hidden states and, with ``use_cache``, each layer's ``(k, v)``
        (None for a masked attention sub-block). Every layer shares ``bias``, ``query_valid`` and
        ``key_ranges`` (:func:`cpm_live.layers.attention.attention_bias`, built once per forward)."""
        present = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            h, kv = layer(h, bias, query_valid, key_ranges, past, use_cache)
            present.append(kv)
        return self.output_layernorm(h), present
