"""Prompts for CPM-Bee generation: `<ans>` placeholders in, batched model inputs, answers back out.

Follows the original `CPMBeeGeneration`: every leaf under `data["<ans>"]`
becomes a placeholder `<ans_k>`, the sample is converted like training data (no answer shuffling,
`max_depth` 8), the to-be-predicted tokens are cut out of the prompt and remembered as
`(segment id, answer number)`, and the generated tokens are decoded back into the same leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cpm_live.data.encode import convert_data_to_id
from cpm_live.data.tensors import CPMBeeInputs
from cpm_live.tokenizers import CPMBeeTokenizer

ANSWER_KEY = "<ans>"
MAX_DEPTH = 8  # every original script converts with max_depth 8

# A generated token: (raw id as the logits index it, answer number it belongs to).
AnswerToken = tuple[int, int]


@dataclass
class Prompt:
    """One sample's context tokens and where its answers go."""

    input_ids: np.ndarray  # (L,) context tokens only, predicted segments removed
    input_subs: np.ndarray  # (L,)
    segments: np.ndarray  # (L,) segment id of each token
    segment_rel: np.ndarray  # (n*n,) flat segment relation buckets
    num_segments: int
    # (segment id, answer number) of each predicted segment, in the order they are generated.
    predict_segments: list[tuple[int, int]]
    answer_paths: list[list[str]]  # answer number k (1-based) -> key path under "<ans>"
    ext_table: dict[int, str]  # tokenizer fake id -> string
    token_id_table: dict[str, dict[int, int]]  # base token -> {fake id: subscript}


def put_placeholders(answer: Any) -> tuple[Any, list[list[str]]]:
    """Replace every leaf of ``answer`` by ``<ans_1>``, ``<ans_2>``, ... (DFS order) and return the key
    path of each; a non-dict ``answer`` is one leaf with path ``[]``."""
    paths: list[list[str]] = []

    def visit(node: Any, path: list[str]) -> Any:
        if isinstance(node, dict):
            return {key: visit(value, path + [key]) for key, value in node.items()}
        paths.append(path)
        return f"<ans_{len(paths)}>"

    return visit(answer, []), paths


def build_prompt(tokenizer: CPMBeeTokenizer, data: dict[str, Any], max_length: int | None = None) -> Prompt:
    """Convert one sample to its prompt; ``data`` itself is not modified.

    Raises ValueError when the sample has no ``<ans>`` key or nothing to predict (e.g. ``<ans>: {}``),
    :class:`SampleTooLong` when it has more than ``max_length`` tokens (before building its arrays).
    """
    if not isinstance(data, dict) or ANSWER_KEY not in data:
        raise ValueError(f'a sample must be a JSON object with an "{ANSWER_KEY}" key to fill in')
    placeholders, answer_paths = put_placeholders(data[ANSWER_KEY])
    # Updating the existing key keeps "<ans>" where it was, so segment ids match the original.
    prompt_data = {**data, ANSWER_KEY: placeholders}
    ids, subs, context, segments, segment_rel, num_segments, table_states = convert_data_to_id(
        tokenizer, prompt_data, shuffle_answer=False, max_depth=MAX_DEPTH, max_length=max_length
    )
    ids, subs, context, segments = (np.asarray(a) for a in (ids, subs, context, segments))
    ext_table = table_states["ext_table"]
    token_id_table = table_states["token_id_table"]

    # The placeholders are ext tokens of base "<ans>"; their subscript says which answer they are.
    sub_to_answer = {}
    for fake_id, sub in token_id_table.get(ANSWER_KEY, {}).items():
        token = ext_table[fake_id]
        if token.startswith("<ans_") and token.endswith(">"):
            sub_to_answer[sub] = int(token[5:-1])

    ans_id = tokenizer.encoder[ANSWER_KEY]
    keep = context != 0
    predict = ~keep & (ids == ans_id)
    predict_segments = [(int(segments[i]), sub_to_answer[int(subs[i])]) for i in np.flatnonzero(predict)]
    if not predict_segments:
        raise ValueError(f'no answer to predict: "{ANSWER_KEY}" holds no leaf (got {data[ANSWER_KEY]!r})')
    return Prompt(
        input_ids=ids[keep].astype(np.int32),
        input_subs=subs[keep].astype(np.int32),
        segments=segments[keep].astype(np.int32),
        segment_rel=np.asarray(segment_rel, dtype=np.int32),
        num_segments=int(num_segments),
        predict_segments=predict_segments,
        answer_paths=answer_paths,
        ext_table=ext_table,
        token_id_table=token_id_table,
    )


@dataclass
class PromptBatch:
    """Left-padded prompts plus the batch ext table shared by all samples."""

    prompts: list[Prompt]
    inputs: CPMBeeInputs  # the prefill for model.inference, (B, L) / (B, R); its ext table is the batch's
    decode_tables: list[dict[int, str]]  # per sample: logits column -> string, for tokenizer.decode
    banned: torch.Tensor  # (B, V + X) bool: columns a sample must never generate

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def ext_table_ids(self) -> torch.Tensor:
        """(X,) base id of logits column V + k."""
        return self.inputs.ext_table_ids

    @property
    def ext_table_sub(self) -> torch.Tensor:
        """(X,) subscript of logits column V + k."""
        return self.inputs.ext_table_sub


def build_batch(tokenizer: CPMBeeTokenizer, prompts: Sequence[Prompt], device: torch.device) -> PromptBatch:
    """Pad ``prompts`` on the LEFT (pads: id 0, ``num_segments`` 0, so the model masks them) and merge
    their ext tokens into one table: ``(base id, sub > 0)`` -> column ``V + k``.

    A sample may generate an ext column only if that ``(base, sub)`` occurs in its own prompt, and
    ``<unk>`` only if its prompt holds an unknown run with subscript 0.
    """
    vocab_size = tokenizer.vocab_size
    column: dict[tuple[int, int], int] = {}
    ext_ids: list[int] = []
    ext_subs: list[int] = []
    decode_tables: list[dict[int, str]] = []
    for prompt in prompts:
        table: dict[int, str] = {}
        for token, subs in prompt.token_id_table.items():
            if token == ANSWER_KEY:
                continue
            base = tokenizer.encoder[token]
            for fake_id, sub in subs.items():
                if sub == 0:
                    table[base] = prompt.ext_table[fake_id]
                    continue
                if (base, sub) not in column:
                    column[(base, sub)] = vocab_size + len(ext_ids)
                    ext_ids.append(base)
                    ext_subs.append(sub)
                table[column[(base, sub)]] = prompt.ext_table[fake_id]
        decode_tables.append(table)

    batch, width = len(prompts), vocab_size + len(ext_ids)
    banned = torch.zeros(batch, width, dtype=torch.bool)
    banned[:, vocab_size:] = True
    for b, table in enumerate(decode_tables):
        banned[b, tokenizer.unk_id] = tokenizer.unk_id not in table
        for col in table:
            if col >= vocab_size:
                banned[b, col] = False

    length = max(len(p.input_ids) for p in prompts)
    rel_length = max(len(p.segment_rel) for p in prompts)

    def left_pad(rows: list[np.ndarray], dtype: torch.dtype = torch.int32) -> torch.Tensor:
        out = torch.zeros(batch, length, dtype=dtype)
        for b, row in enumerate(rows):
            if len(row):
                out[b, length - len(row):] = torch.as_tensor(row).to(dtype)
        return out

    segment_rel = torch.zeros(batch, rel_length, dtype=torch.int32)
    for b, prompt in enumerate(prompts):
        segment_rel[b, : len(prompt.segment_rel)] = torch.from_numpy(prompt.segment_rel)
    ones = [np.ones(len(p.input_ids), dtype=np.int32) for p in prompts]
    inputs = CPMBeeInputs(
        input=left_pad([p.input_ids for p in prompts]),
        input_sub=left_pad([p.input_subs for p in prompts]),
        position=left_pad([np.arange(len(p.input_ids), dtype=np.int32) for p in prompts]),
        context=left_pad(ones, torch.bool),
        sample_ids=left_pad([0 * o for o in ones]),
        num_segments=left_pad([p.num_segments * o for p, o in zip(prompts, ones)]),
        segment=left_pad([p.segments for p in prompts]),
        segment_rel_offset=left_pad([0 * o for o in ones]),
        segment_rel=segment_rel,
        ext_table_ids=torch.tensor(ext_ids, dtype=torch.int32),
        ext_table_sub=torch.tensor(ext_subs, dtype=torch.int32),
    )
    return PromptBatch(
        prompts=list(prompts),
        inputs=inputs.to(device),
        decode_tables=decode_tables,
        banned=banned.to(device),
    )


def fill_answers(tokenizer: CPMBeeTokenizer, data: dict[str, Any], prompt: Prompt,
                 decode_table: dict[int, str], tokens: Sequence[AnswerToken]) -> None:
    """Write the generated ``tokens`` into ``data["<ans>"]`` at each placeholder's path.

    Tokens are grouped by answer number, a trailing ``</s>`` is dropped, and the text is
    ``tokenizer.decode``d (escaped: a literal ``<`` comes out as ``<<``, as in the CPM-Bee data
    format). A placeholder that got no tokens becomes None.
    """
    by_answer: dict[int, list[int]] = {}
    for raw_id, answer in tokens:
        by_answer.setdefault(answer, []).append(raw_id)
    answer, _ = put_placeholders(data[ANSWER_KEY])  # a fresh copy of the structure
    for number, path in enumerate(prompt.answer_paths, start=1):
        ids = by_answer.get(number)
        text = None
        if ids is not None:
            if ids[-1] == tokenizer.eos_id:
                ids = ids[:-1]
            text = tokenizer.decode(ids, decode_table)
        if not path:
            answer = text
            continue
        node = answer
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = text
    data[ANSWER_KEY] = answer
