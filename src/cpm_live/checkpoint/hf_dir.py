"""Hugging Face style CPM-Bee model directories (``openbmb/cpm-bee-10b`` and its copies).

Such a directory holds ``config.json`` in Hugging Face field names, ``vocab.txt`` and the weights as
one of (looked for in this order, as ``transformers`` prefers safetensors)::

    model.safetensors.index.json + model-0000N-of-0000M.safetensors   (sharded)
    model.safetensors
    pytorch_model.bin.index.json + pytorch_model-0000N-of-0000M.bin    (sharded)
    pytorch_model.bin

The names are those of the Hugging Face port (``CpmBeeConfig`` / ``CpmBeeForCausalLM`` in
huggingface/transformers' ``models/cpmbee``): ``hidden_size``, ``num_hidden_layers`` and
``num_attention_heads`` stand for CPM-Bee's ``dim_model``, ``num_layers`` and ``num_heads``; the other
fields keep CPM-Bee's names, but two defaults differ (``half`` is false and
``position_bias_num_segment_buckets`` is 32 when the file leaves them out). Tensor keys are CPM-Bee's
under the ``cpmbee.`` prefix of ``CpmBeeForCausalLM``, plus ``lm_head.weight``, which that class ties
to ``cpmbee.input_embedding.weight`` and never uses for logits.

This module only names the layout (files, config fields, keys);
:func:`cpm_live.checkpoint.readers.open_checkpoint` reads the tensors, one at a time, and
:func:`cpm_live.checkpoint.base_model.load_config` resolves a command's model config.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

from cpm_live.config import SIZE_LIMITS, CPMBeeConfig, check_size
from cpm_live.errors import ConfigError, MissingFileError
from cpm_live.utils import read_json_file

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
# (file, is_index) in the order transformers looks for them.
WEIGHT_FILES = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
HF_PREFIX = "cpmbee."
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
LM_HEAD = "lm_head.weight"
EMBEDDING = "input_embedding.weight"
HF_TO_ORIGINAL = {"hidden_size": "dim_model", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
# CpmBeeConfig's defaults where they differ from CPM-Bee's; used when config.json leaves a field out.
HF_DEFAULTS = {"half": False, "position_bias_num_segment_buckets": 32}
# The rotary embedding's position scale: fixed to 16 in CPM-Bee, a config field in the HF port.
DISTANCE_SCALE = 16
ARCHITECTURE_FIELDS = ("vocab_size", "dim_model", "num_heads", "dim_head", "dim_ff", "num_layers",
                       "position_bias_num_buckets", "position_bias_num_segment_buckets",
                       "position_bias_max_distance", "eps", "half", "mask_modules")


class CompatibilityWarning(UserWarning):
    """Something in a CPM-Bee / Hugging Face file is ignored or overridden; the message says what wins."""


def warn(message: str) -> None:
    warnings.warn(message, CompatibilityWarning, stacklevel=3)


def weight_files(directory: str) -> tuple[list[str], str | None]:
    """The weight files of a model directory (in index order) and its index file, if sharded."""
    for name, is_index in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if not is_index:
            return [path], None
        weight_map = read_index(path)
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise MissingFileError(f"{path} names shard(s) {missing[:3]} that are not in {directory}: "
                                    f"download every shard listed in the index")
        return [os.path.join(directory, f) for f in files], path
    raise MissingFileError(
        f"{directory} holds no model weights: expected one of {', '.join(n for n, _ in WEIGHT_FILES)}"
    )


def read_index(path: str) -> dict[str, str]:
    """``weight_map`` (key -> shard file name) of a ``*.index.json``."""
    try:
        weight_map = read_json_file(path)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a weight index (a JSON object with a weight_map): {e}") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and os.path.basename(v) == v for k, v in weight_map.items()):
        raise ValueError(f"{path}: weight_map must map tensor names to shard file names in the same directory")
    return weight_map


def original_key(key: str) -> str:
    """CPM-Bee's key for a Hugging Face key: the ``cpmbee.`` prefix removed."""
    return key.removeprefix(HF_PREFIX)


def is_hf_key_layout(keys: list[str]) -> bool:
    """True when keys carry the ``cpmbee.`` prefix or a ``lm_head.weight`` (``CpmBeeForCausalLM``'s layout)."""
    return LM_HEAD in keys or any(k.startswith(HF_PREFIX) for k in keys)


def config_values(path: str) -> dict[str, Any]:
    """CPM-Bee config values from a ``config.json`` in Hugging Face or CPM-Bee names.

    Fields that only steer ``transformers`` (``architectures``, ``auto_map``, ``torch_dtype``,
    ``use_cache``, ``init_std``, ...) are dropped; a ``distance_scale`` other than CPM-Bee's 16 or a
    ``model_type`` other than ``cpmbee`` is refused.
    """
    try:
        raw = read_json_file(path)
    except ValueError as e:
        raise ConfigError(f"model config {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model config {path} must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type", "cpmbee")
    if model_type != "cpmbee":
        raise ConfigError(f"{path} describes a {model_type!r} model, not CPM-Bee (model_type cpmbee)")
    if raw.get("distance_scale", DISTANCE_SCALE) != DISTANCE_SCALE:
        raise ConfigError(f"{path} sets distance_scale {raw['distance_scale']}; CPM-Bee's rotary embedding "
                          f"uses {DISTANCE_SCALE} and this project supports no other")
    hf_style = any(name in raw for name in HF_TO_ORIGINAL)
    values = dict(HF_DEFAULTS) if hf_style else {}
    fields = set(CPMBeeConfig.__dataclass_fields__) - {"source"}
    for key, value in raw.items():
        name = HF_TO_ORIGINAL.get(key, key)
        if name in SIZE_LIMITS and isinstance(value, int) and not isinstance(value, bool):
            check_size(name, value, f" in {path}", key)  # named as the file spells it (hidden_size)
        if name in fields:
            values[name] = value
    return values


def read_config(path: str, **overrides: Any) -> CPMBeeConfig:
    """A :class:`CPMBeeConfig` from a ``config.json`` in Hugging Face or CPM-Bee names."""
    values = config_values(path)
    values.update(overrides)
    return CPMBeeConfig.from_dict(values, source=path)


def hf_config(config: CPMBeeConfig) -> dict[str, Any]:
    """``config.json`` of a Hugging Face CPM-Bee directory for ``config`` (every field written out)."""
    values = config.to_original_dict()
    out: dict[str, Any] = {"architectures": ["CpmBeeForCausalLM"], "model_type": "cpmbee"}
    original_to_hf = {v: k for k, v in HF_TO_ORIGINAL.items()}
    for name, value in values.items():
        out[original_to_hf.get(name, name)] = value
    out.update(distance_scale=DISTANCE_SCALE, torch_dtype=str(config.dtype).removeprefix("torch."),
               tie_word_embeddings=True)
    return out


def is_export_file(name: str) -> bool:
    """True for a file name that ``cpm-bee-export --format hf`` writes into its directory."""
    return name in (CONFIG_FILE, VOCAB_FILE, WEIGHT_FILES[0][0], WEIGHT_FILES[1][0]) or bool(_SHARD.fullmatch(name))
