"""Write ``.safetensors`` files one tensor at a time, so peak memory is one tensor, not the model.

:class:`SafetensorsWriter` streams planned tensors into a file (the quantizer and export use it);
:func:`save_state_dict` writes a whole state dict through it, atomically.

The file format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets``; plus string ``__metadata__``), then the raw bytes, without holes. The header must
come first but needs every offset, so the writer takes the layout up front:

- *fixed* tensors (known shape and dtype) get their offsets at once and are written where they
  belong, in any order, as they arrive, whole (``write``) or in parts from several threads
  (``write_at``);
- *tail* tensors (small 1-D uint8 whose length is only known later, e.g. the JSON quant-state of a
  4-bit weight) are kept in memory and appended after the fixed ones on ``close()``.

Space for the header is reserved for tails of up to ``MAX_TAIL_BYTES`` each and padded with
spaces (which safetensors allows). Fixed tensors are ordered by element size, largest first, so
every tensor starts aligned to its dtype, as safetensors' own writer does.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from cpm_live.errors import CheckpointError
from cpm_live.utils import atomic_path, non_plain_tensors

MAX_TAIL_BYTES = 4096

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
DTYPE_NAMES = {name: dtype for dtype, name in DTYPES.items()}

Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``tensor`` (moved to CPU, made contiguous; no other copy)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Stream tensors into ``path`` (write to a temp path; the caller renames it when done).

    Use ``write(name, tensor)`` for every fixed tensor and tail, then ``close()``. Anything missing,
    unplanned, or of the wrong shape/dtype raises ``ValueError`` naming the tensor.
    """

    def __init__(self, path: str | os.PathLike, fixed: Layout, tails: Iterable[str] = (),
                 metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        self.fixed = dict(fixed)
        self.tail_names = list(tails)
        self.metadata = dict(metadata or {})
        if any(not isinstance(v, str) for v in self.metadata.values()):
            raise ValueError("safetensors metadata values must be strings")
        overlap = set(self.fixed) & set(self.tail_names)
        if overlap or len(set(self.tail_names)) != len(self.tail_names):
            raise ValueError(f"tensor names planned twice: {sorted(overlap) or self.tail_names}")
        order = sorted(self.fixed, key=lambda n: -torch.empty((), dtype=self.fixed[n][1]).element_size())
        self.offsets: dict[str, tuple[int, int]] = {}
        end = 0
        for name in order:
            shape, dtype = self.fixed[name]
            self.offsets[name] = (end, end + nbytes(shape, dtype))
            end += nbytes(shape, dtype)
        self.fixed_end = end
        self.tails: dict[str, bytes] = {}
        self.written: set[str] = set()
        self._covered: Counter[str] = Counter()  # bytes written by write_at, per tensor
        self._lock = threading.Lock()
        worst = {n: ((MAX_TAIL_BYTES,), torch.uint8, (end, end + MAX_TAIL_BYTES * (len(self.tail_names) + 1)))
                 for n in self.tail_names}
        self.header_room = len(self._header(worst)) + 8
        self.header_room += -self.header_room % 8
        self.data_start = 8 + self.header_room
        self.file = open(self.path, "wb")
        self.file.truncate(self.data_start + self.fixed_end)

    def _header(self, tails: Mapping[str, tuple[tuple[int, ...], torch.dtype, tuple[int, int]]]) -> bytes:
        entries: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        for name, (shape, dtype) in self.fixed.items():
            offsets = list(self.offsets[name])
            entries[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": offsets}
        for name, (shape, dtype, offsets) in tails.items():
            entries[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": list(offsets)}
        return json.dumps(entries, separators=(",", ":")).encode("utf-8")

    def _pwrite(self, data: memoryview, position: int) -> None:
        """Write all of ``data`` at ``position`` without moving the file offset (safe across threads)."""
        data = data.cast("B")
        while len(data):
            done = os.pwrite(self.file.fileno(), data, position)
            data, position = data[done:], position + done

    def write_at(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes at byte ``start`` of fixed tensor ``name``. Threads may write
        parts of tensors at once; ``name`` counts as written once its (non-overlapping) parts cover it."""
        if name not in self.fixed:
            raise ValueError(f"tensor {name} was not planned for {self.path}, or is a tail")
        data = tensor_bytes(tensor)
        begin, end = self.offsets[name]
        if tensor.dtype != self.fixed[name][1] or start < 0 or begin + start + data.nbytes > end:
            raise ValueError(f"a {tensor.dtype} part of {data.nbytes} bytes at byte {start} does not fit tensor "
                             f"{name} ({self.fixed[name][1]}, {end - begin} bytes)")
        self._pwrite(data, self.data_start + begin + start)
        with self._lock:
            if name in self.written:
                raise ValueError(f"tensor {name} written twice")
            self._covered[name] += data.nbytes
            if self._covered[name] == end - begin:
                self.written.add(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.written or self._covered[name]:
            raise ValueError(f"tensor {name} written twice")
        if name in self.fixed:
            shape, dtype = self.fixed[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
            if math.prod(shape):
                self._pwrite(tensor_bytes(tensor), self.data_start + self.offsets[name][0])
        elif name in self.tail_names:
            if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.numel() > MAX_TAIL_BYTES:
                raise ValueError(f"tail tensor {name} must be 1-D uint8 of at most {MAX_TAIL_BYTES} bytes, "
                                 f"got {tensor.dtype} {list(tensor.shape)}")
            self.tails[name] = bytes(tensor_bytes(tensor))
        else:
            raise ValueError(f"tensor {name} was not planned for {self.path}")
        with self._lock:
            self.written.add(name)

    def close(self) -> None:
        """Append the tails, write the header, flush to disk. Raises if a planned tensor is missing."""
        try:
            missing = sorted((set(self.fixed) | set(self.tail_names)) - self.written)
            if missing:
                raise ValueError(f"{len(missing)} tensors never written to {self.path}: {missing[:3]}")
            end = self.fixed_end
            placed = {}
            self.file.seek(self.data_start + end)
            for name in self.tail_names:
                data = self.tails[name]
                placed[name] = ((len(data),), torch.uint8, (end, end + len(data)))
                self.file.write(data)
                end += len(data)
            header = self._header(placed)
            header += b" " * (self.header_room - len(header))
            self.file.seek(0)
            self.file.write(struct.pack("<Q", len(header)))
            self.file.write(header)
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()

    def abort(self) -> None:
        self.file.close()


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
