"""LoRA for CPM-Bee through peft's custom-module registration (CPM-Bee called it delta tuning).

``add_lora`` injects LoRA into the ``Linear``/``Linear4bit``/``Linear8bit`` projections and freezes
everything else (:mod:`~cpm_live.lora.inject`); :mod:`~cpm_live.lora.layers` holds peft's layer
classes for them and :mod:`~cpm_live.lora.merge` the weight-space form and the fp32 merge. Adapter
files (peft's format, CPM-Bee's ``*-delta-best.pt``) are read and written by
:mod:`cpm_live.checkpoint.adapters`.
"""

from cpm_live.errors import MergeError
from cpm_live.lora.inject import (
    LoraSettings,
    add_lora,
    add_lora_args,
    freeze_all_but_lora,
    lora_layers,
    lora_settings_from_args,
    lora_state_dict,
    trainable_parameter_report,
)
from cpm_live.lora.layers import LoraLinear, LoraQuantized, merged_dense_weight

__all__ = [
    "LoraLinear", "LoraQuantized", "LoraSettings", "MergeError", "add_lora", "add_lora_args", "freeze_all_but_lora",
    "lora_layers", "lora_settings_from_args", "lora_state_dict", "merged_dense_weight", "trainable_parameter_report",
]
