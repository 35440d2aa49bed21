"""``--eval-metrics``: generate answers for the eval set with the model being trained, and score them.

Every rank decodes every sample (greedy, so it is deterministic and cheap): decoding a sharded model
is a sequence of collectives, so all ranks must make the same calls. ``--max-eval-samples`` bounds
the cost.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from cpm_live.data.pack import open_record_source
from cpm_live.evaluation import compute_metrics
from cpm_live.generation import CPMBeeGreedy
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.training.args import EvalArgs

MAX_ANSWER_TOKENS = 32


def read_records(path: str, limit: int | None) -> list[dict[str, Any]]:
    source, records = open_record_source(path), []
    while limit is None or len(records) < limit:
        try:
            records.append(source.read())
        except EOFError:
            break
    return records


@torch.no_grad()
def generation_metrics(model: torch.nn.Module, tokenizer: CPMBeeTokenizer, settings: EvalArgs) -> dict[str, float]:
    """Scores of ``model``'s greedy answers on the eval set, keyed like :func:`compute_metrics`."""
    records = read_records(settings.eval_dataset, settings.max_eval_samples)
    refs = [r["<ans>"] for r in records]
    model.eval()
    try:
        answered = CPMBeeGreedy(model, tokenizer).generate(copy.deepcopy(records), max_length=MAX_ANSWER_TOKENS)
    finally:
        model.train()
    return compute_metrics(list(settings.eval_metrics), [r["<ans>"] for r in answered], refs)
