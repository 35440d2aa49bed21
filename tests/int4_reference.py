"""A second, index-by-index reading of bitsandbytes' 4-bit format, for checking dequantization kernels.

Written from the format's definition, not from any kernel: value ``i`` of the row-major weight is
nibble ``i`` of the packed bytes (even ``i``: high nibble), looked up in the 16-entry code table and
multiplied (fp32) by the absmax of block ``i // blocksize``; blocks run over the flattened weight, so
they may span rows. Double quantization stores each absmax as an 8-bit code ``a``:
``absmax[b] = nested_code[a[b]] * nested_absmax[b // 256] + offset`` (fp32).
"""

import math

import torch


def block_absmax(absmax, nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    """fp32 ``[blocks]``: the absmax of each block, undoing double quantization when it was used."""
    if nested_absmax is None:
        return absmax.float()
    b = torch.arange(absmax.numel())
    return nested_code.float()[absmax.long()] * nested_absmax.float()[b // nested_blocksize] + float(offset)


def dequantize(packed, absmax, code, blocksize, shape):
    """fp32 dense ``shape`` tensor of ``packed`` (uint8, any shape) given the fp32 per-block ``absmax``."""
    i = torch.arange(math.prod(shape))
    byte = packed.reshape(-1).long()[i // 2]
    nibble = torch.where(i % 2 == 0, byte >> 4, byte & 0xF)
    return (code.float()[nibble] * absmax[i // blocksize]).reshape(shape)


def dequantize_state(packed, state):
    """fp32 dense weight of ``packed`` described by a bitsandbytes ``QuantState``."""
    if state.nested:
        absmax = block_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset,
                              state.state2.blocksize)
    else:
        absmax = block_absmax(state.absmax)
    return dequantize(packed, absmax, state.code, state.blocksize, tuple(state.shape))
