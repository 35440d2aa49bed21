"""Read every checkpoint format this project loads, one tensor at a time, without running code.

Formats: ``.pt``/``.bin`` (a ``torch.save``d dict of tensors, read through
:func:`~cpm_live.checkpoint.safe_load.safe_torch_load`, memory-mapped), safetensors (dense, or int4-
or int8-compressed by :mod:`cpm_live.convert`; recognised by its content whatever the file is
called), the pickled int4 checkpoints of CPM-Bee's qlora PR (:mod:`~cpm_live.checkpoint.qlora_pr`:
bitsandbytes' ``QuantState`` is the one class allowed besides tensors) and Hugging Face model
directories (:mod:`~cpm_live.checkpoint.hf_dir`: single or sharded files, ``cpmbee.`` key prefix,
tied ``lm_head.weight``). Nothing else is unpickled. :func:`open_checkpoint` gives a reader of any
of them in CPM-Bee's key layout, so tools that stream (the quantizer, export) hold one tensor, not
the model; :mod:`~cpm_live.checkpoint.load` puts the tensors into a model.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Iterator, Mapping

import torch

from cpm_live.checkpoint import hf_dir, qlora_pr
from cpm_live.checkpoint.safe_load import RefusedPickle, is_zip_archive, safe_torch_load
from cpm_live.checkpoint.writer import DTYPE_NAMES, nbytes
from cpm_live.errors import CheckpointError, PRCheckpointError, QuantFormatError
from cpm_live.quant import format as qformat
from cpm_live.quant import int8 as qint8

_MAX_HEADER = 100_000_000  # safetensors' own limit
_MADV_DONTNEED = 4


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
                if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
                    raise ValueError(f"tensor {key} has shape {str(shape)[:100]}, not a list of non-negative "
                                     f"integers")
                if math.prod(shape) > size:  # an element takes a byte at least; Python ints do not overflow
                    raise ValueError(f"tensor {key} has shape {shape}, more elements than the {size}-byte file "
                                     f"can hold")
                offsets = entry.get("data_offsets")
                if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
                    raise ValueError(f"tensor {key} has data_offsets {str(offsets)[:100]}, not two non-negative "
                                     f"integers")
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
        except RecursionError:
            self._file.close()
            raise CheckpointError(f"cannot read {self.path}: its header is nested too deep to be a safetensors "
                                  f"header; the file is damaged or not safetensors: re-create it") from None
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            self._file.close()
            raise CheckpointError(
                f"cannot read {self.path}: {e}; the file is truncated or not safetensors: re-download or "
                f"re-create it"
            ) from None

    def _open_pt(self) -> None:
        # Only torch.save's zip format can be memory-mapped; a legacy (pre-1.6) file is read whole.
        self._mapped = is_zip_archive(self.path)
        try:
            # QuantState is allowed for the qlora PR's files; it is rebuilt from plain attributes.
            state = safe_torch_load(self.path, mmap=self._mapped, allowed=qlora_pr.SAFE_GLOBALS)
        except RefusedPickle as e:
            raise CheckpointError(f"{e}: only tensors and bitsandbytes' QuantState (qlora-PR files) are read. "
                                  f"Save a plain dict of tensors, or re-create the file from the fp16 "
                                  f"checkpoint") from None
        except CheckpointError as e:
            raise CheckpointError(f"{e}: re-download or re-create it") from None
        if qlora_pr.is_pr_checkpoint(state):
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
            tensors, settings, originals = qlora_pr.convert(state, self.path)
        except (PRCheckpointError, QuantFormatError) as e:
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
        except QuantFormatError as e:
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
        except QuantFormatError as e:
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
            files, index = (files, None) if files is not None else hf_dir.weight_files(self.path)
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
                if stored == hf_dir.LM_HEAD:
                    lm_head = (reader, stored)
                    continue
                key = hf_dir.original_key(stored)
                if key in self._source:
                    raise CheckpointError(f"{self.path}: {key} is stored twice ({stored} in {reader.path})")
                self._source[key] = (reader, stored)
                self._infos[key] = reader.info(stored)
        return lm_head

    def _check_index(self, index: str) -> None:
        try:
            listed = {hf_dir.original_key(k) for k in hf_dir.read_index(index) if k != hf_dir.LM_HEAD}
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if listed != set(self._source):
            missing, extra = sorted(listed - set(self._source)), sorted(set(self._source) - listed)
            raise CheckpointError(f"{index} does not match its shards: listed but absent {missing[:3]}, present "
                                  f"but not listed {extra[:3]}; re-download the directory")

    def _check_tied(self, reader: CheckpointReader, stored: str) -> None:
        if hf_dir.EMBEDDING not in self._source:
            return  # the key check of the loader names the missing embedding
        head = reader.read(stored)
        embedding = self.read(hf_dir.EMBEDDING)
        if head.shape != embedding.shape or not torch.equal(head, embedding):
            hf_dir.warn(f"{reader.path}: lm_head.weight differs from input_embedding.weight; CPM-Bee computes "
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
    if reader.origin == "qlora-pr" or not hf_dir.is_hf_key_layout(reader.keys()):
        return reader
    reader.close()
    return ModelDirReader(path, files=[path])


def _is_size(value: object) -> bool:
    """A JSON integer in [0, 2**63) (not a bool, not a float such as 4.0 or 1e30): what torch can index."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


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
