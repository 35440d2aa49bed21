"""Token-by-token decoding with a pluggable choice: greedy (argmax) or top-k / top-p sampling.

CPM-Bee itself ships only beam search; the sampling rule is the original CPM-Ant one
(`CPMAntRandomSampling`: logits / temperature, top-k then top-p filtering, multinomial draw,
defaults top_k 0, top_p 0.9, temperature 0.9), run on the same `Decoder` as beam search so prompts,
banned columns, repetition penalty, segment handling and stopping rule are identical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cpm_live.generation.decoding import Decoder
from cpm_live.generation.prompt import AnswerToken

# Picks one column per row from edited logits (rows, V + X).
ChooseToken = Callable[[torch.Tensor], torch.Tensor]


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                          filter_value: float = -float("inf")) -> torch.Tensor:
    """Set logits outside the ``top_k`` best (0: off) and outside the smallest set whose probability
    reaches ``top_p`` (0: off; the token crossing the threshold is kept) to ``filter_value``."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the token crossing top_p
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), filter_value)
    return logits


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class TopKTopPSampler:
    """Draws one token per row, from ``generator`` if given (else torch's global RNG)."""

    def __init__(self, top_k: int = 0, top_p: float = 0.9, temperature: float = 0.9,
                 generator: torch.Generator | None = None):
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p}")
        if temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.top_k = top_k
        self.top_p = top_p
        self.temperature = temperature
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = top_k_top_p_filtering(logits / self.temperature, self.top_k, self.top_p)
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(-1)


def sample(decoder: Decoder, choose: ChooseToken, max_length: int = 100) -> list[list[AnswerToken]]:
    """One answer per sample, extending each by ``choose``'s token until it finishes (same rule as
    beam search: eos in the last predicted segment, or ``max_length + 2`` tokens); finished rows
    leave the batch."""
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    max_length += 1  # room for eos, as in beam search
    results: list[list[AnswerToken]] = [[] for _ in range(decoder.batch.size)]
    cursors = [decoder.start(s) for s in range(decoder.batch.size)]
    for i in range(max_length + 1):
        words = choose(decoder.step(cursors)).tolist()
        kept_rows, kept = [], []
        for row, (cursor, word) in enumerate(zip(cursors, words)):
            nxt, tokens = decoder.advance(cursor, word, last_step=i == max_length)
            if nxt is None:
                results[cursor.sample] = list(tokens)
            else:
                kept_rows.append(row)
                kept.append(nxt)
        if not kept:
            break
        if len(kept) < len(cursors):
            decoder.reorder(kept_rows)
        cursors = kept
    return results
