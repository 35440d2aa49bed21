"""The 4-bit format: one weight quantized exactly as ``bitsandbytes.functional.quantize_4bit`` does.

A quantized weight ``K`` (``[dim_out, dim_in]``) is stored as the tensors that
``QuantState.as_dict(packed=True)`` produces, under ``K.<field>``::

    K                                   uint8 [(n + 1) // 2, 1]   two 4-bit codes per byte
    K.absmax                            fp32 [blocks]  (uint8 [blocks] when double-quantized)
    K.quant_map                         fp32 [16]      the NF4 / FP4 levels
    K.nested_absmax                     fp32 [ceil(blocks / 256)]       double quant only
    K.nested_quant_map                  fp32 [256]                      double quant only
    K.quant_state.bitsandbytes__nf4     uint8 JSON: quant_type, blocksize, dtype, shape
                                        (+ nested_blocksize, nested_dtype, nested_offset)

so ``QuantState.from_dict`` reads it back. Quantization runs bitsandbytes' own kernel (on CPU, or
CUDA when the tensor is there) on parts of a weight, a whole number of blocks each, and joins them
as ``quantize_4bit`` does, so the bytes equal ``quantize_4bit``'s (tested); parts are faster (the
kernel's temporaries stay in cache) and let several threads share one weight.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.utils import unpack_tensor_to_dict

from cpm_live.errors import ConfigError, QuantFormatError
from cpm_live.quant.dequant import dequantize_4bit

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# quantize_4bit double-quantizes absmax with 8-bit blocks of 256 (fp32 nested absmax); fixed in bnb.
NESTED_BLOCKSIZE = 256
BLOB_PREFIX = "quant_state.bitsandbytes__"


@dataclass(frozen=True)
class QuantSettings:
    """How weights are quantized: the three choices a compressed checkpoint must agree on."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"double_quant must be a bool, got {self.double_quant!r}")

    @property
    def blob_suffix(self) -> str:
        return BLOB_PREFIX + self.quant_type

    def describe(self) -> str:
        return f"{self.quant_type}, blocksize {self.blocksize}, double_quant {self.double_quant}"


Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def tensor_layout(shape: tuple[int, ...], settings: QuantSettings) -> Layout:
    """Shape and dtype of each fixed-size tensor of one quantized weight, by suffix ("" = packed data).

    The JSON blob is left out: its length depends on the printed nested offset.
    """
    n = math.prod(shape)
    blocks = -(-n // settings.blocksize)
    layout = {
        "": (((n + 1) // 2, 1), torch.uint8),
        ".absmax": ((blocks,), torch.uint8 if settings.double_quant else torch.float32),
        ".quant_map": ((16,), torch.float32),
    }
    if settings.double_quant:
        layout[".nested_absmax"] = ((-(-blocks // NESTED_BLOCKSIZE),), torch.float32)
        layout[".nested_quant_map"] = ((256,), torch.float32)
    return layout


def entry_keys(key: str, settings: QuantSettings) -> list[str]:
    """Every state-dict key of quantized weight ``key`` under ``settings``."""
    return [key + suffix for suffix in tensor_layout((1, 1), settings)] + [f"{key}.{settings.blob_suffix}"]


def quantized_bytes(shape: tuple[int, ...], settings: QuantSettings, blob_bytes: int = 0) -> int:
    """Bytes one weight takes in the compressed format (fixed tensors + ``blob_bytes``)."""
    layout = tensor_layout(shape, settings).values()
    return blob_bytes + sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in layout)


# Elements per part when one weight is quantized in parts: small enough that the kernel's fp32
# temporaries stay in cache (benchmarks/README.md has the timings of a whole 10B projection vs its
# parts) and that the parts of one weight keep every worker busy.
PART_ELEMENTS = 1 << 20


def part_ranges(numel: int, settings: QuantSettings, part_elements: int | None = None) -> list[tuple[int, int]]:
    """Flat ``[start, stop)`` ranges of about ``part_elements`` (default :data:`PART_ELEMENTS`) covering
    ``numel`` elements, each a whole number of blocks (only the last may end in a partial block), so
    their quantized parts concatenate to the whole."""
    part_elements = part_elements or PART_ELEMENTS
    step = max(settings.blocksize, part_elements // settings.blocksize * settings.blocksize)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)] or [(0, 0)]


def quantize_part(flat: torch.Tensor, settings: QuantSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes (at byte ``start // 2`` of the whole) and fp32 absmax of one range ``[start, stop)``
    of :func:`part_ranges`: bnb's kernel, without the double quantization."""
    return torch.ops.bitsandbytes.quantize_4bit.default(flat.contiguous(), settings.blocksize,
                                                        settings.quant_type, torch.uint8)


def join_absmax(parts: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype,
                settings: QuantSettings) -> bnbF.QuantState:
    """The ``QuantState`` of a whole weight from the absmax of its parts in order (their packed bytes
    just concatenate): ``quantize_4bit``'s double quantization over the whole absmax, bit for bit
    (tests/unit/quant/test_format.py holds :func:`quantize` equal to ``quantize_4bit``)."""
    absmax = torch.cat(parts) if len(parts) > 1 else parts[0]
    code = bnbF.get_4bit_type(settings.quant_type, device=absmax.device)
    if not settings.double_quant:
        return bnbF.QuantState(absmax=absmax, shape=shape, dtype=dtype, blocksize=settings.blocksize,
                               code=code, quant_type=settings.quant_type)
    offset = absmax.mean()
    nested, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return bnbF.QuantState(absmax=nested, shape=shape, dtype=dtype, blocksize=settings.blocksize,
                           code=code, quant_type=settings.quant_type, offset=offset, state2=state2)


def quantize(weight: torch.Tensor, settings: QuantSettings) -> tuple[torch.Tensor, bnbF.QuantState]:
    """Packed uint8 data and ``QuantState`` of ``weight``, on ``weight``'s device: bitsandbytes'
    ``quantize_4bit``, bit for bit, run on parts of the weight (:func:`part_ranges`)."""
    check_dtype(weight)
    flat = weight.contiguous().reshape(-1)
    parts = [quantize_part(flat[start:stop], settings) for start, stop in part_ranges(flat.numel(), settings)]
    packed = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
    return packed, join_absmax([a for _, a in parts], weight.shape, weight.dtype, settings)


def check_dtype(weight: torch.Tensor) -> None:
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QuantFormatError(f"can only quantize fp16/bf16/fp32 weights, got {weight.dtype}")


def pack(key: str, packed: torch.Tensor, state: bnbF.QuantState) -> dict[str, torch.Tensor]:
    """The state-dict entries of one quantized weight: ``key`` plus ``key.<as_dict(packed=True) field>``."""
    entries = {key: packed}
    entries.update({f"{key}.{field}": value for field, value in state.as_dict(packed=True).items()})
    return entries


def quantize_entries(key: str, weight: torch.Tensor, settings: QuantSettings) -> dict[str, torch.Tensor]:
    return pack(key, *quantize(weight, settings))


def blob_key(key: str, entries: Mapping[str, object]) -> str | None:
    """The ``key.quant_state.bitsandbytes__*`` entry of weight ``key`` (any quant type), if present."""
    prefix = f"{key}.{BLOB_PREFIX}"
    found = [k for k in entries if k.startswith(prefix)]
    if len(found) > 1:
        raise QuantFormatError(f"weight {key} has more than one quant-state entry: {sorted(found)}")
    return found[0] if found else None


def read_blob(key: str, blob: torch.Tensor) -> dict:
    """Decode the packed JSON quant-state tensor stored under ``key``."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise QuantFormatError(f"{key} must be 1-D uint8 JSON bytes, got {blob.dtype} {list(blob.shape)}")
    try:
        state = unpack_tensor_to_dict(blob)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise QuantFormatError(f"{key} is not quant-state JSON ({e}); the checkpoint is corrupt") from None
    shape = state.get("shape") if isinstance(state, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise QuantFormatError(f"{key} records shape {shape!r}, not a list of non-negative integers; the "
                               "checkpoint is corrupt: re-create it with cpm-bee-quantize")
    return state


def logical_shape(key: str, entries: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The dense ``[dim_out, dim_in]`` shape that quantized weight ``key`` stands for."""
    bkey = blob_key(key, entries)
    if bkey is None:
        raise QuantFormatError(f"{key} has no {key}.{BLOB_PREFIX}nf4|fp4 entry")
    return tuple(read_blob(bkey, entries[bkey])["shape"])


def validate(key: str, entries: Mapping[str, torch.Tensor], settings: QuantSettings, shape: tuple[int, ...],
             hint: str) -> dict:
    """Check every entry of quantized weight ``key`` against ``settings`` and dense ``shape``.

    ``entries`` maps full keys to tensors and may hold other keys; those under ``key.`` must be exactly
    the layout's. Raises :class:`QuantFormatError` naming the key, the values and ``hint`` (the fix).
    Returns the decoded quant-state JSON.
    """
    want = f"{key}.{settings.blob_suffix}"
    bkey = blob_key(key, entries)
    if bkey is None:
        raise QuantFormatError(f"missing {want}: the checkpoint holds no 4-bit weight for {key}; {hint}")
    blob = read_blob(bkey, entries[bkey])
    found = {
        "quant_type": blob.get("quant_type"), "blocksize": blob.get("blocksize"),
        "double_quant": "nested_offset" in blob,
    }
    expected = {"quant_type": settings.quant_type, "blocksize": settings.blocksize,
                "double_quant": settings.double_quant}
    if bkey != want or found != expected:
        raise QuantFormatError(
            f"{bkey} was quantized with quant_type={found['quant_type']}, blocksize={found['blocksize']}, "
            f"double_quant={found['double_quant']} but this model expects quant_type={settings.quant_type}, "
            f"blocksize={settings.blocksize}, double_quant={settings.double_quant}; {hint}"
        )
    if tuple(blob.get("shape") or ()) != tuple(shape):
        raise QuantFormatError(f"{bkey} has shape {blob.get('shape')}, the model needs {list(shape)}; {hint}")
    nested = (blob.get("nested_blocksize"), blob.get("nested_dtype"))
    if settings.double_quant and nested != (NESTED_BLOCKSIZE, "float32"):
        raise QuantFormatError(
            f"{bkey} has nested_blocksize={nested[0]}, nested_dtype={nested[1]}; "
            f"bitsandbytes' 4-bit matmul needs {NESTED_BLOCKSIZE} and float32; re-quantize the checkpoint"
        )
    layout = tensor_layout(shape, settings)
    for suffix, (want_shape, want_dtype) in layout.items():
        name = key + suffix
        if name not in entries:
            raise QuantFormatError(f"missing {name} (needed by {bkey}); {hint}")
        tensor = entries[name]
        if tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise QuantFormatError(
                f"{name} is {tensor.dtype} {list(tensor.shape)} but a {settings.describe()} weight of shape "
                f"{list(shape)} needs {want_dtype} {list(want_shape)}; {hint}"
            )
    extra = sorted(k for k in entries if k.startswith(key + ".") and k != bkey and k[len(key):] not in layout)
    if extra:
        raise QuantFormatError(f"unexpected entries {extra} for a {settings.describe()} weight {key}; {hint}")
    quant_map = entries[key + ".quant_map"]  # a buffer: never sharded, so a plain tensor here
    reference = bnbF.get_4bit_type(settings.quant_type, device=quant_map.device)
    if quant_map.device.type != "meta" and not torch.equal(quant_map, reference):
        # bnb's 4-bit matmul reads the levels from quant_type, not quant_map; a different map would
        # make dequantize() and forward disagree.
        raise QuantFormatError(f"{key}.quant_map is not bitsandbytes' {settings.quant_type} table; {hint}")
    return blob


def quant_state(key: str, entries: Mapping[str, torch.Tensor], device: torch.device | str | None = None
                ) -> bnbF.QuantState:
    """Rebuild bitsandbytes' ``QuantState`` of weight ``key`` with ``QuantState.from_dict``."""
    fields = {k[len(key) + 1:]: v for k, v in entries.items() if k.startswith(key + ".")}
    if device is None:
        device = entries[key].device
    return bnbF.QuantState.from_dict(fields, device=torch.device(device))


def dequantize(key: str, entries: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """Dense ``[dim_out, dim_in]`` weight of quantized ``key``, in ``dtype`` (default: the stored one).

    Values are ``level * absmax`` computed in fp32 and cast once, so fp32 output is exact.
    """
    return dequantize_4bit(entries[key], quant_state(key, entries), dtype)


FORMAT_NAME = "cpm_live.int4"
FORMAT_VERSION = 1


def checkpoint_metadata(settings: QuantSettings, compute_dtype: str, source: str,
                        weights: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, str]:
    """The ``__metadata__`` of a compressed checkpoint: settings plus each weight's original dtype/shape."""
    originals = {key: {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
                 for key, (shape, dtype) in weights.items()}
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "quant_type": settings.quant_type,
        "blocksize": str(settings.blocksize),
        "double_quant": "true" if settings.double_quant else "false",
        "compute_dtype": compute_dtype,
        "source": source,
        "weights": json.dumps(originals, separators=(",", ":")),
    }


def has_format(metadata: Mapping[str, str], name: str, max_version: int, path: str) -> bool:
    """Whether ``metadata`` says format ``name``; a version this cpm_live cannot read is an error."""
    if metadata.get("format") != name:
        return False
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > max_version:
        raise QuantFormatError(f"{path} has {name} format version {version!r}; this cpm_live reads up to "
                               f"{max_version}: upgrade cpm_live")
    return True


def settings_from_metadata(metadata: Mapping[str, str], path: str) -> QuantSettings | None:
    """The settings a compressed checkpoint records, or None if ``metadata`` is not ours."""
    if not has_format(metadata, FORMAT_NAME, FORMAT_VERSION, path):
        return None
    try:
        return QuantSettings(metadata["quant_type"], metadata["double_quant"] == "true",
                             int(metadata["blocksize"]))
    except (KeyError, ValueError) as e:
        raise QuantFormatError(f"{path} has invalid int4 metadata ({e}); re-create it with cpm-bee-quantize"
                               ) from None


_SUBENTRIES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def logical_shapes(shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], torch.Tensor]
                   ) -> dict[str, tuple[int, ...]]:
    """Collapse each quantized weight's entries into its key with the dense shape it stands for.

    ``shapes`` maps every stored key to its stored shape; ``read(key)`` returns a stored tensor (only
    the small quant-state blobs are read). The result is in CPM-Bee's original key layout, so a
    compressed and a dense checkpoint (or model) compare key for key.
    """
    marker = "." + BLOB_PREFIX
    blobs = {k[:k.index(marker)]: k for k in shapes if marker in k}
    out = {}
    for key, shape in shapes.items():
        if key in blobs:
            out[key] = tuple(read_blob(blobs[key], read(blobs[key]))["shape"])
        elif marker in key or any(key.endswith(s) and key[:-len(s)] in blobs for s in _SUBENTRIES):
            continue
        else:
            out[key] = tuple(shape)
    return out
