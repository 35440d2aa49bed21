"""Read CPM-Bee checkpoints safely and load them into a model.

Formats: ``.pt``/``.bin`` (a ``torch.save``d dict of tensors, read with ``weights_only=True``,
memory-mapped), safetensors (dense, or int4-compressed by :mod:`cpm_live.quant`; recognised by its
content whatever the file is called), the pickled int4 checkpoints of CPM-Bee's qlora PR
(:mod:`cpm_live.quant.pr_checkpoint`: bitsandbytes' ``QuantState`` is the one class allowed besides
tensors) and Hugging Face model directories (:mod:`cpm_live.model_dir`: single or sharded files,
``cpmbee.`` key prefix, tied ``lm_head.weight``). Nothing else is unpickled.
:func:`open_checkpoint` gives a reader of any of them that reads one tensor at a time, so tools
that stream (the quantizer, export) hold one tensor, not the model.

Loading pairs model and checkpoint as follows (``load_model_weights``):

    model   checkpoint   action
    fp      fp           strict load
    int4    int4         check quant settings against the config, strict load
    int8    int8         strict load (bitsandbytes' Linear8bitLt layout: weight, SCB, weight_format)
    int4/8  fp           quantize each projection on the fly (bit-identical to cpm-bee-quantize), load
    other   int4/int8    error: set "int4"/"int8": true in the config, or export the checkpoint to fp16
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import pickle
import re
import struct
import sys
from collections.abc import Iterator, Mapping
from itertools import chain

import torch
from torch import nn

from cpm_live import model_dir
from cpm_live.config import CPMBeeConfig
from cpm_live.layers.linear4bit import Linear4bit
from cpm_live.layers.linear_factory import quantized_layers
from cpm_live.models.bee import CPMBee
from cpm_live.quant import format as qformat
from cpm_live.quant import int8 as qint8
from cpm_live.quant import pr_checkpoint
from cpm_live.quant.stream import DTYPE_NAMES, SafetensorsWriter, nbytes
from cpm_live.utils import atomic_path, key_mismatch, non_plain_tensors

_MAX_HEADER = 100_000_000  # safetensors' own limit
_MADV_DONTNEED = 4


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file and the fix."""


class CheckpointReader:
    """Lazy view of a checkpoint: keys, shapes and dtypes up front; tensors read one at a time.

    ``.safetensors`` tensors are read with plain file reads into fresh memory. ``.pt`` files are
    memory-mapped; after a tensor has been consumed through ``iter_tensors`` its pages are handed
    back to the kernel (they are re-read from the file if touched again), so a pass over a large
    checkpoint does not pile the whole file up in resident memory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"checkpoint not found: {self.path}")
        self.metadata: dict[str, str] = {}
        self.origin = "safetensors"
        self._file = None
        self._mapped = False
        self._map: mmap.mmap | None = None
        self._map_base: torch.Tensor | None = None
        if self.path.endswith(".safetensors") or is_safetensors(self.path):
            self._open_safetensors()
        else:
            self.origin = "torch.save"
            self._open_pt()

    def _open_safetensors(self) -> None:
        size = os.path.getsize(self.path)
        self._file = open(self.path, "rb")
        try:
            head = self._file.read(8)
            if len(head) < 8:
                raise ValueError(f"file has {size} bytes, fewer than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
            header = json.loads(self._file.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            if not isinstance(self.metadata, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
                raise ValueError("__metadata__ must map strings to strings")
            for key, entry in header.items():
                shape = entry.get("shape") if isinstance(entry, dict) else None
                if not isinstance(shape, list) or not all(
                        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                    raise ValueError(f"tensor {key} has shape {shape!r}, not a list of non-negative integers")
            self._start = 8 + header_len
            self._infos: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
            self._offsets: dict[str, tuple[int, int]] = {}
            end = 0
            for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                dtype, shape = DTYPE_NAMES[entry["dtype"]], tuple(entry["shape"])
                begin, stop = entry["data_offsets"]
                if begin != end or stop - begin != nbytes(shape, dtype):
                    raise ValueError(f"tensor {key} has inconsistent data_offsets {[begin, stop]}")
                self._infos[key], self._offsets[key], end = (shape, dtype), (begin, stop), stop
            if self._start + end != size:
                raise ValueError(f"tensors need {self._start + end} bytes but the file has {size}")
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            self._file.close()
            raise CheckpointError(
                f"cannot read {self.path}: {e}; the file is truncated or not safetensors: re-download or "
                f"re-create it"
            ) from None

    def _open_pt(self) -> None:
        try:
            # QuantState is allowed for the qlora PR's files; it is rebuilt from plain attributes.
            with torch.serialization.safe_globals(pr_checkpoint.SAFE_GLOBALS):
                try:
                    state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                    self._mapped = True
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    state = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy non-zip file
        except pickle.UnpicklingError as e:
            # torch names the refused class or function as "[Uu]nsupported global: GLOBAL x" or "GLOBAL x whose module".
            found = re.search(r"[Uu]nsupported GLOBAL:? ?(?:GLOBAL )?(\S+)", str(e), re.IGNORECASE)
            if found is None:
                raise CheckpointError(f"cannot read {self.path}: it is not a torch.save state dict; the file is "
                                      f"truncated or corrupt: re-download or re-create it") from None
            raise CheckpointError(
                f"{self.path} holds objects other than tensors ({found.group(1).strip()}), which are refused "
                f"without running any of them: only tensors and bitsandbytes' QuantState (qlora-PR files) are "
                f"read. Save a plain dict of tensors, or re-create the file from the fp16 checkpoint"
            ) from None
        except Exception as e:  # torch.load reports damage as RuntimeError, EOFError, KeyError, ...
            raise CheckpointError(
                f"cannot read {self.path} ({type(e).__name__}: {e}); the file is truncated or corrupt: "
                f"re-download or re-create it"
            ) from None
        if pr_checkpoint.is_pr_checkpoint(state):
            self._open_pr(state)
            return
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{self.path} holds a {type(state).__name__}, not a state dict of tensors")
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            hint = " (a training checkpoint? pass its model state dict)" if "state_dict" in state else ""
            raise CheckpointError(f"{self.path} is not a flat dict of tensors{hint}: entries {bad[:5]}")
        self._tensors = dict(state)
        self._infos = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}

    def _open_pr(self, state: Mapping) -> None:
        """The qlora PR's pickled int4 checkpoint, presented in this project's compressed layout."""
        try:
            tensors, settings, originals = pr_checkpoint.convert(state, self.path)
        except (pr_checkpoint.PRCheckpointError, qformat.QuantFormatError) as e:
            raise CheckpointError(str(e)) from None
        self.origin = "qlora-pr"
        self.metadata = qformat.checkpoint_metadata(settings, "float32", self.path, originals)
        # Some entries are new small tensors, not file pages: nothing may be handed back to the kernel.
        self._mapped = False
        self._tensors = tensors
        self._infos = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._tensors = {}
        self._map_base = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a mapped tensor is still alive: the mapping goes with the last one
                pass

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` of ``key`` without reading its data."""
        return self._infos[key]

    def nbytes(self, key: str) -> int:
        return nbytes(*self._infos[key])

    def read(self, key: str) -> torch.Tensor:
        if self._file is None:
            return self._tensors[key]
        shape, dtype = self._infos[key]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            self._file.seek(self._start + self._offsets[key][0])
            if self._file.readinto(tensor_view(tensor)) != self.nbytes(key):
                raise CheckpointError(f"{self.path} ended while reading {key}: the file is truncated")
        return tensor

    def read_mapped(self, key: str) -> torch.Tensor:
        """``read`` without copying: a view of the file's pages, which are read where the tensor is
        first touched (so threads working on it read in parallel). Hand it to ``release`` when done;
        it must not be used after ``close``. ``.pt`` tensors are mapped already."""
        if self._file is None:
            return self._tensors[key]
        if self._map is None:  # a private mapping: tensors may be written to without touching the file
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self._map_base = torch.frombuffer(self._map, dtype=torch.uint8, count=1)
        shape, dtype = self._infos[key]
        if not self.nbytes(key):
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape),
                                offset=self._start + self._offsets[key][0]).view(shape)

    def release(self, tensor: torch.Tensor) -> None:
        """Say ``tensor`` (from ``read`` or ``read_mapped``) is consumed: its memory-mapped pages may
        leave RAM (tensors read into fresh memory are left alone)."""
        if self._mapped or self._map_base is not None and 0 <= tensor.data_ptr() - self._map_base.data_ptr() \
                < len(self._map):
            _release_pages(tensor)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` in file order, releasing each tensor once the consumer moves on."""
        for key in self._infos:
            tensor = self.read(key)
            yield key, tensor
            self.release(tensor)

    @property
    def quant_settings(self) -> qformat.QuantSettings | None:
        """The settings of an int4-compressed checkpoint (from its metadata), else None."""
        try:
            return qformat.settings_from_metadata(self.metadata, self.path)
        except qformat.QuantFormatError as e:
            raise CheckpointError(str(e)) from None

    def is_compressed(self) -> bool:
        """True for an int4-compressed checkpoint (see :attr:`quant_kind` for int8 too)."""
        return self.quant_settings is not None or any("." + qformat.BLOB_PREFIX in k for k in self._infos)

    @property
    def quant_kind(self) -> str | None:
        """``"int4"``, ``"int8"`` (our metadata, or bitsandbytes' ``SCB`` beside an int8 weight) or None."""
        if self.is_compressed():
            return "int4"
        if qint8.is_int8_metadata(self.metadata, self.path) or any(
                k.endswith("SCB") and self._infos.get(k[:-3] + "weight", ((), None))[1] == torch.int8
                for k in self._infos):
            return "int8"
        return None

    def logical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> dense shape in CPM-Bee's layout (a quantized weight counts as one key)."""
        try:
            shapes = qformat.logical_shapes({k: s for k, (s, _) in self._infos.items()}, self.read)
        except qformat.QuantFormatError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        return qint8.logical_shapes(shapes)


class ModelDirReader(CheckpointReader):
    """A Hugging Face style checkpoint (a model directory, or one file with ``cpmbee.`` keys) seen in
    CPM-Bee's key layout: the prefix stripped, the tied ``lm_head.weight`` dropped after checking it
    equals the embedding. Every shard is opened up front (memory-mapped, or its header read); tensors
    are read one at a time.
    """

    def __init__(self, path: str | os.PathLike, files: list[str] | None = None):
        self.path = os.fspath(path)
        self.origin = "huggingface"
        self.metadata = {}
        self._file = None
        self._mapped = False
        try:
            files, index = (files, None) if files is not None else model_dir.weight_files(self.path)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(str(e)) from None
        self._readers: list[CheckpointReader] = []
        self._source: dict[str, tuple[CheckpointReader, str]] = {}
        self._owner: dict[int, CheckpointReader] = {}
        self._infos = {}
        try:
            lm_head = self._collect(files)
            if index is not None:
                self._check_index(index)
            if lm_head is not None:
                self._check_tied(*lm_head)
        except BaseException:
            self.close()
            raise

    def _collect(self, files: list[str]) -> tuple[CheckpointReader, str] | None:
        """Open every file and map its keys; returns where ``lm_head.weight`` is, if anywhere."""
        lm_head = None
        for path in files:
            reader = CheckpointReader(path)
            self._readers.append(reader)
            if reader.quant_kind is not None:
                raise CheckpointError(f"{reader.path} is {reader.quant_kind}-compressed; a model directory must "
                                      f"hold the dense "
                                      f"weights (quantize the directory with cpm-bee-quantize instead)")
            for stored in reader.keys():
                if stored == model_dir.LM_HEAD:
                    lm_head = (reader, stored)
                    continue
                key = model_dir.original_key(stored)
                if key in self._source:
                    raise CheckpointError(f"{self.path}: {key} is stored twice ({stored} in {reader.path})")
                self._source[key] = (reader, stored)
                self._infos[key] = reader.info(stored)
        return lm_head

    def _check_index(self, index: str) -> None:
        try:
            listed = {model_dir.original_key(k) for k in model_dir.read_index(index) if k != model_dir.LM_HEAD}
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if listed != set(self._source):
            missing, extra = sorted(listed - set(self._source)), sorted(set(self._source) - listed)
            raise CheckpointError(f"{index} does not match its shards: listed but absent {missing[:3]}, present "
                                  f"but not listed {extra[:3]}; re-download the directory")

    def _check_tied(self, reader: CheckpointReader, stored: str) -> None:
        if model_dir.EMBEDDING not in self._source:
            return  # the key check of the loader names the missing embedding
        head = reader.read(stored)
        embedding = self.read(model_dir.EMBEDDING)
        if head.shape != embedding.shape or not torch.equal(head, embedding):
            model_dir.warn(f"{reader.path}: lm_head.weight differs from input_embedding.weight; CPM-Bee computes "
                           f"logits from the embedding (as CpmBeeForCausalLM does), so lm_head.weight is ignored")
        reader.release(head)
        self.release(embedding)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def read(self, key: str) -> torch.Tensor:
        reader, stored = self._source[key]
        tensor = reader.read(stored)
        self._owner[tensor.data_ptr()] = reader
        return tensor

    def read_mapped(self, key: str) -> torch.Tensor:
        reader, stored = self._source[key]
        tensor = reader.read_mapped(stored)
        self._owner[tensor.data_ptr()] = reader
        return tensor

    def release(self, tensor: torch.Tensor) -> None:
        reader = self._owner.pop(tensor.data_ptr(), None)
        if reader is not None:
            reader.release(tensor)


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """A reader for any checkpoint this project loads (see the module docstring), in CPM-Bee's key layout."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return ModelDirReader(path)
    reader = CheckpointReader(path)
    if reader.origin == "qlora-pr" or not model_dir.is_hf_key_layout(reader.keys()):
        return reader
    reader.close()
    return ModelDirReader(path, files=[path])


def is_safetensors(path: str) -> bool:
    """True if the file starts like safetensors (8-byte header length, then a JSON object)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU tensor (for ``readinto``)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop the whole pages under a memory-mapped tensor from our resident set (Linux).

    Only called on tensors backed by a private read-only file mapping (``torch.load(mmap=True)``),
    for which MADV_DONTNEED just forgets the pages: touching them again re-reads the file.
    """
    if sys.platform != "linux" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.pt`` or ``.safetensors`` checkpoint (``.pt`` stays memory-mapped)."""
    with open_checkpoint(path) as reader:
        return {key: reader.read(key) for key in reader.keys()}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors checkpoint (empty for ``.pt``)."""
    with CheckpointReader(path) as reader:
        return dict(reader.metadata)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state_dict`` as safetensors, atomically (temp file, then rename), one tensor at a time.

    Values must be plain tensors: gather a sharded model's with ``Engine.state_dict`` first.
    """
    sharded = non_plain_tensors(state_dict)
    if sharded:
        raise CheckpointError(f"{sharded[:3]} are {type(state_dict[sharded[0]]).__name__}s, not plain tensors: "
                              "gather a sharded model's weights with Engine.state_dict first")
    with atomic_path(path) as tmp:
        writer = SafetensorsWriter(tmp, {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()},
                                   metadata=metadata)
        try:
            for key, value in state_dict.items():
                writer.write(key, value)
        except BaseException:
            writer.abort()
            raise
        writer.close()


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
            f"--{kind}) to use it, or export it first: cpm-bee-export --model-config {where} "
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
        except qformat.QuantFormatError as e:
            raise CheckpointError(f"{path}: {e} (model config: {where})") from None


_PEEK_BYTES = 4096


def _peek(reader: CheckpointReader, key: str) -> torch.Tensor:
    """``key``'s tensor when it is small, else an empty meta tensor of its shape and dtype."""
    if reader.nbytes(key) <= _PEEK_BYTES:
        return reader.read(key)
    return torch.empty(reader.info(key)[0], dtype=reader.info(key)[1], device="meta")


def check_finite(path: str, key: str, tensor: torch.Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or inf: a converted copy would keep them."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: {key} holds NaN or inf values; the checkpoint is damaged: fix it or "
                              f"re-create it from a good copy")


def build_model(config: CPMBeeConfig, path: str | os.PathLike, device: torch.device | str = "cpu") -> CPMBee:
    """``CPMBee(config)`` with the weights of ``path``: built on the meta device, then filled by
    :func:`load_model_weights`, so no memory goes to (and no 4-bit quantization to) a random init."""
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
        except qformat.QuantFormatError as e:
            raise CheckpointError(f"{path}: {e} (model config: {where})") from None
    left = [k for k, v in chain(model.named_parameters(), model.named_buffers()) if v.is_meta]
    if left:
        raise CheckpointError(f"{left[:5]} are still on the meta device after loading {path}: they are not "
                              f"in the state dict; build the model on a real device instead")
