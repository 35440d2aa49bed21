"""CPM-Bee beam search, step for step the original `CPMBeeBeamSearch._decode`.

Per step and sentence, the top ``2 * beam_size`` (beam, token) pairs by cumulative log-probability
are visited in order: a finished answer goes to the sentence's `BeamHypotheses`, anything else
becomes a beam of the next step until ``beam_size`` beams are found. A sentence stops when its
hypotheses can no longer improve (``early_stopping=False`` rule), all stop at ``max_length + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpm_live.generation.decoding import Cursor, Decoder
from cpm_live.generation.prompt import AnswerToken

INITIAL_DEAD_BEAM = -1e9  # all beams start identical, so only beam 0 may expand at step 0


class BeamHypotheses:
    """The ``n_hyp`` best finished answers of one sentence, scored ``sum_logprobs / len**length_penalty``."""

    def __init__(self, n_hyp: int, max_len: int, length_penalty: float = 1.0, early_stopping: bool = False):
        self.n_hyp = n_hyp
        self.max_len = max_len
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.hyp: list[tuple[float, list[AnswerToken]]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.hyp)

    def add(self, hyp: list[AnswerToken], sum_logprobs: float) -> None:
        score = sum_logprobs / len(hyp) ** self.length_penalty
        if len(self) < self.n_hyp or score > self.worst_score:
            self.hyp.append((score, hyp))
            if len(self) > self.n_hyp:
                ranked = sorted((s, idx) for idx, (s, _) in enumerate(self.hyp))
                del self.hyp[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        """True once full and no running beam (best cumulative score at step ``cur_len``) can beat
        the worst kept hypothesis."""
        if len(self) < self.n_hyp:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty

    def best(self) -> list[AnswerToken]:
        return max(self.hyp, key=lambda x: x[0])[1]


def best_pairs(scores: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """The ``k`` highest scores of each row, best first, and their columns; equal scores go to the
    lower column, as ``argmax`` does, so beam size 1 chooses what greedy decoding chooses. (``topk``
    breaks ties in whatever order its CPU kernel meets them, and 16-bit logits tie often.)"""
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    values, columns = [], []
    for row, threshold in zip(scores, kth):
        candidates = torch.nonzero(row >= threshold).flatten()  # ascending columns
        order = torch.sort(row[candidates], descending=True, stable=True).indices[:k]
        values.append(row[candidates[order]].tolist())
        columns.append(candidates[order].tolist())
    return values, columns


def beam_search(decoder: Decoder, beam_size: int = 3, max_length: int = 100) -> list[list[AnswerToken]]:
    """Best answer tokens per sample of ``decoder``'s batch (at most ``max_length + 2`` tokens,
    counting each segment's eos, as in the original)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    max_length += 1  # room for eos, as in the original
    num_samples = decoder.batch.size
    hyps = [BeamHypotheses(beam_size, max_length, length_penalty=1, early_stopping=False)
            for _ in range(num_samples)]
    # The prompt was prefilled once per sample; each beam gets its own copy of the cache.
    decoder.reorder(torch.arange(num_samples).repeat_interleave(beam_size))
    active = list(range(num_samples))  # samples still searching; they own rows in this order
    beams = [[decoder.start(s)] * beam_size for s in active]
    scores = torch.full((num_samples, beam_size), INITIAL_DEAD_BEAM, device=decoder.device)
    scores[:, 0] = 0.0
    for i in range(max_length + 1):
        logprobs = F.log_softmax(decoder.step([c for sample_beams in beams for c in sample_beams]), dim=-1)
        width = logprobs.size(-1)  # V + X
        next_scores = (logprobs + scores.view(-1, 1)).view(len(active), beam_size * width)
        top_scores, top_ids = best_pairs(next_scores, 2 * beam_size)

        kept_rows: list[int] = []
        kept_beams: list[list[Cursor]] = []
        kept_scores: list[float] = []
        still_active: list[int] = []
        for a, sample in enumerate(active):
            if hyps[sample].is_done(max(top_scores[a]), i):
                continue
            new_beams: list[Cursor] = []
            for idx, value in zip(top_ids[a], top_scores[a]):
                beam, word_id = divmod(idx, width)
                cursor, tokens = decoder.advance(beams[a][beam], word_id, last_step=i == max_length)
                if cursor is None:
                    hyps[sample].add(list(tokens), value)
                else:
                    new_beams.append(cursor)
                    kept_rows.append(a * beam_size + beam)
                    kept_scores.append(value)
                if len(new_beams) == beam_size:
                    break
            if new_beams:
                still_active.append(sample)
                kept_beams.append(new_beams)
        if i == max_length or not still_active:
            break
        decoder.reorder(kept_rows)
        active, beams = still_active, kept_beams
        scores = torch.tensor(kept_scores, dtype=torch.float, device=decoder.device)
        scores = scores.view(len(active), beam_size)
    return [h.best() for h in hyps]
