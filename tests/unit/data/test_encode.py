"""convert_data_to_id against a worked example written out by hand, and the batch packer's targets."""

import random

import numpy as np
import pytest

from cpm_live.data.encode import convert_data_to_id, rel_to_bucket
from cpm_live.data.pack import BatchPacker
from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.errors import DataFormatError
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from tests.conftest import SHARED

REAL_VOCAB = SHARED / "vocab" / "bee.txt"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> CPMBeeTokenizer:
    return CPMBeeTokenizer(build_tiny_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


# The non-zero segment_rel entries (q, k) -> value of the worked example.
EXAMPLE_REL = {
    (1, 0): 9, (0, 1): 2, (2, 1): 9, (1, 2): 2, (2, 0): 17, (0, 2): 3, (3, 0): 9, (0, 3): 2, (3, 1): 10,
    (1, 3): 10, (3, 2): 11, (2, 3): 18, (4, 3): 9, (3, 4): 2, (4, 0): 17, (0, 4): 3, (4, 1): 18, (1, 4): 11,
    (4, 2): 19, (2, 4): 19,
}  # fmt: skip


def _check_worked_example(tok: CPMBeeTokenizer) -> None:
    ids, subs, context, segs, rel, n, states = convert_data_to_id(tok, {"input": "AB", "<ans>": "C"})
    word, ab = tok.encode("input")[0], tok.encode("AB")[0]
    c = tok.encoder["C"]
    expected = [6, 8, 7] + [6, *word, 7] + [6, *ab, 7] + [6, 9, 7] + [6, c]
    assert ids.tolist() == expected and ids.dtype == np.int32
    assert subs.tolist() == [0] * len(expected) and subs.dtype == np.int32
    assert context.dtype == np.int8 and context.tolist() == [1] * (len(expected) - 2) + [0, 0]
    seg_lens = [3, len(word) + 2, len(ab) + 2, 3, 2]
    assert segs.tolist() == [i for i, k in enumerate(seg_lens) for _ in range(k)]
    assert n == 5 and rel.dtype == np.int32 and rel.shape == (25,)
    assert {(q, k): int(rel[q * 5 + k]) for q in range(5) for k in range(5) if rel[q * 5 + k]} == EXAMPLE_REL
    assert states == {"ext_table": {}, "token_id_table": {}}


def test_worked_example_tiny_vocab(tok):
    _check_worked_example(tok)


@pytest.mark.realvocab
@pytest.mark.skipif(not REAL_VOCAB.is_file(), reason="real vocab not present")
def test_worked_example_real_vocab():
    real = CPMBeeTokenizer(REAL_VOCAB)
    _check_worked_example(real)
    assert convert_data_to_id(real, {"input": "AB", "<ans>": "C"})[0][3:6].tolist() == [6, 65678, 7]


def _reference_rel(data, max_depth: int) -> np.ndarray:
    """Brute force: DFS numbering with parents, then the LCA formula for every pair."""
    depth, parent = [0], [-1]

    def visit(node, d, par):
        if isinstance(node, dict):
            for v in node.values():
                depth.append(d)
                parent.append(par)
                visit(v, d + 1, len(depth) - 1)
        else:
            depth.append(d)
            parent.append(par)

    visit(data, 1, 0)
    n = len(depth)

    def ancestors(i):
        out = []
        while i != -1:
            out.append(i)
            i = parent[i]
        return out

    rel = np.zeros((n * n,), dtype=np.int32)
    for q in range(n):
        for k in range(n):
            if q == k:
                continue
            c = next(a for a in ancestors(q) if a in set(ancestors(k)))
            up, down = min(depth[q] - depth[c], max_depth - 1), min(depth[k] - depth[c], max_depth - 1)
            v = up * max_depth + down
            rel[q * n + k] = 0 if v == 0 else v + 1
    return rel


def _random_sample(r: random.Random, depth: int = 1):
    out = {}
    for i in range(r.randint(1, 3)):
        key = r.choice(["input", "question", "options", "a", "b"]) + str(i)
        out[key] = _random_sample(r, depth + 1) if depth < 6 and r.random() < 0.4 else "xy"
    return out


@pytest.mark.parametrize("max_depth", [8, 3, 2])
def test_segment_rel_matches_lca_formula(tok, max_depth):
    r = random.Random(max_depth)
    for _ in range(30):
        data = _random_sample(r)
        _, _, _, _, rel, n, _ = convert_data_to_id(tok, data, shuffle_answer=False, max_depth=max_depth)
        assert rel.tolist() == _reference_rel(data, max_depth).tolist()


def test_rel_to_bucket():
    assert rel_to_bucket(0, 0) == 0
    assert rel_to_bucket(0, 1) == 2  # 1 is reserved for "other sample/span"
    assert rel_to_bucket(7, 7) == 64
    assert rel_to_bucket(1, 2, max_depth=16) == 19


def test_nested_answer_subscripts_and_context(tok):
    v = tok.vocab_size
    data = {
        "input": "a<mask_0>b😀",
        "options": {"<option_3>": "x", "<option_0>": "y"},
        "<ans>": {"<mask_0>": "c😀", "<option_3>": "z"},
    }
    ids, subs, context, segs, rel, n, states = convert_data_to_id(tok, data, shuffle_answer=False)
    # Segments: root, input, value, options, <option_3>, x, <option_0>, y, <ans>, <mask_0>, c😀, <option_3>, z
    assert n == 13
    base = {"<mask>": 2, "<option>": 10, "<unk>": 1}
    # Subscripts count first appearances per base from 0, whatever the written suffix is.
    assert states["token_id_table"] == {
        "<mask>": {v: 0},
        "<unk>": {v + 1: 0},
        "<option>": {v + 2: 0, v + 3: 1},
    }
    assert states["ext_table"] == {v: "<mask_0>", v + 1: "😀", v + 2: "<option_3>", v + 3: "<option_0>"}
    seg_tokens = {i: (ids[segs == i].tolist(), subs[segs == i].tolist()) for i in range(n)}
    assert seg_tokens[4] == ([6, base["<option>"], 7], [0, 0, 0])  # <option_3>, first option -> sub 0
    assert seg_tokens[6] == ([6, base["<option>"], 7], [0, 1, 0])  # <option_0>, second -> sub 1
    assert seg_tokens[2] == ([6, tok.encoder["a"], 2, tok.encoder["b"], 1, 7], [0, 0, 0, 0, 0, 0])
    # Predicted leaves (under <ans>) have no eos and context 0; their keys stay context.
    assert seg_tokens[10] == ([6, tok.encoder["c"], 1], [0, 0, 0])
    assert seg_tokens[12] == ([6, tok.encoder["z"]], [0, 0])
    assert context[segs == 9].tolist() == [1, 1, 1] and context[segs == 11].tolist() == [1, 1, 1]
    assert context[segs == 10].tolist() == [0, 0, 0] and context[segs == 12].tolist() == [0, 0]
    assert context[segs != 10][segs[segs != 10] != 12].all()


def test_answer_shuffle_is_seeded_and_matches_global_numpy(tok):
    data = {"input": "q", "<ans>": {f"k{i}": f"v{i}" for i in range(6)}}
    plain = convert_data_to_id(tok, data, shuffle_answer=False)
    a = convert_data_to_id(tok, data, rng=np.random.RandomState(3))
    b = convert_data_to_id(tok, data, rng=np.random.RandomState(3))
    np.random.seed(3)
    c = convert_data_to_id(tok, data)  # no rng: the global np.random, as in the original
    assert a[0].tolist() == b[0].tolist() == c[0].tolist()
    assert a[0].tolist() != plain[0].tolist()
    assert sorted(a[0].tolist()) == sorted(plain[0].tolist())
    # Dicts outside <ans> are never shuffled.
    other = {"input": {f"k{i}": "v" for i in range(6)}, "<ans>": "x"}
    np.random.seed(0)
    assert (
        convert_data_to_id(tok, other)[0].tolist()
        == convert_data_to_id(tok, other, shuffle_answer=False)[0].tolist()
    )


def test_prev_ext_states_share_subscripts(tok):
    v = tok.vocab_size
    *_, states = convert_data_to_id(tok, {"q": "<option_1>😀"})
    before = {k: dict(t) for k, t in states["token_id_table"].items()}
    ids, subs, *_, states2 = convert_data_to_id(tok, {"q": "<option_2><option_1>"}, prev_ext_states=states)
    assert subs[ids == 10].tolist() == [1, 0]
    assert states2["token_id_table"]["<option>"] == {v: 0, v + 2: 1}
    assert states["token_id_table"] == before  # the passed states are not modified


@pytest.mark.parametrize(
    "data,error",
    [
        ({"<问题>": "x"}, "Invalid token <问题>"),
        ({"input": "a<b"}, "Unexpected end of text"),
        ({"input": 3}, "Invalid data 3 at <root>.input"),
        ({"input": ["a"]}, "Invalid data"),
    ],
)
def test_invalid_samples_raise_value_error(tok, data, error):
    with pytest.raises(ValueError, match=error):
        convert_data_to_id(tok, data)


# ------------------------------------------------------------------ packer


class _ListSource:
    def __init__(self, records):
        self.records = list(records)
        self.i = 0
        self.location = "mem"

    def read(self):
        if self.i >= len(self.records):
            raise EOFError
        self.i += 1
        self.location = f"mem:{self.i}"
        return self.records[self.i - 1]


def test_packer_targets_of_worked_example(tok):
    packer = BatchPacker(1, 32, tok, max_depth=8)
    src = _ListSource([{"input": "AB", "<ans>": "C"}])
    assert packer.add_data(src, "t", np.random.RandomState(0)) is None  # emits only above batch_size
    batch = packer.pack_batch(force=True)
    n = int(batch["length"][0])
    target = batch["target"][0]
    c = tok.encoder["C"]
    # bos of the answer segment -> c, c -> eos, everything else ignored.
    assert target[n - 2] == c and target[n - 1] == tok.eos_id
    assert (target[: n - 2] == IGNORE_INDEX).all() and (target[n:] == IGNORE_INDEX).all()
    assert batch["context"].dtype == np.bool_ and batch["context"][0, : n - 2].all()
    assert batch["ext_table_ids"].tolist() == [0] and batch["ext_table_sub"].tolist() == [1]  # placeholder
    assert batch["task_names"] == ["t"] and batch["raw_data"] == [{"input": src.records[0], "samples": []}]


def test_packer_ext_labels_best_fit_and_offsets(tok):
    v = tok.vocab_size
    samples = [
        {"q": "abc", "<ans>": "<option_1><option_0>"},  # 3 + 3 + 5 + 3 + 3 = 17 tokens
        {"q": "x" * 16, "<ans>": "y"},  # 29 tokens: a second row
        {"q": "a"},  # 9 tokens fit both rows: best fit is the one with less space left
    ]
    packer = BatchPacker(3, 40, tok, max_depth=8)
    src = _ListSource(samples)
    for _ in samples:
        assert packer.add_data(src, "t", np.random.RandomState(0)) is None
    batch = packer.pack_batch(force=True)
    assert batch["length"].tolist() == [17, 38] and batch["span"][1].max() == 1  # row 1 holds 2 instances
    assert batch["span"][1, 28].item() == 0 and batch["span"][1, 29].item() == 1
    row0 = batch["input"][0, : batch["length"][0]]
    # <option_1> then <option_0> in the answer: subs 0 and 1; only sub > 0 enters the ext table.
    assert batch["ext_table_ids"].tolist() == [10] and batch["ext_table_sub"].tolist() == [1]
    tgt = batch["target"][0]
    opt_pos = np.nonzero(row0 == 10)[0]
    assert tgt[opt_pos[0] - 1] == 10 and tgt[opt_pos[1] - 1] == v + 0 and tgt[opt_pos[1]] == tok.eos_id
    # The second instance in row 1 has its rel block right after the first one's.
    n1 = convert_data_to_id(tok, samples[1])[5]
    second = batch["span"][1] == 1
    assert (batch["segment_rel_offset"][1][second] == n1 * n1).all()
    assert batch["segment_rel"].shape[1] == n1 * n1 + 3 * 3


def test_packer_emits_when_rows_exceed_batch_size(tok):
    packer = BatchPacker(2, 24, tok)
    src = _ListSource([{"q": "abcdefg", "<ans>": "h"}] * 5)  # 20 tokens: one per row
    rng = np.random.RandomState(0)
    out = [packer.add_data(src, "t", rng) for _ in range(5)]
    assert [b is not None for b in out] == [False, False, True, False, True]
    assert out[2]["input"].shape == (2, 24) and len(packer) == 1


def test_packer_skips_too_long_and_wraps_errors(tok):
    packer = BatchPacker(1, 14, tok)
    src = _ListSource([{"q": "a" * 30, "<ans>": "b"}, {"q": "a", "<ans>": "b"}, {"<问题>": "x"}, ["list"]])
    rng = np.random.RandomState(0)
    packer.add_data(src, "t", rng)
    assert packer.num_skipped == 1 and src.i == 2 and packer.num_read == 2
    assert packer.first_skipped[0] == "mem:1" and packer.first_skipped[1] > 14
    with pytest.raises(DataFormatError, match="mem:3: Invalid token <问题>"):
        packer.add_data(src, "t", rng)
    with pytest.raises(DataFormatError, match="mem:4: a sample must be a JSON object, got list"):
        packer.add_data(src, "t", rng)


def test_packer_drops_a_record_of_many_segments_before_building_its_relation_table(tok):
    packer = BatchPacker(1, 64, tok)
    many = {"q": {f"k{i}": "" for i in range(50_000)}, "<ans>": "b"}  # 100k segments: a 40 GB n*n table
    src = _ListSource([many, {"q": "a", "<ans>": "b"}])
    packer.add_data(src, "t", np.random.RandomState(0))
    assert packer.num_skipped == 1 and packer.first_skipped == ("mem:1", 100_004)
