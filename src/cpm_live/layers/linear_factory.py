"""The one place where the int4 switch is read.

Attention and FeedForward receive a ``LinearFactory`` and call it for each projection, so no layer
or block knows whether its projections are dense fp16/fp32 or frozen 4-bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from cpm_live.config import CPMBeeConfig
from cpm_live.layers.linear import Linear
from cpm_live.layers.linear4bit import Linear4bit

LinearFactory = Callable[[int, int], nn.Module]

# Module names of the projections the int4 switch quantizes (CPM-Bee's seven per layer).
QUANTIZED_PROJECTIONS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")


def make_linear(config: CPMBeeConfig) -> LinearFactory:
    """Return ``linear(dim_in, dim_out)`` building :class:`Linear` or :class:`Linear4bit` per config."""
    if config.int4:
        return functools.partial(
            Linear4bit,
            quant_type=config.int4_quant_type,
            double_quant=config.int4_double_quant,
            blocksize=config.int4_blocksize,
            compute_dtype=config.compute_dtype,
            dtype=config.dtype,
        )
    return functools.partial(Linear, dtype=config.dtype)
