"""LoRA layers for CPM-Bee's ``Linear``, ``Linear4bit`` and ``Linear8bit``, plugged into peft as custom modules.

Math (CPM-Bee / OpenDelta "parallel" LoRA)::

    y = base(x) + scaling * B(A(dropout(x)))        scaling = alpha / r

``base(x)`` is the wrapped layer's own forward, which already divides by ``sqrt(dim_in)``; the LoRA
branch does not. Folding the adapter into a dense weight therefore needs the extra factor::

    W' = W + scaling * sqrt(dim_in) * B @ A          (because base(x) = x W^T / sqrt(dim_in))

The base forward stays inside the base layer, so a 4-bit or int8 base keeps its quantized matmul
(peft never wraps a quantized layer as a plain Linear over its integer data: every projection class
the factory builds has an entry in :data:`CUSTOM_MODULES`, a test checks). LoRA
weights are fp32 whatever the base dtype: AdamW then never updates fp16 parameters, and the branch
runs in fp32; its output is rounded to the base output's dtype and added there (as peft's own layers do).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from cpm_live.layers.linear import Linear
from cpm_live.layers.linear4bit import Linear4bit
from cpm_live.layers.linear8bit import Linear8bit
from cpm_live.lora.merge import lora_delta, merge_in_fp32


class LoraLinear(nn.Module, LoraLayer):
    """LoRA around a dense CPM-Bee :class:`~cpm_live.layers.Linear` (``base_layer``).

    Built by peft's custom-module dispatch as ``LoraLinear(base_layer, adapter_name, config=...,
    r=..., lora_alpha=..., **kwargs)``. ``merge``/``unmerge`` fold the adapter into the dense base
    weight and back (fp32 arithmetic, rounded once to the weight's dtype).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # Both base classes expose in_features/out_features; answering here spares peft's generic
        # lookup, which warns "Unsupported layer type" for every class it does not know by name.
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # peft moves new adapter weights to the base layer's device *and dtype*; pin the dtype to fp32
        # so an fp16 (or uint8-packed) base never gives fp16 LoRA weights.
        return base_layer.weight.device, torch.float32

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA weights of every adapter on this layer (``lora_A``/``lora_B``)."""
        return [p for name in self.lora_A for p in (self.lora_A[name].weight, self.lora_B[name].weight)]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """fp32 ``[dim_out, dim_in]`` that, added to the dense base weight, reproduces the branch."""
        return lora_delta(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter])

    def dense_base_weight(self) -> torch.Tensor:
        """The base layer's dense ``[dim_out, dim_in]`` weight in its stored dtype."""
        return self.get_base_layer().weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or the named) adapters into the base weight.

        The sum is computed in fp32 on a copy and rounded once into the weight; with ``safe_merge``
        a non-finite result raises :class:`~cpm_live.errors.MergeError` (naming the adapter) before
        the weight is touched.
        """
        weight = self.get_base_layer().weight
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = merge_in_fp32(weight, self.get_delta_weight(adapter), f"LoRA adapter {adapter!r}",
                                   check=safe_merge)
            with torch.no_grad():
                weight.copy_(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract merged adapters again (last merged first); exact up to the weight dtype's rounding."""
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                weight.copy_(weight.detach().float() - self.get_delta_weight(adapter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., dim_out), already divided by sqrt(dim_in)
        if self.disable_adapters and self.merged:
            raise RuntimeError(
                "LoRA adapters are disabled but still merged into the base weight; call unmerge() before "
                "disabling them"
            )
        if self.disable_adapters or self.merged:
            return result
        x32 = x.float()
        delta = None
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
                branch = lora_b(lora_a(self.lora_dropout[adapter](x32))) * self.scaling[adapter]
                delta = branch if delta is None else delta + branch
        # The branch's sum is rounded to the output dtype before it is added, as peft does: casting the
        # (tokens, dim_out) base output to fp32 and the sum back made two more full-size copies per
        # layer, forward and backward (with the loss's, 1.0 s of `copy_` in a 13 s bf16 step at d=1024,
        # 2048 tokens; 0.28 s after both).
        return result if delta is None else result + delta.to(result.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class LoraQuantized(LoraLinear):
    """LoRA around a frozen quantized projection (:class:`~cpm_live.layers.Linear4bit`,
    :class:`~cpm_live.layers.Linear8bit`).

    Merging in place would re-quantize ``W + delta``, rounding away much of the adapter
    and changing the base for every later step, so it is refused. Export instead: take
    :func:`merged_dense_weight` (dequantized base plus adapter, fp32) or
    :func:`cpm_live.checkpoint.adapters.merge_lora_into_state_dict` on a dense checkpoint.
    """

    def dense_base_weight(self) -> torch.Tensor:
        # fp32, not the layer's dtype: a bf16 model's merge must not round the exact 4-bit values first.
        return self.get_base_layer().dequantize(torch.float32)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise RuntimeError(
            f"cannot merge LoRA into a quantized {type(self.get_base_layer()).__name__} in place (re-quantizing "
            "would round the adapter away); export a merged dense weight instead with "
            "cpm_live.lora.merged_dense_weight(layer) or "
            "cpm_live.checkpoint.adapters.merge_lora_into_state_dict on the dense checkpoint"
        )


# The one LoRA dispatch table: every projection class the factory builds, most specific first (peft
# takes the first isinstance match).
CUSTOM_MODULES: dict[type[nn.Module], type[LoraLinear]] = {
    Linear4bit: LoraQuantized, Linear8bit: LoraQuantized, Linear: LoraLinear,
}



def merged_dense_weight(layer: LoraLinear) -> torch.Tensor:
    """fp32 ``[dim_out, dim_in]`` dense weight with the layer's active adapters folded in.

    Used by export: for a 4-bit base it is the dequantized weight plus the adapter, i.e. exactly
    what the LoRA layer computes (up to fp32 rounding); adapters already merged are not added twice.
    """
    with torch.no_grad():
        weight = layer.dense_base_weight().detach().to(torch.float32, copy=True)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                weight += layer.get_delta_weight(adapter)
    return weight
