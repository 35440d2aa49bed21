"""The one place where the base quantization setting becomes layers.

Attention and FeedForward receive a ``LinearFactory`` and call it for each projection, so no layer
or block knows whether its projections are dense fp16/fp32, frozen 4-bit or frozen int8. Which
weights are quantized is therefore whatever this factory builds as a quantized layer: tools read it
from a model built on the meta device (:func:`cpm_live.models.quantized_weight_keys`), not from a
list of names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from cpm_live.config import CPMBeeConfig, Int4Quantization, Int8Quantization
from cpm_live.layers.linear import Linear
from cpm_live.layers.linear4bit import Linear4bit
from cpm_live.layers.linear8bit import Linear8bit

LinearFactory = Callable[[int, int], nn.Module]

# The layer class of each quantization kind; a new kind adds its layer here (and its setting in config).
QUANTIZED_LAYERS: dict[str, type[nn.Module]] = {"int4": Linear4bit, "int8": Linear8bit}
PROJECTION_TYPES: tuple[type[nn.Module], ...] = (Linear, *QUANTIZED_LAYERS.values())


def make_linear(config: CPMBeeConfig) -> LinearFactory:
    """Return ``linear(dim_in, dim_out)`` building the projection class of ``config.quantization``."""
    quant = config.quantization
    if isinstance(quant, Int4Quantization):
        return functools.partial(
            Linear4bit,
            quant_type=quant.quant_type,
            double_quant=quant.double_quant,
            blocksize=quant.blocksize,
            compute_dtype=quant.compute_dtype,
            dtype=config.dtype,
        )
    if isinstance(quant, Int8Quantization):
        return functools.partial(Linear8bit, threshold=quant.threshold, dtype=config.dtype)
    return functools.partial(Linear, dtype=config.dtype)


def is_quantized(module: nn.Module) -> bool:
    """True for a frozen quantized projection of any kind."""
    return isinstance(module, tuple(QUANTIZED_LAYERS.values()))


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight key -> layer, for every quantized projection of ``model`` (in module order)."""
    return {f"{name}.weight": module for name, module in model.named_modules() if is_quantized(module)}
