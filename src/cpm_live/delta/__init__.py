"""Compatibility re-export of ``cpm_live.delta`` (the tests of CPM-Bee users' files import it): LoRA
itself is :mod:`cpm_live.lora`, adapter files are :mod:`cpm_live.checkpoint.adapters`."""

from cpm_live.checkpoint.adapters import (
    LoraDelta,
    load_adapter,
    merge_lora_into_state_dict,
    read_adapter,
    save_adapter,
    save_cpm_bee_delta,
)
from cpm_live.errors import AdapterError, MergeError
from cpm_live.lora import (
    LoraLinear,
    LoraQuantized,
    LoraSettings,
    add_lora,
    add_lora_args,
    freeze_all_but_lora,
    lora_layers,
    lora_settings_from_args,
    lora_state_dict,
    merged_dense_weight,
    trainable_parameter_report,
)

__all__ = [
    "AdapterError", "LoraDelta", "LoraLinear", "LoraQuantized", "LoraSettings", "MergeError", "add_lora",
    "add_lora_args", "freeze_all_but_lora", "load_adapter", "lora_layers", "lora_settings_from_args", "lora_state_dict",
    "merge_lora_into_state_dict", "merged_dense_weight", "read_adapter", "save_adapter", "save_cpm_bee_delta",
    "trainable_parameter_report",
]
