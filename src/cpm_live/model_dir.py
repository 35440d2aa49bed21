"""Compatibility re-export of ``cpm_live.model_dir`` (the tests of CPM-Bee users' files import it):
Hugging Face model directories live in :mod:`cpm_live.checkpoint.hf_dir`, the config resolver of the
model flags in :mod:`cpm_live.checkpoint.base_model`."""

from cpm_live.checkpoint.base_model import load_config
from cpm_live.checkpoint.hf_dir import (
    CompatibilityWarning,
    config_values,
    hf_config,
    read_config,
    read_index,
    weight_files,
)

__all__ = ["CompatibilityWarning", "config_values", "hf_config", "load_config", "read_config", "read_index",
           "weight_files"]
