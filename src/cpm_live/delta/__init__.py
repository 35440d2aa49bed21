"""LoRA (delta tuning) for CPM-Bee through peft's custom-module registration.

``add_lora`` injects LoRA into the ``Linear``/``Linear4bit`` projections and freezes everything
else; adapters are saved in peft's format and original CPM-Bee ``*-delta-best.pt`` files load too.
"""

from cpm_live.delta.adapter_files import (
    AdapterError,
    LoraDelta,
    load_adapter,
    merge_lora_into_state_dict,
    read_adapter,
    save_adapter,
    save_cpm_bee_delta,
)
from cpm_live.delta.layers import LoraLinear, LoraQuantized, merged_dense_weight
from cpm_live.delta.lora import (
    LoraSettings,
    add_lora,
    add_lora_args,
    freeze_all_but_lora,
    lora_layers,
    lora_settings_from_args,
    lora_state_dict,
    trainable_parameter_report,
)
from cpm_live.delta.merge import MergeError

__all__ = [
    "AdapterError", "LoraDelta", "LoraLinear", "LoraQuantized", "LoraSettings", "MergeError", "add_lora",
    "add_lora_args", "freeze_all_but_lora", "load_adapter", "lora_layers", "lora_settings_from_args", "lora_state_dict",
    "merge_lora_into_state_dict", "merged_dense_weight", "read_adapter", "save_adapter", "save_cpm_bee_delta",
    "trainable_parameter_report",
]
