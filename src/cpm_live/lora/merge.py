"""The weight-space form of a LoRA adapter and the fp32 merge, written once for every caller.

peft's layers (``merge``/``unmerge``), the adapter-file merge of a dense state dict and the streamed
export all fold ``delta = scaling * sqrt(dim_in) * B @ A`` into a weight: the LoRA branch does not
get the base layer's ``1/sqrt(dim_in)`` output scaling (CPM-Bee's OpenDelta deltas), so the weight
form needs it back. The sum is taken in fp32 and checked for finiteness before anyone stores it.
"""

from __future__ import annotations

import math

import torch

from cpm_live.errors import MergeError


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 ``[dim_out, dim_in]`` that, added to the dense base weight, reproduces the LoRA branch.

    ``lora_a`` is ``[r, dim_in]``, ``lora_b`` ``[dim_out, r]``; ``scaling`` is ``alpha / r``.
    """
    a, b = lora_a.float(), lora_b.float()
    return (b @ a) * (scaling * math.sqrt(a.shape[1]))


def merge_in_fp32(weight: torch.Tensor, delta: torch.Tensor, what: str, check: bool = True) -> torch.Tensor:
    """``weight + delta`` in fp32 (a new tensor on ``weight``'s device; the caller rounds it once).

    With ``check`` a non-finite sum raises :class:`MergeError` naming ``what`` (e.g. the adapter or
    the key), before any weight is touched.
    """
    merged = weight.detach().float() + delta.to(device=weight.device, dtype=torch.float32)
    if check and not torch.isfinite(merged).all():
        raise MergeError(f"merging {what} gives non-finite values; the adapter is broken")
    return merged
