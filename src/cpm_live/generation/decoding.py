"""The decoding step shared by beam search, sampling and greedy decoding.

`Decoder` owns everything a strategy should not care about: the model's KV state, which token each
row feeds next (bos at the start of every predicted segment, ext ids mapped back to base id +
subscript), the logit edits of the original (banned columns -> -10000, repetition penalty) and the
rule for when an answer is finished. A strategy only looks at the logits of `Decoder.step` and
tells `Decoder.advance` which token each row picked, and `Decoder.reorder` which rows survive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cpm_live.data.tensors import CPMBeeInputs
from cpm_live.generation.prompt import AnswerToken, PromptBatch
from cpm_live.tokenizers import CPMBeeTokenizer

BANNED_LOGIT = -10000.0  # the original's value for unk / foreign ext columns (not -inf)


@dataclass(frozen=True)
class Cursor:
    """Where one row stands: which predicted segment, what it produced, what it feeds next."""

    sample: int  # index of the sample in the batch
    segment_index: int  # index into the sample's predict_segments
    tokens: tuple[AnswerToken, ...]
    next_id: int
    next_sub: int
    next_segment: int
    next_position: int  # restarts at 0 in every predicted segment, as in the original


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def reorder_state(state: dict, index: torch.Tensor) -> dict:
    """Select rows ``index`` of every cached tensor (``buffer_*`` ``(B, L)``, per-layer ``(k, v)``)."""
    out = {}
    for key, value in state.items():
        if key == "buffer":
            out[key] = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                        for kv in value]
        else:
            out[key] = value.index_select(0, index)
    return out


class Decoder:
    """Incremental decoding of a `PromptBatch`: one token per row and step through ``model.inference``.

    Rows start as one per sample; a strategy changes them with `reorder` (beam expansion, beam
    selection, dropping finished rows). ``repetition_penalty`` (>= 1) divides positive and multiplies
    negative logits of every base id fed since the prompt (bos included), or of the last
    ``repetition_window`` fed ids.
    """

    def __init__(self, model: nn.Module, tokenizer: CPMBeeTokenizer, batch: PromptBatch,
                 repetition_penalty: float = 1.0, repetition_window: int | None = None):
        if repetition_penalty < 1.0:
            raise ValueError(f"repetition_penalty must be >= 1.0 (1.0 = off), got {repetition_penalty}")
        if repetition_window is not None and repetition_window < 0:
            raise ValueError(f"repetition_window must be >= 0 or None, got {repetition_window}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch = batch
        self.repetition_penalty = repetition_penalty
        self.repetition_window = repetition_window or None  # 0 means the whole history, as originally
        self._ext_ids = batch.ext_table_ids.tolist()
        self._ext_subs = batch.ext_table_sub.tolist()
        inputs = batch.inputs
        _, _, self.state = model.inference(**inputs.inference_kwargs(), past_key_values=None)
        # Generated tokens take num_segments / segment_rel_offset from the last (never padded) column.
        self._num_segments = inputs.num_segments[:, -1:]
        self._segment_rel_offset = inputs.segment_rel_offset[:, -1:]
        self._segment_rel = inputs.segment_rel
        self._banned = batch.banned
        self._fed = torch.zeros(batch.size, 0, dtype=torch.long, device=self._segment_rel.device)
        self._row_sample = torch.arange(batch.size, device=self._segment_rel.device)

    @property
    def device(self) -> torch.device:
        return self._segment_rel.device

    def start(self, sample: int) -> Cursor:
        """The cursor before the first token of ``sample``'s first predicted segment."""
        segment, _ = self.batch.prompts[sample].predict_segments[0]
        return Cursor(sample, 0, (), self.tokenizer.bos_id, 0, segment, 0)

    def advance(self, cursor: Cursor, word_id: int,
                last_step: bool) -> tuple[Cursor | None, tuple[AnswerToken, ...]]:
        """Append ``word_id`` (a logits column) to ``cursor``'s answer.

        Returns ``(None, tokens)`` when the answer is finished (eos in the last predicted segment, or
        ``last_step``), else the next cursor: after eos, bos of the next predicted segment at position
        0; otherwise the token itself, an ext column fed as its base id with its subscript.
        """
        segments = self.batch.prompts[cursor.sample].predict_segments
        tokens = cursor.tokens + ((word_id, segments[cursor.segment_index][1]),)
        eos = word_id == self.tokenizer.eos_id
        if last_step or (eos and cursor.segment_index + 1 == len(segments)):
            return None, tokens
        if eos:
            index = cursor.segment_index + 1
            nxt = Cursor(cursor.sample, index, tokens, self.tokenizer.bos_id, 0, segments[index][0], 0)
            return nxt, tokens
        base, sub = word_id, 0
        if word_id >= self.tokenizer.vocab_size:
            column = word_id - self.tokenizer.vocab_size
            base, sub = self._ext_ids[column], self._ext_subs[column]
        nxt = Cursor(cursor.sample, cursor.segment_index, tokens, base, sub, cursor.next_segment,
                     cursor.next_position + 1)
        return nxt, tokens

    def reorder(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep rows ``rows`` (in that order; repeats allowed) of the KV state and history."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.state = reorder_state(self.state, index)
        self._fed = self._fed.index_select(0, index)
        self._row_sample = self._row_sample.index_select(0, index)

    def step(self, cursors: Sequence[Cursor]) -> torch.Tensor:
        """Feed each row's next token (``cursors[r]`` belongs to row ``r``); return its edited fp32 logits
        ``(rows, V + X)`` for the following token."""
        rows = len(cursors)
        if rows != self._row_sample.numel():
            raise ValueError(f"step got {rows} cursors for {self._row_sample.numel()} decoder rows")

        def column(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=self.device).view(rows, 1)

        token = column([c.next_id for c in cursors])
        row_sample = self._row_sample
        inputs = CPMBeeInputs(
            input=token,
            input_sub=column([c.next_sub for c in cursors]),
            position=column([c.next_position for c in cursors]),
            context=torch.ones(rows, 1, dtype=torch.bool, device=self.device),
            sample_ids=torch.zeros(rows, 1, dtype=torch.int32, device=self.device),
            num_segments=self._num_segments.index_select(0, row_sample),
            segment=column([c.next_segment for c in cursors]),
            segment_rel_offset=self._segment_rel_offset.index_select(0, row_sample),
            segment_rel=self._segment_rel.index_select(0, row_sample),
            ext_table_ids=self.batch.ext_table_ids,
            ext_table_sub=self.batch.ext_table_sub,
        )
        logits, _, self.state = self.model.inference(**inputs.inference_kwargs(), past_key_values=self.state)
        self._fed = torch.cat([self._fed, token.long()], dim=1)
        logits = logits[:, -1, :].float()  # (rows, V + X)
        logits = logits.masked_fill(self._banned.index_select(0, row_sample), BANNED_LOGIT)
        return self._penalize(logits)

    def _penalize(self, logits: torch.Tensor) -> torch.Tensor:
        if self.repetition_penalty == 1.0:
            return logits
        history = self._fed if self.repetition_window is None else self._fed[:, -self.repetition_window:]
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)  # each id once
        p = self.repetition_penalty
        penalized = torch.where(logits < 0, logits * p, logits / p)
        return torch.where(seen, penalized, logits)
