"""CPM-Bee tokenizer: greedy longest match over the 86k vocab, `<...>` special tokens, `<<` escapes.

Behaviour (splitting, unknown-run merging, ext ids, escaping, error types and messages) follows the
original `cpm_live/tokenizers/bee.py` exactly, because token ids are a checkpoint contract. The only
additions are explicit vocab loading with clear errors and `build_tiny_vocab` for tests (the `--vocab`
flag is resolved by `cpm_live.checkpoint.base_model.find_vocab`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from cpm_live.errors import MissingFileError, VocabError
from cpm_live.utils import atomic_path

# Fixed ids 0..10 of the real vocab; a vocab missing any of these cannot encode a sample.
SPECIAL_TOKENS_IN_ORDER = (
    "<pad>",
    "<unk>",
    "<mask>",
    "<sep>",
    "</n>",
    "</_>",
    "<s>",
    "</s>",
    "<root>",
    "<ans>",
    "<option>",
)
_REQUIRED_TOKENS = ("<pad>", "<unk>", "<mask>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>")


@dataclass
class Token:
    """One piece of `tokenize` output; `start` is the offset in the unescaped text parts."""

    token: str
    start: int
    is_unk: bool
    is_special: bool


def load_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    """Read a vocab file: id = index among non-empty lines (lines split on \\n, \\r\\n and \\r).

    Raises :class:`MissingFileError` / :class:`VocabError` naming the file for a missing, empty, duplicated or
    incomplete vocab, instead of the KeyError the original gave much later.
    """
    path = os.fspath(vocab_file)
    if not os.path.isfile(path):
        raise MissingFileError(f"vocab file not found: {path} (pass the CPM-Bee vocab, e.g. vocabs/bee.txt)")
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            token = line[:-1] if line.endswith("\n") else line
            if not token:
                continue
            if token in vocab:
                raise VocabError(
                    f"vocab file {path}: line {lineno} repeats entry {token!r} (first at id {vocab[token]})"
                )
            vocab[token] = len(vocab)
    if not vocab:
        raise VocabError(f"vocab file {path} is empty")
    missing = [t for t in _REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise VocabError(f"vocab file {path} lacks required special tokens {missing}; is it a CPM-Bee vocab?")
    return vocab


class CPMBeeTokenizer:
    """Tokenizer of CPM-Bee. `encode` returns `(ids, ext_table)`: unknown runs and special tokens
    outside the vocab (e.g. `<option_0>`) get fake ids `vocab_size + n` recorded in `ext_table`."""

    unk_token = "<unk>"
    mask_token = "<mask>"
    pad_token = "<pad>"
    bos_token = "<s>"
    eos_token = "</s>"
    line_token = "\n"
    space_token = " "

    def __init__(self, vocab_file: str | os.PathLike | None = None) -> None:
        if vocab_file is None:
            # The original defaulted to its packaged vocabs/bee.txt, which is not shipped here.
            raise VocabError(
                "CPMBeeTokenizer needs a vocab file: pass the model directory's vocab.txt (e.g. "
                "CPMBeeTokenizer('cpm-bee-10b/vocab.txt')) or CPM-Bee's src/cpm_live/vocabs/bee.txt; this "
                "package does not ship the vocabulary"
            )
        self.vocab_file = os.fspath(vocab_file)
        self.encoder = load_vocab(self.vocab_file)
        # The file stores newline and space as </n> and </_>; the keys become the literal characters.
        self.encoder[self.line_token] = self.encoder.pop("</n>")
        self.encoder[self.space_token] = self.encoder.pop("</_>")
        self.decoder = {v: k for k, v in self.encoder.items()}
        self._special_tokens = {
            k: v for k, v in self.encoder.items() if k.startswith("<") and k.endswith(">")
        }
        # Lengths of the non-special keys per first character, longest first: the greedy match only
        # tries prefix lengths that some key has, instead of all 32 (same result, far fewer lookups).
        lens: dict[str, set[int]] = {}
        for key in self.encoder:
            if key not in self._special_tokens:
                lens.setdefault(key[0], set()).add(len(key))
        self._piece_lens = {c: sorted(v, reverse=True) for c, v in lens.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def eos_id(self) -> int:
        return self.encoder[self.eos_token]

    @property
    def bos_id(self) -> int:
        return self.encoder[self.bos_token]

    @property
    def unk_id(self) -> int:
        return self.encoder[self.unk_token]

    @property
    def mask_id(self) -> int:
        return self.encoder[self.mask_token]

    @property
    def pad_id(self) -> int:
        return self.encoder[self.pad_token]

    def get_piece(self, text: str, start: int = 0) -> str:
        """Longest non-special vocab key that `text[start:]` begins with, else its first character."""
        for n in self._piece_lens.get(text[start], ()):
            sub = text[start : start + n]
            if len(sub) == n and sub in self.encoder:
                return sub
        return text[start]

    @staticmethod
    def _split_special(text: str) -> list[str]:
        """Split into alternating [plain, special, plain, ...] parts; `<<` becomes a literal `<`."""
        parts: list[str] = []
        cur: list[str] = []  # characters of the part being read (a list keeps this linear in len(text))
        is_escape = False
        is_special = False
        for i, c in enumerate(text):
            if is_special:
                if c == "<":
                    raise ValueError(f"Invalid special token at pos {i}")
                cur.append(c)
                if c == ">":
                    is_special = False
                    parts.append("".join(cur))
                    cur = []
            elif c == "<":
                if is_escape:
                    cur.append(c)
                is_escape = not is_escape
            elif is_escape:
                is_special = True
                is_escape = False
                parts.append("".join(cur))
                cur = ["<", c]
            else:
                cur.append(c)
        if is_escape or is_special:
            raise ValueError(f"Unexpected end of text `{text}`")
        parts.append("".join(cur))
        return parts

    def tokenize(self, text: str) -> list[Token]:
        output: list[Token] = []
        part_pos = 0
        for i, part in enumerate(self._split_special(text)):
            if i % 2 == 1:
                output.append(Token(part, part_pos, False, True))
            else:
                part_st = 0
                last_unk: str | None = None
                while part_st < len(part):
                    piece = self.get_piece(part, part_st)
                    if piece not in self.encoder:
                        # Consecutive unknown characters merge into one unknown token.
                        last_unk = piece if last_unk is None else last_unk + piece
                    else:
                        if last_unk is not None:
                            output.append(Token(last_unk, part_st + part_pos - len(last_unk), True, False))
                            last_unk = None
                        output.append(Token(piece, part_st + part_pos, False, False))
                    part_st += len(piece)
                if last_unk is not None:
                    output.append(Token(last_unk, part_st + part_pos - len(last_unk), True, False))
            part_pos += len(part)
        return output

    @staticmethod
    def escape(text: str) -> str:
        return text.replace("<", "<<")

    @staticmethod
    def unescape(text: str) -> str:
        return text.replace("<<", "<")

    def encode(self, text: str, past_table: dict[int, str] | None = None) -> tuple[list[int], dict[int, str]]:
        """Ids of `text` plus the ext table (`past_table` extended with this text's new ext strings)."""
        ext_table: dict[int, str] = {}
        ext_table_rev: dict[str, int] = {}
        for idx, val in (past_table or {}).items():
            ext_table[idx] = val
            ext_table_rev[val] = idx
        ids: list[int] = []
        for x in self.tokenize(text):
            if x.is_unk or (x.is_special and x.token not in self.encoder):
                if x.token not in ext_table_rev:
                    ext_table_rev[x.token] = len(ext_table_rev) + self.vocab_size
                    ext_table[ext_table_rev[x.token]] = x.token
                ids.append(ext_table_rev[x.token])
            elif x.token in self.encoder:
                ids.append(self.encoder[x.token])
            else:
                raise ValueError(f"Unknown token `{x.token}` at pos {x.start}")
        return ids, ext_table

    def decode(self, tokens: Iterable[int], ext_table: dict[int, str] | None = None) -> str:
        """Ids back to escaped text: ext ids from `ext_table`, specials verbatim, negative ids dropped."""
        ext_table = ext_table or {}
        out: list[str] = []
        for token in tokens:
            if token in ext_table:
                out.append(ext_table[token])
            elif token >= 0:
                if token not in self.decoder:
                    raise KeyError(f"token id {token} is in neither vocab {self.vocab_file} nor ext_table")
                w = self.decoder[token]
                out.append(w if w in self._special_tokens else self.escape(w))
        return "".join(out)


# Frequent CJK characters (ranked by summed word frequency in jieba's dictionary) and words, so the
# tiny vocab tokenizes ordinary Chinese mostly into known pieces.
_TINY_CJK_CHARS = (
    "一是人了不在有大中国和为这上他个地年来我会以到时要出的生学说道民家子也成行下们于后就发自之对得主长可"
    "过天作分方用多你着部能市等业全里工公经本都而高政法面门动日进区事代那去心小同北定开产前其军还然起种所"
    "如现理机体表力好外与文当两实重新三么只山水关明从化平建又制南内西没此将员名手最东头者月间无安看见各城"
    "十相但已些正口通想度加第她合院物性战由位常点海意场武使次二向治因立数样身情入原问把路被并利石老教万知"
    "级量任江及应省资委务元美特期世湖回系比气汉总展电科金先声提品设或义王社很统处四首共马形己儿司太目基领"
    "队直计别女权话少流命至报米给打变果书清活几州华解议更称程今决张导术府才保交放管结师便走达族反再题色五"
    "京河接条规式县白它改风光运信受什组听布百济党指论强做取技黄神选记斯真却职号界件花类何眼兵传带空干农边"
    "据集联古广完质阳难增历史专官每住商即步认车台林必死游举线言皇土团收考求德叫近备研争非具李众连调感转笑"
    "革该持始英克士尔让拉思根格造较际亲单朝红型价校约器字段周亚深候则功属积快图火千准究往极育装许参半令吃"
    "观鱼精办像帝八复影告远群包整构料随划算象容示投势热值夫网望源息语股铁断派速怎需片爱律纪支早况病境证编"
    "翻译答案诗句意境哪段话形容灯灭明残万里静绝"
)
_TINY_CJK_WORDS = (
    "一个 中国 我们 他们 自己 没有 国家 可以 发展 工作 这个 什么 主要 问题 进行 地方 已经 这样 全国 经济 "
    "这些 不是 公司 人民 社会 知道 这种 起来 地区 如果 开始 技术 重要 美国 成为 因为 通过 研究 文化 企业 "
    "北京 历史 世界 其中 现在 不能 一些 时间 生产 情况 代表 决定 关系 领导 生活 时候 一种 可能 出来 学生 "
    "同时 认为 由于 所以 不同 这里 但是 部分 活动 需要 怎么 管理 方面 市场 组织 建设 形成 其他 出现 许多"
).split()
_TINY_CJK_PUNCT = "，。！？；：、“”‘’（）《》【】…—·"
_TINY_EN_PIECES = (
    " the",
    " of",
    " and",
    " to",
    " in",
    " is",
    " a",
    " that",
    " for",
    " it",
    " with",
    " as",
    " was",
    " on",
    " be",
    " by",
    " this",
    " are",
    " from",
    " or",
    " an",
    " at",
    " not",
    " have",
    " has",
    " you",
    " we",
    " he",
    " she",
    " they",
    " his",
    " her",
    " which",
    " will",
    " can",
    " all",
    " one",
    " two",
    " more",
    " new",
    " hello",
    " world",
    " model",
    " language",
    " data",
    " train",
    " text",
    "The",
    "This",
    "Hello",
    "ing",
    "ed",
    "er",
    "es",
    "tion",
    "ly",
    "ment",
    "th",
    "he",
    "in",
    "an",
    "re",
    "on",
    "at",
    "en",
    "nd",
    " (",
    ' "',
    " <<",
    ". ",
    ", ",
    "  ",
    "    ",
    "...",
)


def check_vocab_fits(vocab_file: str | os.PathLike, vocab_size: int) -> None:
    """Refuse a vocab with fewer entries than the model has token ids (lines missing, or another
    model's vocab): the ids past its end would decode to nothing."""
    entries = len(load_vocab(vocab_file))
    if entries < vocab_size:
        raise VocabError(f"vocab file {os.fspath(vocab_file)} has {entries} entries but the model has "
                         f"vocab_size {vocab_size}: lines are missing, or it is another model's vocab; pass "
                         f"the model's own vocab.txt")


def build_tiny_vocab(path: str | os.PathLike, extra_words: Iterable[str] = ()) -> str:
    """Write a small valid CPM-Bee vocab (specials at the real ids 0..10, ASCII, common CJK, `<eod>`).

    It round-trips ordinary English/Chinese text; anything else becomes merged unknown runs, as with
    the real vocab. `extra_words` are appended (duplicates skipped). Returns the path written.
    """
    entries: list[str] = list(SPECIAL_TOKENS_IN_ORDER)
    entries += [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII without space (space is </_>)
    entries += list(_TINY_EN_PIECES) + list(_TINY_CJK_PUNCT) + list(_TINY_CJK_CHARS) + _TINY_CJK_WORDS
    entries.append("<eod>")
    entries += list(extra_words)
    seen: set[str] = set()
    lines: list[str] = []
    for word in entries:
        # A single " " would collide with </_> (both become the space key).
        if not isinstance(word, str) or word in ("", " ") or "\n" in word or "\r" in word:
            raise ValueError(f"vocab entry {word!r} must be a non-empty string without line breaks")
        if word not in seen:
            seen.add(word)
            lines.append(word)
    out = os.fspath(path)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return out
