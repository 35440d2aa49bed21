"""Compatibility re-export of ``cpm_live.delta.adapter_files`` (the tests of CPM-Bee users' files
import ``LoraDelta`` here): adapter files live in :mod:`cpm_live.checkpoint.adapters`."""

from cpm_live.checkpoint.adapters import (
    LoraDelta,
    load_adapter,
    merge_lora_into_state_dict,
    read_adapter,
    save_adapter,
    save_cpm_bee_delta,
)
from cpm_live.errors import AdapterError

__all__ = ["AdapterError", "LoraDelta", "load_adapter", "merge_lora_into_state_dict", "read_adapter", "save_adapter",
           "save_cpm_bee_delta"]
