"""JSON sample -> token ids, subscripts, segments and segment relations (CPM-Bee `convert_data_to_id`).

A sample is a nested dict of strings. Every key and every string value is one segment; segments form
a tree under a `<root>` segment, and the model sees the tree only through `segment_rel`, a flat
`n*n` table of relation buckets. Leaves under the top-level `<ans>` key are the ones to predict.
Outputs match the original function value for value (they are part of what the checkpoint learned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
from numpy.typing import NDArray

from cpm_live.errors import SampleTooLong
from cpm_live.tokenizers import CPMBeeTokenizer

CPMBeeInputType = str | dict[str, "CPMBeeInputType"]


class ExtTableStates(TypedDict):
    """Ext strings seen so far (`ext_table`: fake id -> string) and their subscripts per base token
    (`token_id_table`: base token -> {fake id: sub}); passed on so in-context samples share them."""

    ext_table: dict[int, str]
    token_id_table: dict[str, dict[int, int]]


@dataclass
class _Segment:
    value: str
    depth: int
    segment_id: int
    need_predict: bool
    children: list[_Segment] = field(default_factory=list)


def rel_to_bucket(n_up: int, n_down: int, max_depth: int = 8) -> int:
    """Relation bucket of (up, down) tree steps; 0 stays 0 (same segment), bucket 1 is reserved for
    "different sample/span", so every other value is shifted by one."""
    ret = n_up * max_depth + n_down
    return ret if ret == 0 else ret + 1


def _build_tree(
    data: CPMBeeInputType,
    depth: int,
    need_predict: bool,
    segments: list[_Segment],
    shuffle_answer: bool,
    rng: np.random.RandomState | None,
    path: str,
) -> list[_Segment]:
    """DFS in insertion order: a key segment, then its value's segments (ids = DFS order)."""
    if isinstance(data, dict):
        items = list(data.items())
        if need_predict and shuffle_answer:
            # Same draw as the original (np.random.shuffle of an index array) so seeded runs agree.
            access_idx = np.arange(len(items))
            (rng if rng is not None else np.random).shuffle(access_idx)
            items = [items[idx] for idx in access_idx]
        ret: list[_Segment] = []
        for k, v in items:
            if not isinstance(k, str):
                raise ValueError(f"Invalid key {k!r} at {path}: keys must be strings")
            node = _Segment(k, depth, len(segments), False)  # keys are always context
            segments.append(node)
            node.children = _build_tree(
                v,
                depth + 1,
                need_predict or (depth == 1 and k == "<ans>"),
                segments,
                shuffle_answer,
                rng,
                f"{path}.{k}",
            )
            ret.append(node)
        return ret
    if not isinstance(data, str):
        raise ValueError(f"Invalid data {data!r} at {path}: values must be strings or dicts")
    leaf = _Segment(data, depth, len(segments), need_predict)
    segments.append(leaf)
    return [leaf]


def _fill_segment_rel(node: _Segment, rel: NDArray[np.int32], n: int, max_depth: int) -> list[_Segment]:
    """Set rel[q*n+k] for every pair whose lowest common ancestor is `node`; returns the subtree."""
    done = [node]
    for child in node.children:
        sub = _fill_segment_rel(child, rel, n, max_depth)
        for q in sub:
            for k in done:
                up = min(q.depth - node.depth, max_depth - 1)
                down = min(k.depth - node.depth, max_depth - 1)
                rel[q.segment_id * n + k.segment_id] = rel_to_bucket(up, down, max_depth)
                rel[k.segment_id * n + q.segment_id] = rel_to_bucket(down, up, max_depth)
        done.extend(sub)
    return done


def _base_token(token: str) -> str:
    """`<option_3>` -> `<option>`, `<mask>` -> `<mask>`, an unknown run -> `<unk>`."""
    if token.startswith("<") and token.endswith(">"):
        name = token[1:-1].split("_", maxsplit=1)[0]
        return f"<{name}>"
    return "<unk>"


def convert_data_to_id(
    tokenizer: CPMBeeTokenizer,
    data: Any,
    prev_ext_states: ExtTableStates | None = None,
    shuffle_answer: bool = True,
    max_depth: int = 8,
    rng: np.random.RandomState | None = None,
    max_length: int | None = None,
) -> tuple[
    NDArray[np.int32],
    NDArray[np.int32],
    NDArray[np.int8],
    NDArray[np.int32],
    NDArray[np.int32],
    int,
    ExtTableStates,
]:
    """Convert one sample. Returns `(ids, subs, context, segment_ids, segment_rel, n_segments, states)`.

    Per segment the tokens are `[bos] + ids + [eos]`, without the eos for predicted leaves. Ext tokens
    become (base id, sub) with sub numbered by first appearance per base from 0. `context` is 1 for
    given tokens, 0 for predicted ones. `rng` drives the answer shuffle; None uses the global
    `np.random` exactly like the original. A sample of more than `max_length` tokens raises
    :class:`SampleTooLong` before its `n*n` relation table or token arrays are built (each segment
    has at least one token); the answer shuffle has drawn from `rng` by then, as for a sample that fits.
    """
    root = _Segment("<root>", 0, 0, False)
    segments = [root]
    root.children = _build_tree(data, 1, False, segments, shuffle_answer, rng, "<root>")

    n = len(segments)
    if max_length is not None and n > max_length:
        raise SampleTooLong(n, max_length)
    segment_rel = np.zeros((n * n,), dtype=np.int32)
    _fill_segment_rel(root, segment_rel, n, max_depth)

    ext_table: dict[int, str] = {}
    token_id_table: dict[str, dict[int, int]] = {}
    if prev_ext_states is not None:
        ext_table = dict(prev_ext_states["ext_table"])
        token_id_table = {k: dict(v) for k, v in prev_ext_states["token_id_table"].items()}

    input_ids: list[int] = []
    input_subs: list[int] = []
    bounds: list[tuple[int, int]] = []
    for seg in segments:
        tokens, ext_table = tokenizer.encode(seg.value, ext_table)
        ids = [tokenizer.bos_id]
        subs = [0]
        for idx in tokens:
            if idx in ext_table:
                token = ext_table[idx]
                base = _base_token(token)
                subs_of_base = token_id_table.setdefault(base, {})
                if idx not in subs_of_base:
                    subs_of_base[idx] = len(subs_of_base)
                if base not in tokenizer.encoder:
                    raise ValueError(f"Invalid token {token}")
                ids.append(tokenizer.encoder[base])
                subs.append(subs_of_base[idx])
            else:
                ids.append(idx)
                subs.append(0)
        if not seg.need_predict:
            ids.append(tokenizer.eos_id)
            subs.append(0)
        bounds.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids.extend(ids)
        input_subs.extend(subs)
        if max_length is not None and len(input_ids) > max_length:
            raise SampleTooLong(len(input_ids), max_length)

    length = len(input_ids)
    segment_ids = np.zeros((length,), dtype=np.int32)
    context = np.zeros((length,), dtype=np.int8)
    for i, (begin, end) in enumerate(bounds):
        if not segments[i].need_predict:
            context[begin:end] = 1
        segment_ids[begin:end] = i

    states: ExtTableStates = {"ext_table": ext_table, "token_id_table": token_id_table}
    return (
        np.array(input_ids, dtype=np.int32),
        np.array(input_subs, dtype=np.int32),
        context,
        segment_ids,
        segment_rel,
        n,
        states,
    )
