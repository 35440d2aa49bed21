"""``--eval-metrics``: generate answers for the eval set with the model being trained, and score them.

Every rank decodes every sample (greedy, so it is deterministic and cheap): decoding a sharded model
is a sequence of collectives, so all ranks must make the same calls. ``--max-eval-samples`` bounds
the cost. Records are decoded :data:`GENERATION_BATCH` at a time: the key/value cache of a decode
grows with its batch, so decoding the whole eval set at once raised the run's peak memory at the
first evaluation (measured with ``benchmarks/eval_memory.py``).
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
from cpm_live.training.progress import eval_bar

MAX_ANSWER_TOKENS = 32
GENERATION_BATCH = 8  # records decoded together


def read_records(path: str, limit: int | None) -> list[dict[str, Any]]:
    source, records = open_record_source(path), []
    while limit is None or len(records) < limit:
        try:
            records.append(source.read())
        except EOFError:
            break
    return records


@torch.no_grad()
def generation_metrics(model: torch.nn.Module, tokenizer: CPMBeeTokenizer, settings: EvalArgs,
                       progress: bool = False) -> dict[str, float]:
    """Scores of ``model``'s greedy answers on the eval set, keyed like :func:`compute_metrics`;
    ``progress`` shows a bar of the records answered (on a terminal)."""
    records = read_records(settings.eval_dataset, settings.max_eval_samples)
    refs = [r["<ans>"] for r in records]
    answers: list = []
    model.eval()
    try:
        generator = CPMBeeGreedy(model, tokenizer)
        with eval_bar(f"eval {','.join(settings.eval_metrics)}", len(records), progress) as bar:
            for start in range(0, len(records), GENERATION_BATCH):
                chunk = copy.deepcopy(records[start:start + GENERATION_BATCH])
                answers += [r["<ans>"] for r in generator.generate(chunk, max_length=MAX_ANSWER_TOKENS)]
                bar.update(len(chunk))
    finally:
        model.train()
    return compute_metrics(list(settings.eval_metrics), answers, refs)
