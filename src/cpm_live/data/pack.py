"""Packing converted samples into fixed-length rows, and the resumable fine-tuning dataset.

`BatchPacker` is the original `_MixedDatasetBatchPacker` without transforms: instances are packed
best-fit into rows of `max_length` tokens and a batch is emitted once there are more than
`batch_size` rows. `FinetuneDataset` runs one packer over the whole data on every rank (so all ranks
agree on the global batch) and hands rank r its rows. Its RNG, read position and unfinished rows
form its state, so a resumed run yields exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypedDict

import numpy as np
from numpy.typing import NDArray

from cpm_live.data.distributed_dataset import SimpleDataset
from cpm_live.data.encode import ExtTableStates, convert_data_to_id
from cpm_live.data.jsonl import JsonlDataset
from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.errors import DataFormatError, MissingFileError, SampleTooLong
from cpm_live.tokenizers import CPMBeeTokenizer

_STATE_VERSION = 1


class CPMBeeBatch(TypedDict):
    """One packed batch as arrays; the model-input keys are ``CPMBeeInputs``' field names, so
    ``LabelledInputs.from_arrays(batch)`` takes them without a table of names."""

    input: NDArray[np.int32]  # (b, L) base token ids
    input_sub: NDArray[np.int32]  # (b, L) subscripts, 0 = ordinary token
    length: NDArray[np.int32]  # (b,) filled length of each row
    context: NDArray[np.bool_]  # (b, L) True = given, False = to predict
    sample_ids: NDArray[np.int32]  # (b, L) 0 main sample, i+1 in-context example i
    num_segments: NDArray[np.int32]  # (b, L) segment count of the token's sample
    segment: NDArray[np.int32]  # (b, L) segment id
    segment_rel_offset: NDArray[np.int32]  # (b, L) offset of the sample's n*n block in segment_rel
    segment_rel: NDArray[np.int32]  # (b, max_rel)
    span: NDArray[np.int32]  # (b, L) index of the packed instance
    target: NDArray[np.int32]  # (b, L) next-token label, IGNORE_INDEX = no loss
    ext_table_ids: NDArray[np.int32]  # (X,) base id of each batch ext token
    ext_table_sub: NDArray[np.int32]  # (X,) its subscript
    task_ids: NDArray[np.int32]  # (b, L) index into task_names
    task_names: list[str]
    raw_data: list[Any]


class RecordSource(Protocol):
    """What the packer reads from: `JsonlDataset` or `SimpleDataset`."""

    location: str

    def read(self) -> Any: ...


@dataclass
class _Row:
    """One packed row (or, before packing, one instance); arrays are (len,) except segment_rel."""

    inputs: NDArray[np.int32]
    inputs_sub: NDArray[np.int32]
    context: NDArray[np.int8]
    sample_ids: NDArray[np.int32]
    segments: NDArray[np.int32]
    num_segments: NDArray[np.int32]
    segment_rel_offset: NDArray[np.int32]
    segment_rel: NDArray[np.int32]
    spans: list[int]
    task_ids: list[str]
    raw_data: list[Any]

    _DTYPES = {"context": np.int8}

    def append(self, inst: _Row) -> None:
        """Pack `inst` after this row's tokens; its rel offsets move past this row's rel blocks."""
        inst_rel_offset = inst.segment_rel_offset + self.segment_rel.shape[0]
        for name in ("inputs", "inputs_sub", "context", "sample_ids", "segments", "num_segments"):
            setattr(self, name, np.concatenate([getattr(self, name), getattr(inst, name)], axis=0))
        self.segment_rel_offset = np.concatenate([self.segment_rel_offset, inst_rel_offset], axis=0)
        self.segment_rel = np.concatenate([self.segment_rel, inst.segment_rel], axis=0)
        self.spans.append(self.inputs.shape[0])
        self.task_ids.extend(inst.task_ids)
        self.raw_data.extend(inst.raw_data)

    def to_state(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Row:
        values = {}
        for f in fields(cls):
            v = state[f.name]
            is_array = f.name not in ("spans", "task_ids", "raw_data")
            values[f.name] = np.array(v, dtype=cls._DTYPES.get(f.name, np.int32)) if is_array else list(v)
        return cls(**values)


# _Row field -> batch key of the per-token int32 arrays that are padded into (b, L) as they are.
_ROW_ARRAYS = {"inputs": "input", "inputs_sub": "input_sub", "sample_ids": "sample_ids",
               "num_segments": "num_segments", "segments": "segment", "segment_rel_offset": "segment_rel_offset"}


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else list(value)


class BatchPacker:
    """Best-fit packing of converted samples into `batch_size` rows of at most `max_length` tokens."""

    def __init__(self, batch_size: int, max_length: int, tokenizer: CPMBeeTokenizer, max_depth: int = 16) -> None:
        self._batch_size = batch_size
        self._max_length = max_length
        self._max_depth = max_depth
        self.tokenizer = tokenizer
        self._rows: list[_Row] = []
        self.num_read = 0  # samples read for new instances (in-context samples not counted)
        self.num_skipped = 0  # of those, longer than max_length: dropped as in the original
        # (location, at least this many tokens) of the first dropped sample this process saw
        self.first_skipped: tuple[str, int] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def _convert(self, source: RecordSource, data: Any, states: ExtTableStates | None,
                 rng: np.random.RandomState) -> tuple:
        """The converted sample; :class:`SampleTooLong` past ``max_length`` (before its arrays are built)."""
        if not isinstance(data, dict):
            raise DataFormatError(f"{source.location}: a sample must be a JSON object, got {type(data).__name__}")
        try:
            return convert_data_to_id(self.tokenizer, data, states, True, self._max_depth, rng=rng,
                                      max_length=self._max_length)
        except (DataFormatError, SampleTooLong):
            raise
        except ValueError as e:
            raise DataFormatError(f"{source.location}: {e}") from e

    def build_instance(self, source: RecordSource, rng: np.random.RandomState,
                       incontext_weight: Sequence[float] = (1.0,)) -> _Row:
        """Read samples until one fits `max_length`, then append up to k in-context samples (context only)."""
        weight = np.array(incontext_weight, dtype=np.float32)
        num_incontext = rng.choice(weight.shape[0], p=weight / weight.sum())
        while True:
            data = source.read()
            self.num_read += 1
            try:
                ids, subs, context, segments, rel, n_segments, table_states = self._convert(source, data, None, rng)
                break
            except SampleTooLong as e:
                self.num_skipped += 1
                self.first_skipped = self.first_skipped or (source.location, e.length)
        zeros = np.zeros(ids.shape, dtype=np.int32)
        inst = _Row(inputs=ids, inputs_sub=subs, context=context, sample_ids=zeros, segments=segments,
                    num_segments=np.full(ids.shape, n_segments, dtype=np.int32), segment_rel_offset=zeros.copy(),
                    segment_rel=rel, spans=[], task_ids=[], raw_data=[{"input": data, "samples": []}])
        for i in range(num_incontext):
            if inst.inputs.shape[0] >= self._max_length:
                break
            sample = source.read()
            try:
                s_ids, s_subs, _, s_segments, s_rel, n_segments, table_states = self._convert(
                    source, sample, table_states, rng
                )
            except SampleTooLong:
                break
            if inst.inputs.shape[0] + s_ids.shape[0] > self._max_length:
                break
            inst.raw_data[0]["samples"].append(sample)
            extra = {
                "inputs": s_ids, "inputs_sub": s_subs, "context": np.ones(s_ids.shape, dtype=np.int8),
                "sample_ids": np.full(s_ids.shape, i + 1, dtype=np.int32), "segments": s_segments,
                "num_segments": np.full(s_ids.shape, n_segments, dtype=np.int32),
                "segment_rel_offset": np.full(s_ids.shape, inst.segment_rel.shape[0], dtype=np.int32),
                "segment_rel": s_rel,
            }
            for name, arr in extra.items():
                setattr(inst, name, np.concatenate([getattr(inst, name), arr], axis=0))
        return inst

    def add_data(self, source: RecordSource, task_name: str, rng: np.random.RandomState,
                 incontext_weight: Sequence[float] = (1.0,)) -> CPMBeeBatch | None:
        """Add one instance to the fullest row it fits in (or a new row); returns a batch when ready."""
        inst = self.build_instance(source, rng, incontext_weight)
        inst.task_ids = [task_name]
        length = inst.inputs.shape[0]
        best_fit, best_space = None, None
        for i, row in enumerate(self._rows):
            space = self._max_length - row.inputs.shape[0]
            if length <= space and (best_space is None or space < best_space):
                best_fit, best_space = i, space
        if best_fit is None:
            inst.spans = [length]
            self._rows.append(inst)
        else:
            self._rows[best_fit].append(inst)
        # Emitting only above batch_size (not at it) is the original's rule; it keeps one open row.
        return self.pack_batch() if len(self._rows) > self._batch_size else None

    def pack_batch(self, force: bool = False) -> CPMBeeBatch:
        """Pad the first `batch_size` rows into arrays and compute targets; `force` allows fewer rows."""
        if len(self._rows) < self._batch_size and not force:
            raise RuntimeError("Batch insufficient")
        rows, self._rows = self._rows[: self._batch_size], self._rows[self._batch_size :]
        b, L = len(rows), self._max_length
        padded = {key: np.zeros((b, L), dtype=np.int32) for key in (*_ROW_ARRAYS.values(), "span", "task_ids")}
        context = np.zeros((b, L), dtype=np.int8)
        target = np.full((b, L), IGNORE_INDEX, dtype=np.int32)
        length = np.array([row.inputs.shape[0] for row in rows], dtype=np.int32)
        segment_rel = np.zeros((b, max(row.segment_rel.shape[0] for row in rows)), dtype=np.int32)
        # The original used set order (not reproducible across processes); first-seen order is stable.
        task_names = list(dict.fromkeys(name for row in rows for name in row.task_ids))
        task_index = {name: i for i, name in enumerate(task_names)}
        ext_map: dict[tuple[int, int], int] = {}  # (id, subscript) -> ext column, first-seen order
        raw_data: list[Any] = []
        for i, (row, n) in enumerate(zip(rows, length)):
            for field_name, key in _ROW_ARRAYS.items():
                padded[key][i, :n] = getattr(row, field_name)
            context[i, :n] = row.context
            segment_rel[i, : row.segment_rel.shape[0]] = row.segment_rel
            begin = 0
            for span_id, (end, name) in enumerate(zip(row.spans, row.task_ids)):
                padded["span"][i, begin:end] = span_id
                padded["task_ids"][i, begin:end] = task_index[name]
                begin = end
            raw_data.extend(row.raw_data)
            target[i, :n] = self._targets(row, ext_map)
        return {
            "input": padded["input"], "input_sub": padded["input_sub"], "length": length, "context": context > 0,
            "sample_ids": padded["sample_ids"], "num_segments": padded["num_segments"],
            "segment": padded["segment"], "segment_rel_offset": padded["segment_rel_offset"],
            "segment_rel": segment_rel, "span": padded["span"], "target": target,
            # A placeholder ext column (id 0, subscript 1) when the batch has no subscripted token.
            "ext_table_ids": np.array([k[0] for k in ext_map] or [0], dtype=np.int32),
            "ext_table_sub": np.array([k[1] for k in ext_map] or [1], dtype=np.int32),
            "task_ids": padded["task_ids"], "task_names": task_names, "raw_data": raw_data,
        }

    def _targets(self, row: _Row, ext_map: dict[tuple[int, int], int]) -> NDArray[np.int32]:
        """Next-token labels ``(n,)`` of one row; new subscripted tokens get ext columns in ``ext_map``.

        The original's rules, per position ``p`` whose token is to be predicted (``context[p] == 0``):
        the label is token ``p + 1`` (``vocab_size + ext column`` when it has a subscript; ``eos``
        where it is ``bos``), the last token's label is ``eos``, and position 0 never gets a label
        (the original's loop starts at ``j = 2``). Every subscripted token gets a column, given or not.
        """
        ids, subs, n = row.inputs, row.inputs_sub, row.inputs.shape[0]
        labels = ids.astype(np.int32)
        has_sub = subs > 0
        if has_sub.any():
            pairs = np.stack([ids[has_sub], subs[has_sub]], axis=1)  # (k, 2) in token order
            unique, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
            for u in np.argsort(first, kind="stable"):  # first-seen order, as the per-token loop had it
                ext_map.setdefault((int(unique[u, 0]), int(unique[u, 1])), len(ext_map))
            columns = np.array([ext_map[(int(a), int(s))] for a, s in unique], dtype=np.int32)
            labels[has_sub] = self.tokenizer.vocab_size + columns[inverse.reshape(-1)]
        labels = np.where(ids == self.tokenizer.bos_id, self.tokenizer.eos_id, labels)
        target = np.full((n,), IGNORE_INDEX, dtype=np.int32)
        predicted = np.flatnonzero(row.context[1 : n - 1] == 0) + 1  # positions 1 .. n-2
        target[predicted] = labels[predicted + 1]
        if row.context[n - 1] == 0:
            target[n - 1] = self.tokenizer.eos_id
        return target

    def clear(self) -> None:
        self._rows = []

    def state_dict(self) -> dict[str, Any]:
        return {"max_length": self._max_length, "rows": [row.to_state() for row in self._rows],
                "num_skipped": self.num_skipped, "num_read": self.num_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["max_length"] != self._max_length:
            raise ValueError(f"data state was saved with max_length {state['max_length']}; "
                             f"this run has {self._max_length}")
        self._rows = [_Row.from_state(row) for row in state["rows"]]
        self.num_skipped = int(state["num_skipped"])
        self.num_read = int(state.get("num_read", self.num_skipped))  # absent from states saved by older versions


def open_record_source(path: str) -> JsonlDataset | SimpleDataset:
    """A binary dataset directory (with meta.bin) read in original order, or a .jsonl file."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "meta.bin")):
            raise MissingFileError(f"{path} is a directory without meta.bin; expected a CPM-Bee binary dataset")
        return SimpleDataset(path, shuffle=False)
    if os.path.isfile(path):
        return JsonlDataset(path)
    raise MissingFileError(f"dataset {path} does not exist (expected a .jsonl file or a binary dataset dir)")


class FinetuneDataset:
    """Fine-tuning batches: global batch `batch_size * world_size`, rank r gets rows [r*bs, (r+1)*bs).

    `epoch()` yields this rank's batches until the data runs out (the leftover rows are packed into a
    last, smaller batch unless `drop_last`); a rank without rows in a batch gets None.
    `start_next_epoch()` rewinds. Iterating the object runs one epoch and rewinds, like the original.
    `seed` drives answer shuffling, so batches depend only on the data, the settings and the seed.
    """

    def __init__(self, dataset_path: str, batch_size: int, max_length: int, tokenizer: CPMBeeTokenizer,
                 max_depth: int = 16, task_name: str = "task", drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_length ({max_length}) must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset_path = dataset_path
        self._batch_size = batch_size
        self._rank = rank
        self._task_name = task_name
        self._drop_last = drop_last
        self._source = open_record_source(dataset_path)
        self._packer = BatchPacker(batch_size * world_size, max_length, tokenizer, max_depth)
        self._rng = np.random.RandomState(seed)
        self._epoch_done = False

    def _global_batches(self) -> Iterator[CPMBeeBatch]:
        if self._epoch_done:
            return
        while True:
            try:
                batch = self._packer.add_data(self._source, self._task_name, self._rng)
            except EOFError:
                break
            if batch is not None:
                yield batch
        # Marked done before the last yield, so a state saved after it resumes into an empty epoch.
        self._epoch_done = True
        while len(self._packer) > 0:
            batch = self._packer.pack_batch(force=True)
            if not self._drop_last:
                yield batch

    def epoch(self) -> Iterator[CPMBeeBatch | None]:
        """This rank's batches from the current position to the end of the epoch."""
        begin, end = self._batch_size * self._rank, self._batch_size * (self._rank + 1)
        for batch in self._global_batches():
            if batch["input"].shape[0] <= begin:
                yield None
                continue
            shared = ("task_names", "raw_data", "ext_table_ids", "ext_table_sub")
            ret = {k: v[begin:end] for k, v in batch.items() if k not in shared}
            ret.update({k: batch[k] for k in shared})
            yield ret

    @property
    def num_skipped(self) -> int:
        """Records dropped so far for being longer than ``max_length`` (as the original does)."""
        return self._packer.num_skipped

    @property
    def num_read(self) -> int:
        """Records read so far (the share dropped is ``num_skipped / num_read``)."""
        return self._packer.num_read

    @property
    def first_skipped(self) -> tuple[str, int] | None:
        """``(file:line or file @ byte, at least this many tokens)`` of the first record this process dropped."""
        return self._packer.first_skipped

    def start_next_epoch(self) -> None:
        """Rewind to the first record (dropping unfinished rows) for the next epoch."""
        self._source.restart()
        self._packer.clear()
        self._epoch_done = False

    def __iter__(self) -> Iterator[CPMBeeBatch | None]:
        yield from self.epoch()
        self.start_next_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Plain Python (JSON- and `torch.load(weights_only=True)`-safe); identical on every rank."""
        if isinstance(self._source, SimpleDataset):
            local = self._source.local_state_dict()
            source = {"kind": "binary", "states": local["states"].tolist(), "block": local["block"].tolist()}
        else:
            source = {"kind": "jsonl", **self._source.state_dict()}
        name, key, pos, has_gauss, gauss = self._rng.get_state()
        return {
            "version": _STATE_VERSION, "source": source,
            "rng": {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                    "gauss": float(gauss)},
            "epoch_done": self._epoch_done, "packer": self._packer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported FinetuneDataset state version {state.get('version')!r}")
        source = dict(state["source"])
        kind = source.pop("kind")
        expected = "binary" if isinstance(self._source, SimpleDataset) else "jsonl"
        if kind != expected:
            raise ValueError(f"data state is for a {kind} dataset but {self.dataset_path} is {expected}")
        self._source.load_state_dict(source)
        r = state["rng"]
        self._rng.set_state((r["name"], np.array(r["key"], dtype=np.uint32), r["pos"], r["has_gauss"], r["gauss"]))
        self._epoch_done = bool(state["epoch_done"])
        self._packer.load_state_dict(state["packer"])
