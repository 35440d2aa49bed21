"""Plain ``torch.nn`` building blocks of CPM-Bee; no engine imports here."""

from cpm_live.layers.attention import Attention
from cpm_live.layers.blocks import FFNBlock, SelfAttentionBlock, TransformerBlock
from cpm_live.layers.embedding import EmbeddingExt
from cpm_live.layers.feedforward import DenseGatedACT, FeedForward
from cpm_live.layers.layernorm import LayerNorm
from cpm_live.layers.linear import Linear
from cpm_live.layers.linear4bit import Linear4bit
from cpm_live.layers.linear8bit import Linear8bit
from cpm_live.layers.linear_factory import (
    PROJECTION_TYPES,
    QUANTIZED_LAYERS,
    LinearFactory,
    is_quantized,
    make_linear,
)
from cpm_live.layers.position_embedding import BucketPositionBias
from cpm_live.layers.transformer import Encoder

__all__ = [
    "Attention", "BucketPositionBias", "DenseGatedACT", "EmbeddingExt", "Encoder", "FFNBlock", "FeedForward",
    "LayerNorm", "Linear", "Linear4bit", "Linear8bit", "LinearFactory", "PROJECTION_TYPES", "QUANTIZED_LAYERS",
    "SelfAttentionBlock", "TransformerBlock", "is_quantized", "make_linear",
]
