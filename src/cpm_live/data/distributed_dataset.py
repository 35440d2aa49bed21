"""CPM-Bee binary dataset: blocks of length-prefixed records, sharded across ranks by block.

Layout (compatible with the original): a directory with `meta.bin` (one JSON `FileInfo` per line)
and data files of `nblocks * block_size` bytes. A record is `0x1F`, a u32 little-endian length and
the payload; a record never straddles a block (the rest of the block is zero filled), so a rank can
seek straight to any block it owns. Global block `b` belongs to rank `b % world_size`.
"""

from __future__ import annotations

import bisect
import json
import os
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cpm_live.data.serializer import AutoSerializer, JsonSerializer, Serializer
from cpm_live.errors import DataFormatError, MissingFileError
from cpm_live.utils import atomic_path

_DEFAULT_BLOCK_SIZE = 16 << 20
_RECORD_MAGIC = b"\x1f"
_BLOCK_END = b"\x00"
_LENGTH = struct.Struct("<I")


@dataclass
class FileInfo:
    """One data file of a dataset; it owns global blocks `[block_begin, block_end)`."""

    file_name: str
    block_begin: int
    block_end: int
    nbytes: int
    nlines: int
    mask: bool = False
    block_size: int = _DEFAULT_BLOCK_SIZE

    def dumps(self) -> str:
        return json.dumps(asdict(self))  # field order = the original key order


def read_info_list(meta_path: str) -> list[FileInfo]:
    if not os.path.isfile(meta_path):
        raise MissingFileError(f"{meta_path} not found: not a CPM-Bee binary dataset directory")
    info: list[FileInfo] = []
    with open(meta_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                info.append(_checked_info(FileInfo(**json.loads(line)), os.path.dirname(meta_path)))
            except (ValueError, TypeError, RecursionError) as e:
                raise DataFormatError(f"{meta_path}:{lineno}: invalid file entry ({e})") from e
    for i, v in enumerate(info):
        expected = 0 if i == 0 else info[i - 1].block_end
        if v.block_begin != expected or v.block_end < v.block_begin:
            raise DataFormatError(
                f"{meta_path}:{i + 1}: blocks of {v.file_name} are [{v.block_begin}, {v.block_end}), "
                f"expected them to start at {expected}"
            )
    return info


def _checked_info(v: FileInfo, directory: str) -> FileInfo:
    """Types, a file name inside the dataset directory, and no more blocks than the file can hold
    (so a forged ``block_end`` cannot make readers build huge block lists)."""
    if not isinstance(v.file_name, str) or not v.file_name or v.file_name in (".", "..") or "/" in v.file_name \
            or os.sep in v.file_name or "\0" in v.file_name:
        raise ValueError(f"file_name must be a file name inside the dataset directory, got {v.file_name!r}")
    for name in ("block_begin", "block_end", "nbytes", "nlines", "block_size"):
        value = getattr(v, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if v.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {v.block_size}")
    path = os.path.join(directory, v.file_name)
    size = os.path.getsize(path) if os.path.isfile(path) else v.nbytes
    if v.block_end - v.block_begin > max(1, -(-size // v.block_size)):
        raise ValueError(f"{v.file_name} is {size} bytes, room for {-(-size // v.block_size)} block(s) of "
                         f"{v.block_size} bytes, but claims blocks [{v.block_begin}, {v.block_end})")
    return v


def write_info_list(meta_path: str, info: list[FileInfo]) -> None:
    with atomic_path(meta_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for v in info:
                f.write(v.dumps() + "\n")
        os.chmod(tmp, 0o644)  # the temp file is private (0600); datasets are shared read-only


class DatasetWriter:
    """Appends records to one data file, starting a new zero-padded block when a record won't fit."""

    def __init__(self, fname: str, block_size: int, serializer: Serializer) -> None:
        self._fname = fname
        self._block_size = block_size
        self._fp = open(fname, "wb")
        self._inblock_offset = 0
        self.nbytes = 0
        self.nlines = 0
        self.nblocks = 1
        self.serializer = serializer

    def write(self, data: Any) -> None:
        record = self.serializer.serialize(data)
        record = _LENGTH.pack(len(record)) + record
        # +2: the magic byte of this record and at least one 0x00 end-of-block byte after it.
        if self._inblock_offset + 2 + len(record) > self._block_size:
            self._fp.write(b"\x00" * (self._block_size - self._inblock_offset))
            self._inblock_offset = 0
            self.nblocks += 1
        if self._inblock_offset + 2 + len(record) > self._block_size:
            raise ValueError(
                f"a record of {len(record) - 4} bytes does not fit a block of {self._block_size} bytes "
                f"({self._fname}); use a larger block_size"
            )
        self.nbytes += len(record)
        self.nlines += 1
        self._inblock_offset += 1 + len(record)
        self._fp.write(_RECORD_MAGIC)
        self._fp.write(record)

    def close(self) -> None:
        if not self._fp.closed:
            self._fp.write(b"\x00" * (self._block_size - self._inblock_offset))
            self._fp.close()


class DatasetBuilder:
    """Context manager from `build_dataset`: on success the file is registered in `meta.bin`
    (atomically); on error the partial data file is removed and meta.bin is untouched."""

    def __init__(self, path: str, dbname: str, block_size: int, serializer: Serializer) -> None:
        if not dbname or os.sep in dbname or dbname == "meta.bin" or dbname.startswith("."):
            raise ValueError(f"invalid dataset file name {dbname!r}")
        self._path = path
        self._dbname = dbname
        self._block_size = block_size
        self._serializer = serializer
        self._writer: DatasetWriter | None = None
        os.makedirs(path, exist_ok=True)
        meta_path = os.path.join(path, "meta.bin")
        info = read_info_list(meta_path) if os.path.exists(meta_path) else []
        if any(v.file_name == dbname for v in info):
            raise ValueError(f"Dataset name exists: {dbname} is already listed in {meta_path}; remove the output "
                             f"folder {path} (or choose another `output_name`) and run again")
        self._db_path = os.path.join(path, dbname)
        if os.path.exists(self._db_path):
            raise ValueError(f"File exists `{self._db_path}`")

    def __enter__(self) -> DatasetWriter:
        self._writer = DatasetWriter(self._db_path, self._block_size, self._serializer)
        return self._writer

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if self._writer is None:
            raise RuntimeError("DatasetBuilder.__exit__ called without __enter__")
        writer, self._writer = self._writer, None
        writer.close()
        if exc_type is not None:
            os.unlink(self._db_path)
            return
        meta_path = os.path.join(self._path, "meta.bin")
        info = read_info_list(meta_path) if os.path.exists(meta_path) else []
        begin = info[-1].block_end if info else 0
        info.append(
            FileInfo(
                self._dbname,
                begin,
                begin + writer.nblocks,
                writer.nbytes,
                writer.nlines,
                False,
                self._block_size,
            )
        )
        write_info_list(meta_path, info)


def build_dataset(
    path: str,
    dbname: str,
    block_size: int = _DEFAULT_BLOCK_SIZE,
    serializer: Serializer | None = None,
) -> DatasetBuilder:
    """Open `path/dbname` for writing: `with build_dataset(p, "part0") as w: w.write(record)`.

    Records are JSON by default (pass `PickleSerializer()` only to produce legacy test data).
    """
    return DatasetBuilder(path, dbname, block_size, serializer or JsonSerializer())


def _filtered_range(
    begin: int, end: int, rank: int, world_size: int, keep: set[int] | None = None
) -> list[int]:
    """Blocks `b` in [begin, end) with `b % world_size == rank` (and in `keep`, if given), ascending."""
    first = begin + (rank - begin) % world_size
    return [b for b in range(first, end, world_size) if keep is None or b in keep]


class DistributedDataset:
    """Read-only view of a dataset for one rank: its blocks in (shuffled) order, records in order.

    Unused blocks are consumed with `pop()` from the end of the list, so without shuffling the last
    block is read first (as in the original). When all blocks are used a new epoch starts; after
    `max_repeat_times` epochs `read` raises EOFError. `meta.bin` is re-read at each block change so
    a dataset may grow while it is being read.
    """

    def __init__(
        self,
        path: str,
        rank: int = 0,
        world_size: int = 1,
        serializer: Serializer | None = None,
        max_repeat_times: int | None = None,
        shuffle: bool = True,
        seed: int | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._path = path
        self._rank = rank
        self._world_size = world_size
        self._max_repeat_times = max_repeat_times
        self._shuffle = shuffle
        self._rng = random.Random(seed)
        self.serializer = serializer or AutoSerializer()

        self._file_info: list[FileInfo] = []
        self._file_ends: list[int] = []
        self._unused_block: list[int] = []
        self._nbytes = 0
        self._nlines = 0
        self._curr_block: int | None = None
        self._fp = None
        self._curr_fname: str | None = None
        self._location = path
        self._update_states(force=True)
        self._repeat_times = 1  # the epoch begun by the initial block list

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def nlines(self) -> int:
        return self._nlines

    @property
    def location(self) -> str:
        """Where the last record came from (`file @ byte offset`), for error messages."""
        return self._location

    def _update_states(self, force: bool = False) -> None:
        meta_path = os.path.join(self._path, "meta.bin")
        info = read_info_list(meta_path)
        if not info:
            raise DataFormatError(f"{meta_path} lists no data files")
        old_len = len(self._file_info)
        if old_len > len(info) or any(
            (a.file_name, a.block_begin, a.block_end) != (b.file_name, b.block_begin, b.block_end)
            for a, b in zip(self._file_info, info)
        ):
            raise RuntimeError(f"Dataset meta file {meta_path} changed unexpectedly while reading")
        mask_changed = any(a.mask != b.mask for a, b in zip(self._file_info, info))
        if not force and old_len == len(info) and not mask_changed:
            return

        self._nbytes = sum(v.nbytes for v in info)
        self._nlines = sum(v.nlines for v in info)
        unused = set(self._unused_block)
        blocks: list[int] = []
        for i, v in enumerate(info):
            if not v.mask:
                # Known files keep only their still-unused blocks; new files contribute all of theirs.
                keep = unused if i < old_len else None
                blocks.extend(_filtered_range(v.block_begin, v.block_end, self._rank, self._world_size, keep))
        if self._shuffle:
            self._rng.shuffle(blocks)
        self._unused_block = blocks
        self._file_ends = [v.block_end for v in info]
        self._file_info = info

    def _get_block_file(self, block_id: int) -> FileInfo:
        idx = bisect.bisect_right(self._file_ends, block_id)
        if idx >= len(self._file_info):
            raise ValueError(f"block {block_id} is beyond the {self._file_ends[-1]} blocks of {self._path}")
        return self._file_info[idx]

    def _prepare_new_epoch(self) -> None:
        if self._max_repeat_times is not None and self._repeat_times >= self._max_repeat_times:
            raise EOFError("End of dataset")
        blocks: list[int] = []
        for v in self._file_info:
            if not v.mask:
                blocks.extend(_filtered_range(v.block_begin, v.block_end, self._rank, self._world_size))
        if self._shuffle:
            self._rng.shuffle(blocks)
        self._unused_block = blocks
        self._repeat_times += 1

    def _get_next_block(self) -> int:
        self._update_states()
        if not self._unused_block:
            self._prepare_new_epoch()
            if not self._unused_block:
                raise RuntimeError(f"Empty dataset {self._path}: rank {self._rank} owns no unmasked block")
        return self._unused_block.pop()

    def restart(self) -> None:
        """Allow `max_repeat_times` more epochs after `read` raised EOFError."""
        self._repeat_times = 0

    def _open_file(self, fname: str, offset: int) -> None:
        if self._curr_fname != fname:
            self.close()
            path = os.path.join(self._path, fname)
            if not os.path.isfile(path):
                raise MissingFileError(f"data file {path} listed in meta.bin is missing")
            self._fp = open(path, "rb")
            self._curr_fname = fname
        self._fp.seek(offset)

    def close(self) -> None:
        if self._fp is not None:
            self._fp.close()
        self._fp = None
        self._curr_fname = None

    def read(self) -> Any:
        """The next record of this rank; EOFError after the last epoch."""
        while True:
            if self._curr_block is None:
                block = self._get_next_block()
                f_info = self._get_block_file(block)
                self._open_file(f_info.file_name, (block - f_info.block_begin) * f_info.block_size)
                self._curr_block = block
            offset = self._fp.tell()
            where = f"{os.path.join(self._path, self._curr_fname)} @ byte {offset}"
            magic = self._fp.read(1)
            if magic == _BLOCK_END:
                self._curr_block = None
                continue
            if magic != _RECORD_MAGIC:
                reason = "unexpected end of file" if not magic else f"invalid magic header {magic!r}"
                raise DataFormatError(f"{where}: {reason}; the data file is corrupt or not a CPM-Bee dataset")
            header = self._fp.read(_LENGTH.size)
            if len(header) != _LENGTH.size:
                raise DataFormatError(f"{where}: record is truncated")
            (length,) = _LENGTH.unpack(header)
            left = os.fstat(self._fp.fileno()).st_size - self._fp.tell()
            if length > left:  # checked before reading: a forged length must not allocate gigabytes
                raise DataFormatError(f"{where}: record claims {length} bytes but the file has {left} left; "
                                      "the record is truncated or corrupt")
            payload = self._fp.read(length)
            if len(payload) != length:
                raise DataFormatError(f"{where}: record is truncated")
            self._location = where
            try:
                return self.serializer.deserialize(payload)
            except (ValueError, pickle.UnpicklingError) as e:
                raise DataFormatError(f"{where}: {e}") from e

    def _local_state(self) -> tuple[list[int], list[int]]:
        self._update_states()
        if self._fp is not None and self._curr_block is not None:
            f_info = self._get_block_file(self._curr_block)
            offset = self._fp.tell() - (self._curr_block - f_info.block_begin) * f_info.block_size
            block = [self._curr_block, offset]
        else:
            block = [-1, 0]
        return list(self._unused_block), block + [len(self._unused_block), self._repeat_times]

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's row of `state_dict()`; combine rows with `DistributedDataset.merge_state_dicts`.

        Besides the original `states` and `block`, `rng` (the shuffle RNG, [1, 625]) makes the block
        order of later epochs identical after a resume.
        """
        unused, block = self._local_state()
        version, internal, _ = self._rng.getstate()
        return {
            "states": torch.tensor([unused], dtype=torch.long).reshape(1, len(unused)),
            "block": torch.tensor([block], dtype=torch.long),
            "rng": torch.tensor([internal], dtype=torch.long),
        }

    @staticmethod
    def merge_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack per-rank states (rank order) into `{"states": [world, max_unused], "block": [world, 4]}`."""
        width = max(s["states"].size(1) for s in states)
        rows = torch.full((len(states), width), -1, dtype=torch.long)
        for i, s in enumerate(states):
            rows[i, : s["states"].size(1)] = s["states"][0]
        merged = {"states": rows, "block": torch.cat([s["block"] for s in states], dim=0)}
        if all("rng" in s for s in states):
            merged["rng"] = torch.cat([s["rng"] for s in states], dim=0)
        return merged

    def state_dict(self, all_gather_object: Callable[[Any], list[Any]] | None = None) -> dict[str, torch.Tensor]:
        """Read position of every rank; with world_size > 1 every rank must call it (collective).

        ``all_gather_object`` gathers one picklable object from every rank in rank order; pass the
        engine's (``engine.all_gather_object``): the dataset does not talk to the process group itself.
        """
        local = self.local_state_dict()
        if self._world_size == 1:
            return local
        if all_gather_object is None:
            raise ValueError(
                f"DistributedDataset.state_dict with world_size {self._world_size} needs the ranks' rows: pass "
                "all_gather_object=engine.all_gather_object, or gather local_state_dict() of every rank "
                "and call merge_state_dicts"
            )
        return self.merge_state_dicts(all_gather_object(local))

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a position. With another world size (`strict=False`) the unused blocks of all ranks
        are re-distributed by `b % world_size`; blocks that were partly read are dropped for this
        epoch, as in the original."""
        block_states = torch.as_tensor(state["states"], dtype=torch.long)
        block_info = torch.as_tensor(state["block"], dtype=torch.long)
        saved_world = block_info.size(0)
        self.close()
        self._curr_block = None
        if saved_world != self._world_size:
            if strict:
                raise ValueError(
                    f"world_size changed ({saved_world} -> {self._world_size}); "
                    "load with strict=False to re-distribute the unread blocks"
                )
            self._repeat_times = int(block_info[0, 3])
            unused = [
                b
                for i in range(saved_world)
                for b in block_states[i, : int(block_info[i, 2])].tolist()
                if b % self._world_size == self._rank
            ]
            if self._shuffle:
                self._rng.shuffle(unused)
            self._unused_block = unused
        else:
            curr_block, offset, num_unused, self._repeat_times = block_info[self._rank].tolist()
            self._unused_block = block_states[self._rank, :num_unused].tolist()
            if "rng" in state:
                self._rng.setstate((3, tuple(torch.as_tensor(state["rng"])[self._rank].tolist()), None))
            if curr_block != -1:
                f_info = self._get_block_file(curr_block)
                self._open_file(
                    f_info.file_name, (curr_block - f_info.block_begin) * f_info.block_size + offset
                )
                self._curr_block = curr_block
        for b in self._unused_block:
            self._get_block_file(b)  # raises for blocks this dataset does not have
        self._update_states()


class SimpleDataset(DistributedDataset):
    """The whole dataset on one reader, one pass (`max_repeat_times=1`); iterating restarts it."""

    def __init__(
        self, path: str, serializer: Serializer | None = None, shuffle: bool = True, seed: int | None = None
    ) -> None:
        super().__init__(path, 0, 1, serializer=serializer, max_repeat_times=1, shuffle=shuffle, seed=seed)

    def __iter__(self):
        while True:
            try:
                data = self.read()
            except EOFError:
                self.restart()
                break
            yield data

    def __len__(self) -> int:
        return self._nlines
