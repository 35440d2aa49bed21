"""Load a checkpoint into a CPM-Bee model, after checking it fits: the loader every command uses.

Loading pairs model and checkpoint as follows (:func:`load_model_weights`):

    model   checkpoint   action
    fp      fp           strict load
    int4    int4         check quant settings against the config, strict load
    int8    int8         strict load (bitsandbytes' Linear8bitLt layout: weight, SCB, weight_format)
    int4/8  fp           quantize each projection on the fly (bit-identical to cpm-bee-quantize), load
    other   int4/int8    error: set "int4"/"int8": true in the config, or export the checkpoint to fp16
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import chain

import torch
from torch import nn

from cpm_live.checkpoint.readers import CheckpointReader, open_checkpoint
from cpm_live.config import CPMBeeConfig
from cpm_live.errors import CheckpointError, QuantFormatError
from cpm_live.layers.linear4bit import Linear4bit
from cpm_live.layers.linear_factory import quantized_layers
from cpm_live.models.bee import CPMBee
from cpm_live.quant import format as qformat
from cpm_live.quant import int8 as qint8
from cpm_live.utils import key_mismatch


def check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], path: str,
               where: str) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys (dense shapes), in one line."""
    mismatch = key_mismatch(found, expected, found_shapes=found, expected_shapes=expected)
    if not mismatch:
        return
    raise CheckpointError(f"{path} does not match the model built from {where}: {'; '.join(mismatch)}. Fix: "
                          f"use the model config this checkpoint was made with (vocab_size, dim_model, num_heads, "
                          f"dim_head, dim_ff, num_layers, mask_modules in {where}), or a checkpoint that fits it")


def _check_dtype(key: str, stored: torch.dtype, wanted: torch.dtype | None, path: str) -> None:
    """Only float-to-float casts are conversions; anything else (a packed uint8 weight stored as
    F8_E4M3 or BOOL, a float where bytes belong) would silently turn the bits into other values."""
    if wanted is None or stored == wanted or (stored.is_floating_point and wanted.is_floating_point):
        return
    raise CheckpointError(f"{path}: {key} is stored as {stored} but the model needs {wanted}; the file is "
                          f"corrupt or was altered: re-create it (cpm-bee-quantize for 4-bit weights)")


def check_checkpoint(reader: CheckpointReader, model: nn.Module, config: CPMBeeConfig) -> None:
    """Refuse ``reader``'s checkpoint for ``model`` (built from ``config``, on the meta device is fine)
    before any weight data is read: the quantization kind and int4 settings against the config, the keys
    and dense shapes, every stored tensor's dtype, and each 4-bit or int8 weight's stored layout and
    quant state, checked by its layer (``validate_entries``). Only tensors of at most
    ``_PEEK_BYTES`` (quant-state JSON, code tables, ``weight_format``) are read; larger ones are
    checked by shape and dtype. ``load_model_weights`` and ``cpm-bee-export`` both start with it.
    """
    path, where = reader.path, config.source or "the model config"
    kind = reader.quant_kind
    wanted_kind = config.quantization.kind if config.quantization is not None else None
    if kind is not None and kind != wanted_kind:
        now = f'"{wanted_kind}": true' if wanted_kind else "no quantization"
        raise CheckpointError(
            f'this checkpoint is {kind}-compressed: set "{kind}": true in {where} (it has {now}; or pass '
            f"`{kind}`) to use it, or export it first: cpm-bee-export --model-config {where} "
            f"--load {path} --{kind} --output model.pt --dtype fp16"
        )
    settings = reader.quant_settings
    wanted = qformat.QuantSettings(**config.quant_settings)
    if settings is not None and settings != wanted:
        raise CheckpointError(
            f"{path} was quantized with {settings.describe()} but {where} asks for {wanted.describe()}: "
            f'set "int4_quant_type": "{settings.quant_type}", "int4_blocksize": {settings.blocksize}, '
            f'"int4_double_quant": {str(settings.double_quant).lower()} in {where}, or re-quantize the '
            f"fp16 checkpoint with those settings"
        )
    current = model.state_dict(keep_vars=True)
    check_keys(reader.logical_shapes(), qint8.logical_shapes(qformat.logical_shapes(
        {k: tuple(v.shape) for k, v in current.items()}, current.__getitem__)), path, where)
    layers = quantized_layers(model)
    for key in reader.keys():
        # A dense checkpoint's weight for a quantized layer is quantized on load: it must be dense.
        dense_for = layers.get(key) if kind is None else None
        want = dense_for.dtype if dense_for is not None else current[key].dtype if key in current else None
        _check_dtype(key, reader.info(key)[1], want, path)
    if kind is None:
        return
    for key, layer in layers.items():
        prefix = key[:-len("weight")]
        entries = {k: _peek(reader, k) for k in reader.keys() if k.startswith(prefix)}
        try:
            layer.validate_entries(key, entries)
        except QuantFormatError as e:
            raise CheckpointError(f"{path}: {e} (model config: {where})") from None


_PEEK_BYTES = 4096


def _peek(reader: CheckpointReader, key: str) -> torch.Tensor:
    """``key``'s tensor when it is small, else an empty meta tensor of its shape and dtype."""
    if reader.nbytes(key) <= _PEEK_BYTES:
        return reader.read(key)
    return torch.empty(reader.info(key)[0], dtype=reader.info(key)[1], device="meta")


# Small float tensors that every token's computation reads: one NaN there turns every answer into
# garbage (``<unk>``), so the loader checks them (a pass over the embedding and the quantization scales,
# not over the dense weights).
_FEEDS_EVERY_TOKEN = ("input_embedding.weight", "weight_absmax", "weight_nested_absmax", "weight_nested_offset",
                      "SCB")


def check_finite(path: str, key: str, tensor: torch.Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or inf: a converted copy would keep them."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: {key} holds NaN or inf values; the checkpoint is damaged: fix it or "
                              f"re-create it from a good copy")


def build_model(config: CPMBeeConfig, path: str | os.PathLike, device: torch.device | str = "cpu") -> CPMBee:
    """``CPMBee(config)`` with the weights of ``path``: built on the meta device, then filled by
    :func:`load_model_weights`, so no memory goes to (and no 4-bit quantization to) a random init.

    An ``auto`` int4 compute dtype is chosen for ``device`` first: under the meta device it would be
    chosen for meta (fp32), and a bf16-capable CPU would then decode in fp32."""
    config = config.resolve_compute_dtype(device)
    with torch.device("meta"):
        model = CPMBee(config)
    load_model_weights(model, config, path, device=device)
    return model


def load_model_weights(model: nn.Module, config: CPMBeeConfig, path: str | os.PathLike,
                       device: torch.device | str = "cpu") -> None:
    """Load a checkpoint into ``model`` (built from ``config``), strictly; see the module docstring.

    A model built on the meta device (``with torch.device("meta"): CPMBee(config)``: no memory, and
    no random weights quantized at construction) gets the loaded tensors assigned on ``device``.
    Call before wrapping the model in an engine: parameters must still be plain tensors.
    """
    path = os.fspath(path)
    where = config.source or "the model config"
    with open_checkpoint(path) as reader:
        check_checkpoint(reader, model, config)
        kind = reader.quant_kind
        current = model.state_dict(keep_vars=True)
        on_meta = any(t.is_meta for t in current.values())
        layers = quantized_layers(model)
        quantize_now = {} if kind else layers
        state_dict = {}
        for key, tensor in reader.iter_tensors():
            layer = quantize_now.get(key)
            if layer is None:
                entries = {key: tensor}
            else:
                quant_device = device if on_meta else layer.weight.device
                # Never round the stored weight before quantizing (an fp16 file into a bf16 model: fp32).
                dense = tensor.to(device=quant_device, dtype=torch.promote_types(tensor.dtype, config.dtype))
                entries = (qformat.quantize_entries(key, dense, layer.settings) if isinstance(layer, Linear4bit)
                           else qint8.quantize_entries(key, dense))
            if on_meta:  # assigned, not copied: own the memory, in the model's dtype
                entries = {k: v.to(device=device, dtype=current[k].dtype, copy=True) for k, v in entries.items()}
            state_dict.update(entries)
        try:
            model.load_state_dict(state_dict, strict=True, assign=on_meta)
        except QuantFormatError as e:
            raise CheckpointError(f"{path}: {e} (model config: {where})") from None
    for key, tensor in chain(model.named_parameters(), model.named_buffers()):
        if key.endswith(_FEEDS_EVERY_TOKEN) and not tensor.is_meta:
            check_finite(path, key, tensor)
    left = [k for k, v in chain(model.named_parameters(), model.named_buffers()) if v.is_meta]
    if left:
        raise CheckpointError(f"{left[:5]} are still on the meta device after loading {path}: they are not "
                              f"in the state dict; build the model on a real device instead")
