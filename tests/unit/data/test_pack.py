"""FinetuneDataset: jsonl and binary sources agree, rank slicing, drop_last, resume, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cpm_live.data import DataFormatError, PickleSerializer, build_dataset
from cpm_live.data.pack import FinetuneDataset
from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from tests.conftest import SHARED

CCPM_EVAL = SHARED / "ccpm" / "bee_data" / "eval.jsonl"
REAL_VOCAB = SHARED / "vocab" / "bee.txt"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> CPMBeeTokenizer:
    return CPMBeeTokenizer(build_tiny_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def _samples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        s = {
            "input": "灯熄灭了又被重新点亮。" * (1 + i % 4),
            "options": {f"<option_{j}>": f"第{j}句" for j in range(4)},
            "question": "这段话形容了哪句诗的意境？",
            "<ans>": f"<option_{i % 4}>",
        }
        if i % 3 == 0:  # nested answers are shuffled with the dataset's RNG
            s["<ans>"] = {"<mask_0>": "中国", "人": "我们", "b": {"c": "x", "d": "😀"}}
        out.append(s)
    return out


SAMPLES = _samples(37)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    jsonl = root / "train.jsonl"
    jsonl.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SAMPLES), encoding="utf-8")
    with build_dataset(str(root / "bin"), "train") as w:  # one 16 MiB block: same order as the file
        for s in SAMPLES:
            w.write(s)
    with build_dataset(str(root / "legacy"), "train", serializer=PickleSerializer()) as w:
        for s in SAMPLES:
            w.write(s)
    return {"jsonl": str(jsonl), "bin": str(root / "bin"), "legacy": str(root / "legacy")}


def assert_batches_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is None:
            continue
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], np.ndarray):
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def _make(tok, path, **kw) -> FinetuneDataset:
    kw.setdefault("max_depth", 8)
    return FinetuneDataset(path, kw.pop("batch_size", 3), kw.pop("max_length", 160), tok, **kw)


def _reference_targets(batch: dict, tok: CPMBeeTokenizer) -> tuple[np.ndarray, list, list]:
    """The original CPM-Bee packer's per-token label loop, read from the padded batch arrays: targets,
    and the ext table (first-seen order of (id, subscript) over rows, then tokens)."""
    target = np.full(batch["input"].shape, IGNORE_INDEX, dtype=np.int32)
    ext: dict[tuple[int, int], int] = {}
    for i, n in enumerate(batch["length"]):
        for j in range(n):
            idx, sub = int(batch["input"][i, j]), int(batch["input_sub"][i, j])
            label = tok.vocab_size + ext.setdefault((idx, sub), len(ext)) if sub > 0 else idx
            if j > 1 and not batch["context"][i, j - 1]:
                target[i, j - 1] = label if idx != tok.bos_id else tok.eos_id
        if not batch["context"][i, n - 1]:
            target[i, n - 1] = tok.eos_id
    return target, [k[0] for k in ext] or [0], [k[1] for k in ext] or [1]


def test_targets_and_ext_table_match_the_original_per_token_loop(tok, data):
    sources = [(tok, data["jsonl"], 160)]
    if CCPM_EVAL.exists() and REAL_VOCAB.exists():  # real data: many subscripted (ext) tokens
        sources.append((CPMBeeTokenizer(str(REAL_VOCAB)), str(CCPM_EVAL), 512))
    for tokenizer, path, max_length in sources:
        batches = list(FinetuneDataset(path, 4, max_length, tokenizer, seed=3))
        assert len(batches) > 1 and any((b["input_sub"] > 0).any() for b in batches)
        for batch in batches:
            target, ext_ids, ext_sub = _reference_targets(batch, tokenizer)
            assert np.array_equal(batch["target"], target)
            assert batch["ext_table_ids"].tolist() == ext_ids and batch["ext_table_sub"].tolist() == ext_sub


def test_jsonl_and_binary_sources_give_identical_batches(tok, data):
    ref = list(_make(tok, data["jsonl"]))
    assert len(ref) > 3
    assert_batches_equal(ref, list(_make(tok, data["bin"])))
    assert_batches_equal(ref, list(_make(tok, data["legacy"])))
    batch = ref[0]
    assert batch["input"].shape == (3, 160) and batch["context"].dtype == np.bool_
    assert sum(len(b["raw_data"]) for b in ref) == len(SAMPLES)  # every sample packed exactly once


def test_batches_are_seeded(tok, data):
    a = list(_make(tok, data["jsonl"], seed=1))
    assert_batches_equal(a, list(_make(tok, data["jsonl"], seed=1)))
    b = list(_make(tok, data["jsonl"], seed=2))
    assert any(not np.array_equal(x["input"], y["input"]) for x, y in zip(a, b))


def test_rank_slices_of_the_global_batch(tok, data):
    whole = list(_make(tok, data["jsonl"], batch_size=4))
    parts = [list(_make(tok, data["jsonl"], batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for g, p0, p1 in zip(whole, *parts):
        rows = g["input"].shape[0]
        assert np.array_equal(p0["input"], g["input"][:2]) and np.array_equal(p0["target"], g["target"][:2])
        if rows <= 2:
            assert p1 is None
            continue
        assert np.array_equal(p1["input"], g["input"][2:4]) and np.array_equal(p1["length"], g["length"][2:4])
        for shared in ("ext_table_ids", "ext_table_sub", "task_names", "raw_data"):  # global, not sliced
            assert np.array_equal(p1[shared], g[shared]) if shared.startswith("ext") else p1[shared] == g[shared]


def test_last_partial_batch_and_drop_last(tok, data):
    full = list(_make(tok, data["jsonl"], batch_size=5))
    dropped = list(_make(tok, data["jsonl"], batch_size=5, drop_last=True))
    assert_batches_equal(full[:-1], dropped)
    assert full[-1]["input"].shape[0] <= 5


def test_epochs_rewind(tok, data):
    ds = _make(tok, data["jsonl"])
    first = list(ds.epoch())
    assert list(ds.epoch()) == []  # the epoch is over until start_next_epoch
    ds.start_next_epoch()
    second = list(ds.epoch())
    assert len(second) == len(first)
    assert sum(len(b["raw_data"]) for b in second) == len(SAMPLES)


def _state_round_trip(state: dict, tmp_path: Path) -> dict:
    """Through JSON and through torch.save / torch.load(weights_only=True)."""
    state = json.loads(json.dumps(state))
    torch.save(state, tmp_path / "s.pt")
    return torch.load(tmp_path / "s.pt", weights_only=True)


@pytest.mark.parametrize("source", ["jsonl", "bin"])
@pytest.mark.parametrize("stop", [0, 1, 4, "end"])
def test_resume_gives_the_uninterrupted_batches(tok, data, tmp_path, source, stop):
    """Two epochs uninterrupted vs. stopping after `stop` batches of epoch 1 and resuming."""
    ref_ds = _make(tok, data[source], seed=7)
    reference = list(ref_ds.epoch())
    n = len(reference) if stop == "end" else stop
    ref_ds.start_next_epoch()
    reference += list(ref_ds.epoch())

    ds = _make(tok, data[source], seed=7)
    it = ds.epoch()
    head = [next(it) for _ in range(n)]
    state = _state_round_trip(ds.state_dict(), tmp_path)

    resumed = _make(tok, data[source], seed=12345)  # the seed is overwritten by the state
    resumed.load_state_dict(state)
    tail = list(resumed.epoch())
    resumed.start_next_epoch()
    tail += list(resumed.epoch())
    assert_batches_equal(head + tail, reference)


def test_state_mismatch_is_refused(tok, data):
    state = _make(tok, data["jsonl"]).state_dict()
    with pytest.raises(ValueError, match="is for a jsonl dataset"):
        _make(tok, data["bin"]).load_state_dict(state)
    with pytest.raises(ValueError, match="max_length 160; this run has 64"):
        _make(tok, data["jsonl"], max_length=64).load_state_dict(state)


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"input": "a", "<ans>": "b"', "line contains invalid json"),
        ('["not", "an", "object"]', "expected a JSON object, got list"),
        ('{"<问题>": "x", "<ans>": "y"}', "Invalid token <问题>"),
        ('{"input": "a<b", "<ans>": "y"}', "Unexpected end of text"),
        ('{"input": 5, "<ans>": "y"}', "Invalid data 5"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(tok, tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"input": "a", "<ans>": "b"})
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"bad.jsonl:4: .*{reason}"):
        list(_make(tok, str(path)))


def test_malformed_binary_record_names_file_and_offset(tok, tmp_path):
    with build_dataset(str(tmp_path / "d"), "part") as w:
        w.write({"input": "a", "<ans>": "b"})
        w.write({"<问题>": "x"})
    # The dataset is read last block first; both records share block 0, read in order.
    with pytest.raises(DataFormatError, match=r"d/part @ byte \d+: Invalid token <问题>"):
        list(_make(tok, str(tmp_path / "d")))


def test_missing_dataset_is_a_clear_error(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _make(tok, str(tmp_path / "nope.jsonl"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileNotFoundError, match="without meta.bin"):
        _make(tok, str(tmp_path / "dir"))


@pytest.mark.realvocab
@pytest.mark.skipif(not (CCPM_EVAL.is_file() and REAL_VOCAB.is_file()), reason="CCPM data or vocab absent")
def test_ccpm_tutorial_data_packs(tmp_path):
    real = CPMBeeTokenizer(REAL_VOCAB)
    lines = CCPM_EVAL.read_text(encoding="utf-8").splitlines()[:64]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    batches = list(FinetuneDataset(str(path), 4, 256, real, max_depth=8))
    assert sum(len(b["raw_data"]) for b in batches) == 64
    first = batches[0]
    # Answers are `<option_k>`: predicted as the `<option>` base with a subscript, labelled via ext ids.
    labels = first["target"][first["target"] != IGNORE_INDEX]
    assert set(labels.tolist()) <= {real.eos_id} | set(range(real.vocab_size, real.vocab_size + 4)) | {10}
    assert (first["ext_table_ids"] == 10).all()
