"""CPM-Bee: embedding with subscript rotary, bucketed position bias, pre-norm encoder, tied logits.

Parameter names and math follow the original checkpoints exactly (see docs/architecture.md), so an
original state dict loads with ``strict=True``. The quantization setting is read once, by ``make_linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cpm_live.config import CPMBeeConfig
from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.layers.attention import attention_bias
from cpm_live.layers.embedding import EmbeddingExt
from cpm_live.layers.linear_factory import make_linear, quantized_layers
from cpm_live.layers.position_embedding import BucketPositionBias
from cpm_live.layers.transformer import Encoder

PastKeyValues = dict[str, Any]


def segment_buckets(segment_rel: torch.Tensor, index: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Gather segment-relation buckets ``(B, Lq, Lk)``; pairs outside one sample/span get bucket 1.

    ``index`` is ``segment[q] * num_segments[q] + segment[k] + segment_rel_offset[q]`` into the
    flattened per-row ``segment_rel``; it is zeroed where ``!same`` only to keep the gather in range.
    """
    batch, len_q, len_k = index.shape
    index = index.masked_fill(~same, 0).view(batch, len_q * len_k).long()
    bucket = torch.gather(segment_rel, dim=1, index=index).view(batch, len_q, len_k)
    return bucket.masked_fill(~same, 1)


def quantized_weight_keys(config: CPMBeeConfig) -> list[str]:
    """State-dict keys of the weights the factory quantizes for ``config`` (int4 assumed when the
    config is dense), read from a model built on the meta device (no memory, no quantization)."""
    if config.quantization is None:
        config = config.with_quantization("int4")
    with torch.device("meta"):
        model = CPMBee(config)
    return list(quantized_layers(model))


class CPMBee(nn.Module):
    def __init__(self, config: CPMBeeConfig):
        super().__init__()
        self.config = config
        linear = make_linear(config)
        self.encoder = Encoder(config, linear)
        self.input_embedding = EmbeddingExt(config.vocab_size, config.dim_model, config.dtype)
        self.position_bias = BucketPositionBias(
            config.num_heads,
            config.position_bias_num_buckets,
            config.position_bias_num_segment_buckets,
            config.position_bias_max_distance,
            config.dtype,
        )

    def forward(self, input: torch.Tensor, input_sub: torch.Tensor, length: torch.Tensor,
                context: torch.Tensor, sample_ids: torch.Tensor, num_segments: torch.Tensor,
                segment: torch.Tensor, segment_rel_offset: torch.Tensor, segment_rel: torch.Tensor,
                span: torch.Tensor, ext_table_ids: torch.Tensor, ext_table_sub: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward over packed rows; all inputs ``(B, L)`` int except ``length (B,)``,
        ``segment_rel (B, R)`` and the ext table ``(X,)``. Returns logits ``(B, L, V + X)`` and the
        final hidden states ``(B, L, d)``.

        With ``targets (B, L)`` (``IGNORE_INDEX`` = no loss) the first result is instead the summed
        cross entropy (fp32) over the labelled positions, computed without their logits
        (``EmbeddingExt.cross_entropy_sum``): the projection onto the vocabulary is the largest matmul
        of a small model and its logits the largest activation of any model.
        """
        batch, seqlen = input.shape
        with torch.no_grad():
            device = input.device
            context = context.bool()
            same = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (span[:, :, None] == span[:, None, :])
            index = segment[:, :, None] * num_segments[:, :, None] + segment[:, None, :] \
                + segment_rel_offset[:, :, None]
            bucket = segment_buckets(segment_rel, index, same)

            arange = torch.arange(seqlen, device=device)
            directional = arange[None, :] <= arange[:, None]  # (Lq, Lk): k <= q
            # Context tokens see all context tokens; predicted tokens also see earlier predicted ones.
            mask = context[:, None, :] | (~context[:, :, None] & directional)
            # The main sample (id 0) sees its in-context examples; an example sees only itself.
            in_sample = (sample_ids[:, :, None] == 0) | (sample_ids[:, :, None] == sample_ids[:, None, :])
            same_span = span[:, :, None] == span[:, None, :]
            valid = arange[None, :] < length[:, None]  # (B, L)
            mask = mask & in_sample & same_span & valid[:, :, None] & valid[:, None, :]
            position = arange.expand(batch, seqlen)

        h = self.input_embedding(input, input_sub)
        bias, query_valid, key_ranges = attention_bias(
            self.position_bias(position, position, bucket).to(h.dtype), mask)
        h, _ = self.encoder(h, bias, query_valid, key_ranges)
        ext_table = self.input_embedding(ext_table_ids, ext_table_sub)
        if targets is None:
            return self.input_embedding.projection(h, ext_table), h
        labelled = targets != IGNORE_INDEX
        return self.input_embedding.cross_entropy_sum(h[labelled], ext_table, targets[labelled]), h

    @torch.no_grad()
    def inference(self, input: torch.Tensor, input_sub: torch.Tensor, position: torch.Tensor,
                  context: torch.Tensor, sample_ids: torch.Tensor, num_segments: torch.Tensor,
                  segment: torch.Tensor, segment_rel_offset: torch.Tensor, segment_rel: torch.Tensor,
                  ext_table_ids: torch.Tensor, ext_table_sub: torch.Tensor,
                  past_key_values: PastKeyValues | None = None, with_logits: bool = True,
                  ) -> tuple[torch.Tensor | None, torch.Tensor, PastKeyValues]:
        """Incremental forward for generation.

        ``position (B, Lq)`` is explicit; ``past_key_values`` holds the concatenated past inputs
        (``buffer_position``, ``buffer_context``, ``buffer_sample_ids``, ``buffer_num_segments``,
        ``buffer_segments``, each ``(B, Lbuf)``) and per-layer ``buffer`` of ``(k, v)``. Unlike
        ``forward``, spans are ignored, direction uses positions and padding is the keys with
        ``num_segments == 0``. Returns logits, hidden states and the new state; ``with_logits=False``
        (a prompt's prefill, which only fills the cache) skips the vocabulary projection, whose
        ``(B, L, V + X)`` logits are the largest tensor of a decode, and returns None for them.
        """
        context = context.bool()
        current = {"buffer_position": position, "buffer_context": context, "buffer_sample_ids": sample_ids,
                   "buffer_num_segments": num_segments, "buffer_segments": segment}
        if past_key_values is None:
            present, past_buffer = current, None
        else:
            present = {k: torch.cat([past_key_values[k], v], dim=-1) for k, v in current.items()}
            past_buffer = past_key_values["buffer"]
        key_position = present["buffer_position"]
        key_sample_ids = present["buffer_sample_ids"]

        same = sample_ids[:, :, None] == key_sample_ids[:, None, :]
        index = segment[:, :, None] * num_segments[:, :, None] + present["buffer_segments"][:, None, :] \
            + segment_rel_offset[:, :, None]
        bucket = segment_buckets(segment_rel, index, same)

        directional = key_position[:, None, :] <= position[:, :, None]
        mask = present["buffer_context"][:, None, :] | (~context[:, :, None] & directional)
        mask = mask & ((sample_ids[:, :, None] == 0) | same)
        mask = mask & (present["buffer_num_segments"] != 0)[:, None, :]

        h = self.input_embedding(input, input_sub)
        bias, query_valid, key_ranges = attention_bias(
            self.position_bias(position, key_position, bucket).to(h.dtype), mask)
        h, present["buffer"] = self.encoder(h, bias, query_valid, key_ranges, past_buffer, use_cache=True)
        if not with_logits:
            return None, h, present
        ext_table = self.input_embedding(ext_table_ids, ext_table_sub)
        return self.input_embedding.projection(h, ext_table), h, present
