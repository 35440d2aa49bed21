"""CPMBeeTokenizer against the original's behaviour (real vocab, when present) and on a tiny vocab.

Expected ids on the real vocab were produced by the original CPM-Bee tokenizer code run on
`vocabs/bee.txt` (the same 86,583-line file as ../shared/cpm-bee/vocab/bee.txt).
"""

from pathlib import Path

import pytest

from cpm_live.checkpoint.base_model import find_vocab
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab, load_vocab
from cpm_live.tokenizers.bee import SPECIAL_TOKENS_IN_ORDER
from tests.conftest import SHARED

REAL_VOCAB = SHARED / "vocab" / "bee.txt"
realvocab = pytest.mark.skipif(not REAL_VOCAB.is_file(), reason=f"{REAL_VOCAB} not present")


@pytest.fixture(scope="module")
def real() -> CPMBeeTokenizer:
    if not REAL_VOCAB.is_file():
        pytest.skip(f"{REAL_VOCAB} not present")
    return CPMBeeTokenizer(REAL_VOCAB)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> CPMBeeTokenizer:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    return CPMBeeTokenizer(build_tiny_vocab(path, extra_words=["hello world", "灯熄"]))


# ------------------------------------------------------------------ real vocab


@pytest.mark.realvocab
@realvocab
def test_real_vocab_fixed_ids(real):
    assert real.vocab_size == len(real) == 86583
    for i, tok in enumerate(
        ["<pad>", "<unk>", "<mask>", "<sep>", "\n", " ", "<s>", "</s>", "<root>", "<ans>"]
    ):
        assert real.encoder[tok] == i
    assert (real.pad_id, real.unk_id, real.mask_id, real.bos_id, real.eos_id) == (0, 1, 2, 6, 7)
    assert real.encoder["<option>"] == 10 and real.encoder["<eod>"] == 65756
    assert "</n>" not in real.encoder and "</_>" not in real.encoder
    assert set(real.special_tokens) == {
        "<pad>",
        "<unk>",
        "<mask>",
        "<sep>",
        "<s>",
        "</s>",
        "<root>",
        "<ans>",
        "<option>",
        "<eod>",
    }
    assert [real.decoder[i] for i in (86580, 86581, 86582)] == ["）", "（", "…"]


REAL_CASES = [
    ("Hello world! 你好，世界。", [69652, 37791, 11, 5, 10273, 246, 8662, 237], {}),
    ("昏暗的灯熄灭了又被重新点亮。", [19949, 1406, 785, 22717, 268, 272, 2369, 29011, 22596, 237], {}),
    (
        "<<s> a<option_0>b <mask_1>😀😀x<option_0>",
        [40, 96, 42, 71677, 86583, 79, 5, 86584, 86585, 101, 86583],
        {86583: "<option_0>", 86584: "<mask_1>", 86585: "😀😀"},
    ),
    (
        "The quick brown fox jumps over the lazy dog.\n",
        [7025, 63905, 74142, 34206, 52208, 64585, 37619, 40423, 47721, 24, 4],
        {},
    ),
    ("emoji 🎉🎉 and 𠀀 rare", [44407, 7325, 5, 86583, 47750, 5, 86584, 82696], {86583: "🎉🎉", 86584: "𠀀"}),
    ("x <<= y <<!-- z", [101, 38618, 37633, 60669, 33504], {}),
    ("中翻英<ans>", [364, 3696, 1257, 9], {}),
    ("<s><root></s><sep><eod>", [6, 8, 7, 3, 65756], {}),
]


@pytest.mark.realvocab
@realvocab
@pytest.mark.parametrize("text,ids,ext", REAL_CASES, ids=[c[0][:12] for c in REAL_CASES])
def test_real_vocab_encode_matches_original(real, text, ids, ext):
    got_ids, got_ext = real.encode(text)
    assert got_ids == ids
    assert got_ext == ext
    assert real.decode(got_ids, got_ext) == text


@pytest.mark.realvocab
@realvocab
def test_real_vocab_pieces_and_escaped_decode(real):
    pieces = [t.token for t in real.tokenize("x <<= y <<!-- z")]
    assert pieces == ["x", " <=", " y", " <!--", " z"]  # vocab keys that contain `<` match in plain text
    # Plain `<` pieces decode escaped; specials verbatim; negative ids dropped.
    assert real.decode([real.encoder["<"], 6, -1, 5, real.encoder[" <<"]]) == "<<<s>  <<<<"


# ------------------------------------------------------------------ tiny vocab


def test_tiny_vocab_layout(tmp_path):
    path = build_tiny_vocab(tmp_path / "v.txt")
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    assert lines[: len(SPECIAL_TOKENS_IN_ORDER)] == list(SPECIAL_TOKENS_IN_ORDER)
    assert lines[-1] == "" and "<eod>" in lines
    assert len(set(lines[:-1])) == len(lines) - 1
    tok = CPMBeeTokenizer(path)
    assert (tok.pad_id, tok.unk_id, tok.mask_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 6, 7)
    assert tok.encoder["\n"] == 4 and tok.encoder[" "] == 5 and tok.encoder["<root>"] == 8
    assert tok.encoder["<ans>"] == 9 and tok.encoder["<option>"] == 10


@pytest.mark.parametrize(
    "text",
    [
        "Hello world! The model is new.",
        "中国的发展，我们的工作。",
        "a\nb  c\td",
        "昏暗的灯熄灭了又被重新点亮。",
        "x <<y>> z",
    ],
)
def test_tiny_round_trip(tiny, text):
    ids, ext = tiny.encode(text)
    assert all(0 <= i < tiny.vocab_size + len(ext) for i in ids)
    assert tiny.decode(ids, ext) == text


def test_tiny_ordinary_text_is_known(tiny):
    ids, ext = tiny.encode("Hello world! 中国的发展，我们的工作。")
    assert ext == {}
    assert len(ids) < len("Hello world! 中国的发展，我们的工作。")  # multi-char pieces were used


def _brute_force_pieces(tok: CPMBeeTokenizer, text: str) -> list[str]:
    """Independent greedy longest match (no special keys) with unknown runs merged."""
    out, unk, i = [], "", 0
    keys = {k for k in tok.encoder if k not in tok.special_tokens}
    while i < len(text):
        match = next((text[i:j] for j in range(len(text), i, -1) if text[i:j] in keys), None)
        if match is None:
            unk += text[i]
            i += 1
            continue
        if unk:
            out.append(unk)
            unk = ""
        out.append(match)
        i += len(match)
    return out + ([unk] if unk else [])


@pytest.mark.parametrize(
    "text", ["hello world", "hello worlds", "灯熄灭了", "😀😀x 好 𠀀𠀀", "The then them", "ab¿¿¿cd"]
)
def test_greedy_longest_match_and_merged_unknowns(tiny, text):
    toks = tiny.tokenize(text)
    assert [t.token for t in toks] == _brute_force_pieces(tiny, text)
    assert all(t.is_unk == (t.token not in tiny.encoder) for t in toks)


def test_unknown_run_is_one_ext_token(tiny):
    ids, ext = tiny.encode("x😀😀😀y😀")
    assert ids == [tiny.encoder["x"], tiny.vocab_size, tiny.encoder["y"], tiny.vocab_size + 1]
    assert ext == {tiny.vocab_size: "😀😀😀", tiny.vocab_size + 1: "😀"}


def test_special_tokens_and_ext_ids(tiny):
    v = tiny.vocab_size
    ids, ext = tiny.encode("<s>a<option_0>b<mask_1><option_0><ans>")
    assert ids == [6, tiny.encoder["a"], v, tiny.encoder["b"], v + 1, v, 9]
    assert ext == {v: "<option_0>", v + 1: "<mask_1>"}
    # past_table continues the numbering and reuses known strings.
    ids2, ext2 = tiny.encode("<mask_1><option_7>", ext)
    assert ids2 == [v + 1, v + 2]
    assert ext2 == {**ext, v + 2: "<option_7>"}
    assert ext == {v: "<option_0>", v + 1: "<mask_1>"}  # the caller's table is not modified


def test_escape_unescape(tiny):
    assert tiny.escape("a<b<<c") == "a<<b<<<<c"
    assert tiny.unescape(tiny.escape("a<b<<c")) == "a<b<<c"
    toks = tiny.tokenize("<<s>")
    assert [(t.token, t.is_special) for t in toks] == [("<", False), ("s", False), (">", False)]
    with pytest.raises(ValueError, match="Unexpected end"):
        tiny.encode("1 <<< 2")  # `<<<` = an escaped `<`, then a special token that never closes
    assert tiny.encode("1 <<<<< 2>")[1] == {tiny.vocab_size: "< 2>"}


def test_decode_escapes_plain_lt_and_keeps_specials(tiny):
    ids = [tiny.encoder["<"], tiny.bos_id, tiny.encoder["a"], -5, tiny.encoder[" <<"]]
    assert tiny.decode(ids) == "<<<s>a <<<<"
    with pytest.raises(KeyError, match="neither vocab"):
        tiny.decode([tiny.vocab_size + 3])


@pytest.mark.parametrize(
    "text,message",
    [
        ("a<b", "Unexpected end of text `a<b`"),
        ("a<", "Unexpected end of text `a<`"),
        ("x<a<b>", "Invalid special token at pos 3"),
        ("<s><ans", "Unexpected end of text"),
    ],
)
def test_bad_special_tokens_raise_value_error(tiny, text, message):
    with pytest.raises(ValueError, match=message.replace("`", ".")):
        tiny.encode(text)


# ------------------------------------------------------------------ vocab files


def test_bad_vocab_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        CPMBeeTokenizer(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_vocab(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("\n".join(SPECIAL_TOKENS_IN_ORDER + ("a", "b", "a")) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup.txt: line 14 repeats entry 'a'"):
        load_vocab(dup)
    lacking = tmp_path / "lacking.txt"
    lacking.write_text("<pad>\n<unk>\n</n>\n</_>\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacking\.txt.*\['<mask>', '<s>'"):
        load_vocab(lacking)


def test_build_tiny_vocab_extra_words(tmp_path):
    tok = CPMBeeTokenizer(build_tiny_vocab(tmp_path / "v.txt", extra_words=["zzzq", "<option>", "zzzq"]))
    assert tok.encode("zzzq")[0] == [tok.encoder["zzzq"]]
    with pytest.raises(ValueError, match="without line breaks"):
        build_tiny_vocab(tmp_path / "w.txt", extra_words=["a\nb"])
    assert not (tmp_path / "w.txt").exists()


def test_find_vocab(tmp_path):
    vocab = build_tiny_vocab(tmp_path / "explicit.txt")
    assert find_vocab(vocab, None) == vocab
    with pytest.raises(FileNotFoundError, match="--vocab"):
        find_vocab(tmp_path / "missing.txt", None)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "model.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        find_vocab(None, ckpt)
    beside = build_tiny_vocab(ckpt_dir / "vocab.txt")
    assert find_vocab(None, ckpt) == beside
    assert find_vocab(None, ckpt_dir) == beside
    with pytest.raises(FileNotFoundError, match="--vocab"):
        find_vocab(None, None)
