"""Binary dataset format: layout, sharding, state, safe payloads, shuffle, preprocess."""

import json
import os
import pickle
import struct

import pytest
import torch

from cpm_live.data import (
    DataFormatError,
    DistributedDataset,
    JsonlDataset,
    PickleSerializer,
    RawSerializer,
    SimpleDataset,
    build_dataset,
    safe_pickle_loads,
    shuffle_dataset,
)
from cpm_live.data.preprocess import main as preprocess_main
from cpm_live.engine import get_engine

SMALL_BLOCK = 64  # a few records per block, so tests see many blocks


def _write(path, name, records, block_size=SMALL_BLOCK, serializer=None):
    with build_dataset(str(path), name, block_size=block_size, serializer=serializer) as writer:
        for r in records:
            writer.write(r)


def _read_all(ds):
    out = []
    while True:
        try:
            out.append(ds.read())
        except EOFError:
            return out


def _blocks_of(path, name, block_size=SMALL_BLOCK):
    """Decode a data file directly: list of blocks, each a list of JSON records."""
    raw = open(os.path.join(path, name), "rb").read()
    assert len(raw) % block_size == 0
    blocks = []
    for b in range(len(raw) // block_size):
        block, pos, recs = raw[b * block_size : (b + 1) * block_size], 0, []
        while block[pos : pos + 1] == b"\x1f":
            (n,) = struct.unpack("<I", block[pos + 1 : pos + 5])
            recs.append(json.loads(block[pos + 5 : pos + 5 + n]))
            pos += 5 + n
        assert set(block[pos:]) == {0}  # zero filled after the last record
        blocks.append(recs)
    return blocks


RECORDS = [{"i": i, "text": "记录" * (i % 5)} for i in range(40)]


def test_layout_and_meta(tmp_path):
    _write(tmp_path, "part0", RECORDS)
    blocks = _blocks_of(tmp_path, "part0")
    assert [r for b in blocks for r in b] == RECORDS
    assert len(blocks) > 5
    payloads = [json.dumps(r, ensure_ascii=False).encode() for r in RECORDS]
    meta = (tmp_path / "meta.bin").read_text(encoding="utf-8").splitlines()
    assert len(meta) == 1
    assert list(json.loads(meta[0])) == [
        "file_name", "block_begin", "block_end", "nbytes", "nlines", "mask", "block_size"
    ]  # fmt: skip
    assert json.loads(meta[0]) == {
        "file_name": "part0", "block_begin": 0, "block_end": len(blocks),
        "nbytes": sum(4 + len(p) for p in payloads), "nlines": 40, "mask": False, "block_size": SMALL_BLOCK,
    }  # fmt: skip
    assert meta[0] == json.dumps(json.loads(meta[0]))  # default json.dumps separators
    assert sorted(os.listdir(tmp_path)) == ["meta.bin", "part0"]  # no temp files left behind


def test_block_fit_rule(tmp_path):
    # offset + 2 + 4 + len <= block_size: a 58-byte payload fills a 64-byte block but one byte.
    _write(tmp_path, "d", [b"x" * 58, b"y" * 57], serializer=RawSerializer())
    raw = (tmp_path / "d").read_bytes()
    assert len(raw) == 2 * SMALL_BLOCK and raw[63] == 0 and raw[64] == 0x1F
    with pytest.raises(ValueError, match="does not fit a block of 64 bytes"):
        _write(tmp_path, "e", [b"z" * 59], serializer=RawSerializer())
    assert not (tmp_path / "e").exists()
    assert [json.loads(x)["file_name"] for x in (tmp_path / "meta.bin").read_text().splitlines()] == ["d"]


def test_second_file_continues_block_ids_and_names_are_unique(tmp_path):
    _write(tmp_path, "a", RECORDS[:10])
    _write(tmp_path, "b", RECORDS[10:])
    info = [json.loads(x) for x in (tmp_path / "meta.bin").read_text().splitlines()]
    assert info[1]["block_begin"] == info[0]["block_end"] > 0
    with pytest.raises(ValueError, match="Dataset name exists"):
        build_dataset(str(tmp_path), "a")
    assert sorted(_read_all(SimpleDataset(str(tmp_path))), key=lambda r: r["i"]) == RECORDS


def test_simple_dataset_reads_last_block_first(tmp_path):
    _write(tmp_path, "part0", RECORDS)
    blocks = _blocks_of(tmp_path, "part0")
    ds = SimpleDataset(str(tmp_path), shuffle=False)
    assert len(ds) == 40
    assert list(ds) == [r for b in reversed(blocks) for r in b]
    assert list(ds) == [r for b in reversed(blocks) for r in b]  # iterating restarts the pass


def test_rank_sharding_by_block(tmp_path):
    _write(tmp_path, "a", RECORDS[:15])
    _write(tmp_path, "b", RECORDS[15:])
    blocks = _blocks_of(tmp_path, "a") + _blocks_of(tmp_path, "b")
    seen = []
    for rank in range(3):
        ds = DistributedDataset(str(tmp_path), rank, 3, max_repeat_times=1, shuffle=False)
        got = _read_all(ds)
        mine = [b for b in range(len(blocks)) if b % 3 == rank]
        assert got == [r for b in reversed(mine) for r in blocks[b]]
        seen += got
    assert sorted(seen, key=lambda r: r["i"]) == RECORDS


def test_epochs_repeat_and_restart(tmp_path):
    _write(tmp_path, "a", RECORDS)
    ds = DistributedDataset(str(tmp_path), 0, 1, max_repeat_times=2, shuffle=True, seed=1)
    first = [ds.read() for _ in range(40)]
    second = [ds.read() for _ in range(40)]
    assert sorted(first, key=lambda r: r["i"]) == sorted(second, key=lambda r: r["i"]) == RECORDS
    with pytest.raises(EOFError):
        ds.read()
    ds.restart()
    assert ds.read() in RECORDS
    # Same seed, same block order.
    again = DistributedDataset(str(tmp_path), 0, 1, max_repeat_times=2, shuffle=True, seed=1)
    assert [again.read() for _ in range(40)] == first


@pytest.mark.parametrize("stop", [0, 1, 7, 23, 40])
def test_state_round_trip_same_world(tmp_path, stop):
    _write(tmp_path, "a", RECORDS)
    ds = DistributedDataset(str(tmp_path), 0, 1, max_repeat_times=2, seed=5)
    for _ in range(stop):
        ds.read()
    state = ds.state_dict()
    assert state["states"].dtype == torch.long and state["block"].shape == (1, 4)
    expected = _read_all(ds)
    resumed = DistributedDataset(str(tmp_path), 0, 1, max_repeat_times=2, seed=99)
    resumed.load_state_dict(state)
    assert _read_all(resumed) == expected


def test_state_redistributes_to_another_world_size(tmp_path):
    _write(tmp_path, "a", RECORDS)
    nblocks = json.loads((tmp_path / "meta.bin").read_text())["block_end"]
    old = [DistributedDataset(str(tmp_path), r, 2, shuffle=False) for r in range(2)]
    for ds in old:
        ds.read()  # each rank is inside one block; those partly read blocks are dropped on resize
    state = DistributedDataset.merge_state_dicts([ds.local_state_dict() for ds in old])
    assert state["states"].shape[0] == 2 and state["block"][:, 0].tolist() == [nblocks - 2, nblocks - 1]
    unused = {b for row, n in zip(state["states"].tolist(), state["block"][:, 2].tolist()) for b in row[:n]}
    with pytest.raises(ValueError, match=r"world_size changed \(2 -> 3\)"):
        DistributedDataset(str(tmp_path), 0, 3).load_state_dict(state)
    got = set()
    for rank in range(3):
        ds = DistributedDataset(str(tmp_path), rank, 3, max_repeat_times=1, shuffle=False)
        ds.load_state_dict(state, strict=False)
        assert all(b % 3 == rank for b in ds._unused_block)
        got |= set(ds._unused_block)
        _read_all(ds)
    assert got == unused


def _gather_worker(rank, path, init_file, out_dir):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))  # the engine joins this group
    engine = get_engine("torch", device="cpu")
    ds = DistributedDataset(path, rank, 2, shuffle=False)
    for _ in range(rank + 1):
        ds.read()
    torch.save(ds.state_dict(engine.all_gather_object), os.path.join(out_dir, f"state{rank}.pt"))
    if rank == 0:
        with pytest.raises(ValueError, match="all_gather_object=engine.all_gather_object"):
            ds.state_dict()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_state_dict_gathers_across_processes(tmp_path):
    data = tmp_path / "data"
    _write(data, "a", RECORDS)
    torch.multiprocessing.start_processes(
        _gather_worker,
        args=(str(data), str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        start_method="fork",  # real gloo processes, without re-importing torch in each
    )
    states = [torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(states[0]["states"], states[1]["states"]) and states[0]["block"].shape == (2, 4)
    local = [DistributedDataset(str(data), r, 2, shuffle=False) for r in range(2)]
    for r, ds in enumerate(local):
        for _ in range(r + 1):
            ds.read()
    merged = DistributedDataset.merge_state_dicts([ds.local_state_dict() for ds in local])
    assert torch.equal(merged["states"], states[0]["states"]) and torch.equal(
        merged["block"], states[0]["block"]
    )


def test_dataset_may_grow_while_reading(tmp_path):
    _write(tmp_path, "a", RECORDS[:5], block_size=1 << 12)
    ds = DistributedDataset(str(tmp_path), 0, 1, max_repeat_times=1, shuffle=False)
    first = [ds.read() for _ in range(5)]
    _write(tmp_path, "b", RECORDS[5:10], block_size=1 << 12)
    assert first == RECORDS[:5] and _read_all(ds) == RECORDS[5:10]
    (tmp_path / "meta.bin").write_text((tmp_path / "meta.bin").read_text().replace('"b"', '"c"'))
    with pytest.raises(RuntimeError, match="changed unexpectedly"):
        ds.state_dict()


def test_writer_error_leaves_dataset_unchanged(tmp_path):
    _write(tmp_path, "a", RECORDS[:3])
    meta = (tmp_path / "meta.bin").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        with build_dataset(str(tmp_path), "b") as writer:
            writer.write({"x": 1})
            raise RuntimeError("boom")
    assert (tmp_path / "meta.bin").read_text() == meta and not (tmp_path / "b").exists()


# ------------------------------------------------------------------ payloads


def test_legacy_pickle_records_are_read(tmp_path):
    records = [{"input": "a", "<ans>": {"x": "y"}, "n": [1, 2.5, None, True, ("t", 1)]}, {"k": "v"}]
    _write(tmp_path, "legacy", records, serializer=PickleSerializer(), block_size=1 << 12)
    _write(tmp_path, "new", records, block_size=1 << 12)  # JSON; auto-detected per record
    got = list(SimpleDataset(str(tmp_path), shuffle=False))
    assert got[:2] == [{**records[0], "n": [1, 2.5, None, True, ["t", 1]]}, records[1]]  # JSON file first
    assert got[2:] == records
    assert safe_pickle_loads(pickle.dumps({"a": [1]}, protocol=0)) == {"a": [1]}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"input": _Evil(str(marker))}, protocol=protocol)
    data = tmp_path / "data"
    _write(data, "evil", [payload], serializer=RawSerializer(), block_size=1 << 12)
    with pytest.raises(DataFormatError, match=r"evil @ byte 0: refusing to unpickle (posix|nt)\.mkdir"):
        SimpleDataset(str(data)).read()
    assert not marker.exists()


def test_non_plain_pickle_values_are_refused():
    for value in ({1, 2}, b"bytes", {"k": bytearray(b"x")}):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            safe_pickle_loads(pickle.dumps(value))


def test_corrupt_record_names_file_and_offset(tmp_path):
    _write(tmp_path, "a", [{"x": 1}, {"x": 2}], block_size=1 << 12)
    raw = bytearray((tmp_path / "a").read_bytes())
    second = 5 + len(b'{"x": 1}')
    raw[second] = 0x42
    (tmp_path / "a").write_bytes(bytes(raw))
    ds = SimpleDataset(str(tmp_path), shuffle=False)
    assert ds.read() == {"x": 1}
    with pytest.raises(DataFormatError, match=rf"a @ byte {second}: invalid magic header"):
        ds.read()
    raw[second] = 0x1F
    raw[second + 5 : second + 13] = b"not json"
    (tmp_path / "a").write_bytes(bytes(raw))
    ds = SimpleDataset(str(tmp_path), shuffle=False)
    ds.read()
    with pytest.raises(
        DataFormatError, match=rf"a @ byte {second}: .*JSON.*pickle"
    ):
        ds.read()


def test_missing_meta_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.bin not found"):
        SimpleDataset(str(tmp_path))


# ------------------------------------------------------------------ shuffle and preprocess


def test_shuffle_dataset_is_a_seeded_permutation(tmp_path):
    _write(tmp_path / "src", "a", RECORDS)
    shuffle_dataset(str(tmp_path / "src"), str(tmp_path / "t1"), output_name="s", seed=3, bucket_size=256)
    shuffle_dataset(str(tmp_path / "src"), str(tmp_path / "t2"), output_name="s", seed=3, bucket_size=256)
    one = list(SimpleDataset(str(tmp_path / "t1"), shuffle=False))
    assert one == list(SimpleDataset(str(tmp_path / "t2"), shuffle=False))
    assert one != RECORDS and sorted(one, key=lambda r: r["i"]) == RECORDS
    assert sorted(os.listdir(tmp_path / "t1")) == ["meta.bin", "s"]


def test_preprocess_script_writes_json_datasets(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    train = [{"input": f"句子{i}", "<ans>": str(i)} for i in range(30)]
    (src / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in train) + "\n\n")
    (src / "eval.jsonl").write_text(json.dumps(train[0]) + "\n")
    out = tmp_path / "out"
    assert preprocess_main(["--input", str(src), "--output-path", str(out), "--output_name", "ccpm"]) == 0
    got = list(SimpleDataset(str(out / "train"), shuffle=False))
    assert sorted(got, key=lambda r: int(r["<ans>"])) == train and got != train
    raw = (out / "train" / "ccpm").read_bytes()
    assert raw[5:6] == b"{"  # JSON payloads, not pickles
    assert list(SimpleDataset(str(out / "eval"))) == [train[0]]
    assert sorted(os.listdir(out / "train")) == ["ccpm", "meta.bin"]


@pytest.mark.parametrize("bad, message", [
    ('{"a": 2\n', "line contains invalid json"),
    ("[1]\n", "expected a JSON object"),
    ('{"a": "' + "x" * 5000 + '"}\n', "does not fit a block of 4096 bytes"),
], ids=["bad-json", "not-object", "too-large"])
def test_preprocess_bad_record_names_file_and_line_and_leaves_no_output(tmp_path, bad, message):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a-good.jsonl").write_text('{"a": "1"}\n')  # converts first: must not appear either
    (src / "b-bad.jsonl").write_text('{"a": "1"}\n\n' + bad)
    with pytest.raises(SystemExit, match=rf"^error: {src / 'b-bad.jsonl'}:3: .*{message}") as info:
        preprocess_main(["--input", str(src), "--output_path", str(out), "--output-name", "x", "--block-size", "4096"])
    assert "\n" not in str(info.value)
    assert os.listdir(out) == []  # no dataset folder, complete-looking or empty; the temp folder is gone


def test_preprocess_refuses_an_existing_dataset_before_converting(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "train.jsonl").write_text('{"a": "1"}\n')
    args = ["--input", str(src), "--output_path", str(out), "--output-name", "x"]
    assert preprocess_main(args) == 0
    before = (out / "train" / "meta.bin").read_bytes()
    with pytest.raises(SystemExit, match=f"^error: {out / 'train'} .*exists"):
        preprocess_main(args)
    assert (out / "train" / "meta.bin").read_bytes() == before and sorted(os.listdir(out)) == ["train"]


def test_jsonl_dataset_position_state(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n[1]\n{"a": 3}\n')
    ds = JsonlDataset(path)
    assert len(ds) == 4 and ds.read() == {"a": 1}
    state = ds.state_dict()
    assert ds.read() == {"a": 2} and ds.location.endswith("d.jsonl:3")
    with pytest.raises(DataFormatError, match=r"d.jsonl:4: expected a JSON object, got list"):
        ds.read()
    assert ds.read() == {"a": 3}
    with pytest.raises(EOFError):
        ds.read()
    other = JsonlDataset(path)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.read() == {"a": 2} and other.location.endswith(":3")
    ds.restart()
    assert ds.read() == {"a": 1}
