"""The compressed checkpoints of CPM-Bee's "qlora" pull request (OpenBMB/CPM-Bee a51dd68).

Its ``quantize_state_dict.py`` pickles ``{"state_dict": ..., "quant_state_dict": ...}`` with
``torch.save``: ``state_dict`` holds every tensor, the seven projections replaced by packed 4-bit data
(``Params4bit``: uint8 ``[(n + 1) // 2, 1]``, NF4, double quantization, blocksize 64, quantized from
``weight.half()``), and ``quant_state_dict`` maps those keys to bitsandbytes' quantization state. The
state's layout depends on the bitsandbytes that wrote it:

    0.39:  [absmax, shape, dtype, blocksize, [offset, state2], quant_type]
           state2 = [nested_absmax, nested_code, nested_blocksize, False, None, None]
    0.40:  the same plus the 4-bit code table as a 7th entry; state2 gains its dtype as 5th entry
    0.41+: a ``bitsandbytes.functional.QuantState`` object (absmax, shape, code, dtype, blocksize,
           quant_type, offset, state2)

(``None`` in place of ``[offset, state2]`` without double quantization.) The file is read with
``torch.load(weights_only=True)`` and :data:`SAFE_GLOBALS` added to its allow-list: bitsandbytes'
``QuantState`` is rebuilt from plain attributes (its ``__init__`` is not even called), any other
class or function in the pickle is refused before anything runs. :func:`convert` turns the content
into this project's entries (:mod:`cpm_live.quant.format`), taking the packed bytes as they are, so
the result is bit-identical to quantizing the same fp16 weights with ``cpm-bee-quantize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bitsandbytes.functional as bnbF
import torch

from cpm_live.errors import PRCheckpointError, QuantFormatError
from cpm_live.quant import format as qformat

SAFE_GLOBALS = [bnbF.QuantState]
STATE_KEY, QUANT_KEY = "state_dict", "quant_state_dict"


def is_pr_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and set(obj) == {STATE_KEY, QUANT_KEY}


def _fail(path: str, key: str, what: str) -> PRCheckpointError:
    return PRCheckpointError(f"{path}: quant state of {key} {what}; it is not a file written by the qlora "
                             f"PR's quantize_state_dict.py: re-quantize the fp16 checkpoint with cpm-bee-quantize")


def _fields(key: str, raw: Any, path: str) -> dict[str, Any]:
    """The quantization state's fields, from any of the three layouts."""
    if isinstance(raw, bnbF.QuantState):
        attrs = vars(raw)
        fields = {name: attrs.get(name) for name in ("absmax", "shape", "dtype", "blocksize", "quant_type",
                                                     "offset")}
        nested = attrs.get("state2")
        if nested is not None:
            if not isinstance(nested, bnbF.QuantState):
                raise _fail(path, key, f"has a nested state of type {type(nested).__name__}")
            inner = vars(nested)
            fields.update(nested_absmax=inner.get("absmax"), nested_code=inner.get("code"),
                          nested_blocksize=inner.get("blocksize"))
        return fields
    if not isinstance(raw, (list, tuple)) or len(raw) not in (6, 7):
        raise _fail(path, key, f"is a {type(raw).__name__}, not a QuantState or its 6/7-entry list")
    absmax, shape, dtype, blocksize, compressed, quant_type = raw[:6]
    fields = {"absmax": absmax, "shape": shape, "dtype": dtype, "blocksize": blocksize, "quant_type": quant_type,
              "offset": None}
    if compressed is not None:
        if not isinstance(compressed, (list, tuple)) or len(compressed) != 2 \
                or not isinstance(compressed[1], (list, tuple)) or len(compressed[1]) < 3:
            raise _fail(path, key, "has a malformed [offset, state2] entry")
        offset, state2 = compressed
        fields.update(offset=offset, nested_absmax=state2[0], nested_code=state2[1], nested_blocksize=state2[2])
    return fields


def quant_state(key: str, raw: Any, path: str) -> bnbF.QuantState:
    """A fresh ``QuantState`` (current bitsandbytes) from a state in any of the PR-era layouts."""
    f = _fields(key, raw, path)
    double = f["offset"] is not None
    checks = {
        "absmax": isinstance(f["absmax"], torch.Tensor),
        "shape": isinstance(f["shape"], (torch.Size, list, tuple)) and all(isinstance(n, int) for n in f["shape"]),
        "dtype": isinstance(f["dtype"], torch.dtype) and f["dtype"].is_floating_point,
        "blocksize": isinstance(f["blocksize"], int) and f["blocksize"] in qformat.BLOCKSIZES,
        "quant_type": f["quant_type"] in qformat.QUANT_TYPES,
    }
    if double:
        checks.update(offset=isinstance(f["offset"], torch.Tensor) and f["offset"].numel() == 1,
                      nested_absmax=isinstance(f.get("nested_absmax"), torch.Tensor),
                      nested_code=isinstance(f.get("nested_code"), torch.Tensor),
                      nested_blocksize=isinstance(f.get("nested_blocksize"), int))
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise _fail(path, key, f"has invalid {', '.join(bad)} ({', '.join(repr(f.get(b))[:60] for b in bad)})")
    state2 = None
    if double:
        state2 = bnbF.QuantState(absmax=f["nested_absmax"], code=f["nested_code"],
                                 blocksize=f["nested_blocksize"], dtype=torch.float32)
    return bnbF.QuantState(
        absmax=f["absmax"], shape=torch.Size(f["shape"]), blocksize=f["blocksize"], quant_type=f["quant_type"],
        # 0.39 did not store the 16 levels; they are bitsandbytes' fixed table for the quant type.
        code=bnbF.get_4bit_type(f["quant_type"], device="cpu"), dtype=f["dtype"],
        offset=f["offset"].reshape(()).float() if double else None, state2=state2,
    )


def convert(obj: Mapping[str, Any], path: str) -> tuple[dict[str, torch.Tensor], qformat.QuantSettings,
                                                       dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """``(entries, settings, originals)``: every tensor in this project's compressed layout, the quant
    settings (one for all weights) and each quantized weight's original ``(shape, dtype)``."""
    state, quant = obj[STATE_KEY], obj[QUANT_KEY]
    if not isinstance(state, Mapping) or not isinstance(quant, Mapping):
        raise PRCheckpointError(f"{path}: state_dict and quant_state_dict must be dicts")
    orphans = [k for k in quant if k not in state]
    if orphans:
        raise PRCheckpointError(f"{path}: quant_state_dict has keys {orphans[:3]} that state_dict lacks")
    entries: dict[str, torch.Tensor] = {}
    originals: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    settings = None
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PRCheckpointError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        data = value.detach()
        raw = quant.get(key, getattr(value, "quant_state", None))
        if raw is None:
            entries[key] = data
            continue
        qs = quant_state(key, raw, path)
        these = qformat.QuantSettings(qs.quant_type, qs.nested, qs.blocksize)
        if settings is None:
            settings = these
        elif these != settings:
            raise PRCheckpointError(f"{path}: {key} was quantized with {these.describe()} but other weights "
                                    f"with {settings.describe()}; a checkpoint must use one setting")
        packed = qformat.pack(key, data, qs)
        try:
            qformat.validate(key, packed, settings, tuple(qs.shape), "the file is damaged")
        except QuantFormatError as e:
            raise PRCheckpointError(f"{path}: {e}") from None
        entries.update(packed)
        originals[key] = (tuple(qs.shape), qs.dtype)
    if settings is None:
        raise PRCheckpointError(f"{path}: quant_state_dict is empty: no weight is quantized")
    return entries, settings, originals
