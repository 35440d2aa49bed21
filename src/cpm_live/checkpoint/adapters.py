"""Adapter files: peft's format (adapter_config.json + adapter_model.safetensors) and CPM-Bee deltas.

peft format, as ``PeftModel.save_pretrained`` writes it for a custom (non-transformers) model:
tensor keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, safetensors metadata
``{"format": "pt"}``, and the ``LoraConfig`` as JSON whose ``auto_mapping`` names the base class.
``auto_mapping.base_model_shape`` records the base's shape so that loading an adapter into another
model shape fails with a clear message (peft reads and ignores the extra entry).

Original CPM-Bee delta (``<save_name>-delta-best.pt``): a ``torch.save``d dict with keys
``encoder.layers.N.self_att.self_attention.project_q.lora.lora_A`` (``[r, dim_in]``) and ``.lora_B``
(``[dim_out, r]``); it maps 1:1 onto the peft keys. It does not record alpha: CPM-Bee always used
OpenDelta's default 16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cpm_live.checkpoint.safe_load import RefusedPickle, safe_torch_load
from cpm_live.config import CPMBeeConfig
from cpm_live.errors import AdapterError, CheckpointError
from cpm_live.lora.inject import (
    ADAPTER_NAME,
    LoraSettings,
    add_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    matches_target,
)
from cpm_live.lora.merge import lora_delta, merge_in_fp32
from cpm_live.utils import atomic_path, atomic_write_text, non_plain_tensors, read_json_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
SHAPE_FIELDS = ("vocab_size", "dim_model", "num_heads", "dim_head", "dim_ff", "num_layers")
CPM_BEE_DELTA_ALPHA = 16  # OpenDelta LoraModel default, used by every CPM-Bee delta-tuning script
_A, _B = ".lora_A.weight", ".lora_B.weight"
_DELTA_SUFFIXES = {".lora.lora_A": _A, ".lora.lora_B": _B}


def _module_of(key: str, source: str) -> str:
    for suffix in (_A, _B):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise AdapterError(
        f"unexpected adapter key {key!r} in {source}: expected '<module>{_A}' or '<module>{_B}'"
    )


def _check_pairs(state: Mapping[str, torch.Tensor], source: str, r: int) -> None:
    """Check every module has a 2-D A ``[r, in]`` and B ``[out, r]`` (used where no model says more)."""
    modules = sorted({_module_of(key, source) for key in state})
    if not modules:
        raise AdapterError(f"{source} holds no LoRA weights")
    for module in modules:
        for suffix in (_A, _B):
            if module + suffix not in state:
                raise AdapterError(f"adapter key {module + suffix!r} is missing in {source}")
        a, b = state[module + _A], state[module + _B]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"{module}: lora_A/lora_B in {source} must be 2-D, got {list(a.shape)} and "
                               f"{list(b.shape)}")
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(
                f"{module + _A!r} in {source} has shape {list(a.shape)} and {module + _B!r} {list(b.shape)}; "
                f"expected rank r={r}: A [{r}, dim_in], B [dim_out, {r}]"
            )


def _without_adapter_name(key: str) -> str:
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.{ADAPTER_NAME}.weight", f".{part}.weight")
    return key


def _base_model_shape(config: CPMBeeConfig) -> dict[str, int]:
    return {name: getattr(config, name) for name in SHAPE_FIELDS}


def save_adapter(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], settings: LoraSettings,
                 directory: str | os.PathLike, base_config: CPMBeeConfig | None = None,
                 note: str | None = None) -> None:
    """Write ``directory/adapter_config.json`` and ``adapter_model.safetensors`` in peft's format.

    ``note`` (how these weights were chosen, e.g. "lowest eval loss ... at step N") goes into
    ``README.md`` beside them and into the config's ``auto_mapping`` as ``selected``.

    Takes a model with LoRA (its config is the default ``base_config``) or a full, gathered LoRA
    state dict as :func:`lora_state_dict` returns it. Each file is written atomically; the weights
    go first, so a reader never sees a config that promises weights not yet there.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = lora_state_dict(model_or_state_dict)
        if base_config is None:
            base_config = getattr(model_or_state_dict, "config", None)
    else:
        # Accept a model/engine state dict filtered to the LoRA weights: drop peft's adapter name.
        state = {_without_adapter_name(key): value for key, value in model_or_state_dict.items()}
    directory = os.fspath(directory)
    source = f"the adapter being saved to {directory}"
    sharded = non_plain_tensors(state)
    if sharded:
        raise AdapterError(
            f"{sharded[0]!r} in {source} is a {type(state[sharded[0]]).__name__}, not a plain tensor; gather "
            "a sharded model's weights with Engine.state_dict(model, trainable_only=True) first"
        )
    _check_pairs(state, source, r=settings.r)
    untargeted = sorted(key for key in state
                        if not any(matches_target(_module_of(key, source), t) for t in settings.targets))
    if untargeted:
        raise AdapterError(
            f"{untargeted[0]!r} in {source} belongs to no LoRA target of {list(settings.targets)}; pass the "
            "settings the adapter was trained with"
        )
    tensors = {PEFT_PREFIX + key: value.detach().to("cpu").contiguous()
               for key, value in sorted(state.items())}

    config = settings.to_peft_config().to_dict()
    config.update(inference_mode=True, target_modules=sorted(settings.targets))
    config["auto_mapping"] = {"base_model_class": "CPMBee", "parent_library": "cpm_live.models.bee"}
    if base_config is not None:
        config["auto_mapping"]["base_model_shape"] = _base_model_shape(base_config)
    if note is not None:
        config["auto_mapping"]["selected"] = note

    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write_text(os.path.join(directory, CONFIG_NAME), text)
    if note is not None:
        atomic_write_text(os.path.join(directory, README_NAME), adapter_readme(settings, note))


def adapter_readme(settings: LoraSettings, note: str) -> str:
    """The adapter folder's README.md: what it is, how it was chosen, how to load it."""
    return (f"# CPM-Bee LoRA adapter\n\nLoRA r={settings.r}, alpha={settings.alpha:g} on "
            f"{', '.join(sorted(settings.targets))}, in peft's format.\n\n"
            f"These weights are {note}.\n\n"
            "Load them with `text_generation.py` / `export_model.py` `--delta <this folder>`, with\n"
            "`cpm_live.checkpoint.load_adapter(model, folder)`, or with\n"
            "`peft.PeftModel.from_pretrained(model, folder)` on a model built by cpm_live.\n")


def save_cpm_bee_delta(state_dict: Mapping[str, torch.Tensor], settings: LoraSettings,
                       path: str | os.PathLike) -> None:
    """Write CPM-Bee's ``*-delta-best.pt``: ``<module>.lora.lora_A`` / ``.lora_B``, as OpenDelta saves them.

    The file cannot record alpha (OpenDelta uses 16), so ``alpha / 16`` is folded into ``lora_B``: the
    file gives the same outputs when read with alpha 16 (by CPM-Bee's scripts or :func:`read_adapter`).
    """
    state = {_without_adapter_name(key): value for key, value in state_dict.items()}
    _check_pairs(state, os.fspath(path), r=settings.r)
    fold = settings.alpha / CPM_BEE_DELTA_ALPHA
    out = {}
    for key, value in sorted(state.items()):
        module = _module_of(key, os.fspath(path))
        value = value.detach().to("cpu", torch.float32)
        if key.endswith(_B):
            out[module + ".lora.lora_B"] = (value * fold).contiguous()
        else:
            out[module + ".lora.lora_A"] = value.contiguous()
    with atomic_path(path) as tmp:
        torch.save(out, tmp)


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    try:
        state = safe_torch_load(path)
    except RefusedPickle as e:
        raise AdapterError(f"{e}; use an adapter saved as a plain dict of tensors (or peft's safetensors)") from None
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(
            f"{path} must hold a dict of tensors (a LoRA state dict), got {type(state).__name__}"
        )
    return dict(state)


def _read_peft_dir(directory: str) -> tuple[LoraSettings, dict[str, torch.Tensor], dict[str, int] | None]:
    config_path = os.path.join(directory, CONFIG_NAME)
    try:
        raw = read_json_file(config_path)
    except FileNotFoundError:
        raise AdapterError(f"{directory} is not a peft adapter directory: {CONFIG_NAME} is missing") from None
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise AdapterError(f"{config_path} must describe a LoRA adapter (peft_type LORA), got {kind!r}")
    try:
        settings = LoraSettings(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                                targets=_targets_of(raw.get("target_modules")))
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"{config_path}: {e}") from None
    unsupported = {k: raw[k] for k in ("use_dora", "use_rslora", "lora_bias") if raw.get(k)}
    patterns = raw.get("rank_pattern") or raw.get("alpha_pattern")
    if raw.get("bias", "none") != "none" or unsupported or patterns:
        raise AdapterError(
            f"{config_path} uses peft options this loader does not apply ({unsupported or 'bias/patterns'}); "
            "only plain LoRA with one rank and alpha is supported"
        )
    shape = (raw.get("auto_mapping") or {}).get("base_model_shape")

    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(weights_path):
        try:
            state = load_file(weights_path)
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"cannot read {weights_path}: {e}") from e
    elif os.path.isfile(os.path.join(directory, LEGACY_WEIGHTS_NAME)):
        weights_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
        state = _torch_load(weights_path)
    else:
        raise AdapterError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state = {key.removeprefix(PEFT_PREFIX): value.float() for key, value in state.items()}
    for key in state:
        _module_of(key, weights_path)
    return settings, state, shape


def _targets_of(target_modules: Any) -> tuple[str, ...]:
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a list of module names, got {target_modules!r}")
    return tuple(sorted(target_modules))


def _read_cpm_bee_delta(path: str) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    state = {}
    for key, value in _torch_load(path).items():
        suffix = next((s for s in _DELTA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise AdapterError(
                f"unexpected key {key!r} in CPM-Bee delta file {path}: expected '<module>.lora.lora_A' or "
                "'<module>.lora.lora_B'"
            )
        state[key[: -len(suffix)] + _DELTA_SUFFIXES[suffix]] = value.float()
    ranks = [v.shape[0] for k, v in state.items() if k.endswith(_A) and v.dim() == 2]
    ranks += [v.shape[1] for k, v in state.items() if k.endswith(_B) and v.dim() == 2]
    if not ranks:
        raise AdapterError(f"CPM-Bee delta file {path} holds no 2-D LoRA weights")
    r = ranks[0]
    targets = tuple(sorted({key[: -len(_A)].rsplit(".", 1)[-1] for key in state if key.endswith(_A)}))
    return LoraSettings(r=r, alpha=CPM_BEE_DELTA_ALPHA, targets=targets), state


def _read(path: str | os.PathLike,
          ) -> tuple[LoraSettings, dict[str, torch.Tensor], dict[str, int] | None, bool]:
    """Settings, state dict, recorded base shape and whether alpha was recorded."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return (*_read_peft_dir(path), True)
    if os.path.isfile(path):
        return (*_read_cpm_bee_delta(path), None, False)
    raise AdapterError(
        f"adapter not found: {path}; pass a peft adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME}) or a "
        "CPM-Bee *-delta-best.pt file"
    )


def _compare_shape(path: str, shape: dict[str, int], config: CPMBeeConfig) -> None:
    diffs = {k: (v, getattr(config, k, None)) for k, v in shape.items() if getattr(config, k, None) != v}
    if diffs:
        detail = ", ".join(f"{k}: adapter {a} vs model {m}" for k, (a, m) in sorted(diffs.items()))
        raise AdapterError(f"adapter {path} was trained for another model shape ({detail})")


def check_base_shape(path: str | os.PathLike, config: CPMBeeConfig) -> None:
    """Refuse the adapter at ``path`` for a base of ``config``'s shape if it recorded another base shape
    (peft directories written here do; an original delta file records none and is checked key by key)."""
    _, _, shape, _ = _read(path)
    if shape is not None:
        _compare_shape(os.fspath(path), shape, config)


def read_adapter(path: str | os.PathLike) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """Read an adapter without a model: its settings and its LoRA state dict (peft keys, fp32).

    ``path`` is a peft adapter directory or an original CPM-Bee delta ``.pt`` (whose alpha is taken
    as CPM-Bee's 16, since the file does not record it).
    """
    settings, state, _, _ = _read(path)
    _check_pairs(state, os.fspath(path), r=settings.r)
    return settings, state


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapter weights into ``model``, adding LoRA layers from the file's settings if it has none.

    Strict: the file's rank, alpha (when recorded), targets, base shape and every key and shape must
    match the model's LoRA; any difference raises :class:`AdapterError` naming the key and file.
    """
    path = os.fspath(path)
    settings, state, shape, alpha_known = _read(path)
    # Before any LoRA layer is built: the claimed rank must be what the weights hold, so a config
    # claiming a huge r cannot make add_lora allocate r x dim per module.
    for key, value in state.items():
        rank = value.shape[0] if key.endswith(_A) else value.shape[-1]
        if value.dim() != 2 or rank != settings.r or 0 in value.shape:
            raise AdapterError(f"{key!r} in {path} has shape {list(value.shape)} but the adapter config says "
                               f"r={settings.r}: expected A [{settings.r}, dim_in], B [dim_out, {settings.r}]")
    config = getattr(model, "config", None)
    if shape is not None and isinstance(config, CPMBeeConfig):
        _compare_shape(path, shape, config)
    if not lora_layers(model):
        add_lora(model, settings)
    else:
        current = LoraSettings.from_peft_config(model.peft_config[ADAPTER_NAME])
        wrong = [(name, mine, theirs) for name, mine, theirs in (
            ("r", current.r, settings.r),
            ("alpha", current.alpha, settings.alpha if alpha_known else current.alpha),
            ("targets", sorted(current.targets), sorted(settings.targets)),
        ) if mine != theirs]
        if wrong:
            detail = ", ".join(f"{name}: model {mine} vs adapter {theirs}" for name, mine, theirs in wrong)
            raise AdapterError(f"adapter {path} does not match the model's LoRA settings ({detail})")

    params = lora_parameters(model)
    for key, param in params.items():
        if key not in state:
            raise AdapterError(f"adapter key {key!r} (shape {list(param.shape)}) is missing in {path}")
        if state[key].shape != param.shape:
            raise AdapterError(
                f"adapter key {key!r} in {path} has shape {list(state[key].shape)}, the model expects "
                f"{list(param.shape)}"
            )
    extra = sorted(set(state) - set(params))
    if extra:
        raise AdapterError(
            f"adapter {path} has {len(extra)} key(s) the model has no LoRA module for, e.g. {extra[0]!r}; "
            "it was probably trained on another model shape or with other targets"
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])
    return model


class LoraDelta:
    """Weight-space delta of an adapter, per dense base key: the ``delta_fn`` of a streamed export.

    ``delta(key)`` is ``(alpha/r) * sqrt(dim_in) * B @ A`` (fp32 ``[dim_out, dim_in]``) for
    ``key = "<module>.weight"`` of an adapted module, else ``None``. ``dim_in`` is A's second
    dimension, which is the base Linear's ``dim_in`` whose ``1/sqrt(dim_in)`` output scaling the
    factor undoes. ``weight_keys`` lists every key that must receive a delta, so a caller can check
    that the whole adapter was merged.
    """

    def __init__(self, adapter_state_dict: Mapping[str, torch.Tensor], settings: LoraSettings,
                 source: str = "the adapter state dict"):
        _check_pairs(adapter_state_dict, source, r=settings.r)
        self.settings = settings
        self._state = dict(adapter_state_dict)
        self.weight_keys = sorted(key[: -len(_A)] + ".weight" for key in self._state if key.endswith(_A))

    def __call__(self, key: str) -> torch.Tensor | None:
        module = key.removesuffix(".weight")
        if module == key or module + _A not in self._state:
            return None
        return lora_delta(self._state[module + _A], self._state[module + _B], self.settings.scaling)


def merge_lora_into_state_dict(base_state_dict: Mapping[str, torch.Tensor],
                               adapter_state_dict: Mapping[str, torch.Tensor],
                               settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Return a copy of a dense base state dict with the adapter folded in (for export).

    ``W' = W + (alpha/r) * sqrt(dim_in) * B @ A`` per adapted module (:class:`LoraDelta`), summed in
    fp32 (a non-finite sum raises ``MergeError``) and stored in W's dtype. Every adapted module needs
    a dense ``<module>.weight`` of shape ``[dim_out, dim_in]``; a packed 4-bit weight is refused
    (dequantize first).
    """
    delta = LoraDelta(adapter_state_dict, settings)
    merged = dict(base_state_dict)
    for key in delta.weight_keys:
        if key not in base_state_dict:
            raise AdapterError(f"the adapter has no dense base weight {key!r} to merge into")
        weight, update = base_state_dict[key], delta(key)
        if weight.dtype == torch.uint8 or weight.shape != update.shape:
            raise AdapterError(
                f"base weight {key!r} has shape {list(weight.shape)} ({weight.dtype}); the adapter needs a "
                f"dense {list(update.shape)} weight (dequantize a 4-bit checkpoint first)"
            )
        merged[key] = merge_in_fp32(weight, update, f"the adapter into {key!r}").to(weight.dtype)
    return merged
