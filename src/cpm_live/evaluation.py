"""Scores of generated ``"<ans>"`` values against references: accuracy, ROUGE-1/2/L and BLEU-4.

    python src/evaluate.py --pred out.jsonl --ref eval.jsonl --metrics accuracy,rouge,bleu \\
        --output scores.json

The metrics come from maintained libraries: ROUGE from ``rouge-score`` (F-measure, averaged over
answers) with a Chinese-aware tokenizer (one token per CJK character, lower-cased words for other
scripts, punctuation dropped; rouge-score's own tokenizer would drop every Chinese character), and
corpus BLEU-4 from ``sacrebleu`` with its ``zh`` tokenizer. Every score is in [0, 1] (BLEU is
sacrebleu's value / 100).

Accuracy compares whole answers (option tasks like CCPM: ``"<option_3>"``; a dict answer must match
in every leaf), ignoring surrounding whitespace. ROUGE and BLEU compare text: a dict answer
contributes one pair per reference leaf (matched by key path), an unanswered (None) leaf counts as
empty text.

Predictions pair with references record by record, and the pairing is checked: the fields a
prediction and its reference both have besides ``"<ans>"`` (text_generation.py copies the whole input
record) must be equal, so a shifted, reordered or truncated prediction file is refused with both
files and the first line that differs, instead of being scored against the wrong answers.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

from cpm_live.data.jsonl import answered_records
from cpm_live.errors import ConfigError, CPMLiveError, DataFormatError, for_cli
from cpm_live.outputs import check_output_file, reported_write
from cpm_live.utils import atomic_write_text, set_cpu_threads

METRICS = ("accuracy", "rouge", "bleu")
ANSWER_KEY = "<ans>"

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class ChineseAwareTokenizer:
    """Tokenizer for ``rouge_scorer.RougeScorer``: CJK characters one by one, other words whole."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def _check_lengths(preds: Sequence[Any], refs: Sequence[Any]) -> None:
    if len(preds) != len(refs):
        raise DataFormatError(f"{len(preds)} predictions but {len(refs)} references")
    if not refs:
        raise DataFormatError("no answers to score")


def _normalize(answer: Any) -> Any:
    if isinstance(answer, str):
        return answer.strip()
    if isinstance(answer, dict):
        return {key: _normalize(value) for key, value in answer.items()}
    return answer


def accuracy(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Fraction of answers equal to their reference (strings stripped; dicts leaf by leaf)."""
    _check_lengths(preds, refs)
    return sum(_normalize(p) == _normalize(r) for p, r in zip(preds, refs)) / len(refs)


def _leaves(answer: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(answer, dict):
        for key, value in answer.items():
            yield from _leaves(value, path + (key,))
    else:
        yield path, answer


def _lookup(answer: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(answer, dict) or key not in answer:
            return None
        answer = answer[key]
    return answer


def text_pairs(preds: Sequence[Any], refs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Flatten answers to aligned (prediction, reference) texts: one pair per reference leaf."""
    _check_lengths(preds, refs)
    pred_texts, ref_texts = [], []
    for pred, ref in zip(preds, refs):
        for path, ref_leaf in _leaves(ref):
            pred_leaf = _lookup(pred, path)
            pred_texts.append(pred_leaf if isinstance(pred_leaf, str) else "")
            ref_texts.append(ref_leaf if isinstance(ref_leaf, str) else "")
    return pred_texts, ref_texts


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over text pairs (rouge-score, Chinese-aware tokenizer)."""
    _check_lengths(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=ChineseAwareTokenizer())
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(preds, refs):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for name in totals:
            totals[name] += scores[name].fmeasure
    n = len(refs)
    return {"rouge-1": totals["rouge1"] / n, "rouge-2": totals["rouge2"] / n, "rouge-l": totals["rougeL"] / n}


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, ``zh`` tokenizer, default exp smoothing), scaled to [0, 1]."""
    _check_lengths(preds, refs)
    return sacrebleu.corpus_bleu(list(preds), [list(refs)], tokenize="zh").score / 100.0


def compute_metrics(names: Sequence[str], preds: Sequence[Any], refs: Sequence[Any]) -> dict[str, float]:
    """Scores of ``<ans>`` values ``preds`` against ``refs`` for each metric in ``names``
    (``accuracy`` -> "accuracy", ``rouge`` -> "rouge-1", "rouge-2", "rouge-l", ``bleu`` -> "bleu-4")."""
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ConfigError(f"unknown metric(s) {unknown or list(names)}; choose from {', '.join(METRICS)}")
    scores: dict[str, float] = {}
    if "accuracy" in names:
        scores["accuracy"] = accuracy(preds, refs)
    if "rouge" in names or "bleu" in names:
        pred_texts, ref_texts = text_pairs(preds, refs)
        if "rouge" in names:
            scores.update(rouge(pred_texts, ref_texts))
        if "bleu" in names:
            scores["bleu-4"] = bleu(pred_texts, ref_texts)
    return scores


def read_answers(path: str) -> list[Any]:
    """The ``"<ans>"`` value of every record of a jsonl file (error names the file and line)."""
    return [record[ANSWER_KEY] for _, record in answered_records(path, ANSWER_KEY)]


def check_aligned(pred_jsonl: str, preds: list[tuple[str, dict]], ref_jsonl: str, refs: list[tuple[str, dict]]
                  ) -> None:
    """Refuse predictions that are not one per reference, in order: every field the two records of a
    line share besides ``"<ans>"`` (the prompt: text_generation.py copies the input record) must be
    equal, and the counts must match. The error names both files and the first line that differs."""
    for (pred_at, pred), (ref_at, ref) in zip(preds, refs):
        differ = sorted(key for key in (pred.keys() & ref.keys()) - {ANSWER_KEY} if pred[key] != ref[key])
        if differ:
            key = differ[0]
            raise DataFormatError(
                f"{pred_at} is not the prediction for {ref_at}: their {key!r} differ ({_short(pred[key])} vs "
                f"{_short(ref[key])}); predictions must be one per reference, in the same order (as "
                f"text_generation.py writes them)")
    if len(preds) != len(refs):
        longer, at = (pred_jsonl, preds[len(refs)][0]) if len(preds) > len(refs) else (ref_jsonl, refs[len(preds)][0])
        raise DataFormatError(
            f"{pred_jsonl} has {len(preds)} records but {ref_jsonl} has {len(refs)} (first unpaired: {at}); "
            f"predictions must be one per reference, in the same order: regenerate {pred_jsonl} from {ref_jsonl}")


def check_references(ref_jsonl: str, refs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Refuse an empty reference answer (an empty string, or an object without text): scoring against it
    silently lowers every mean, and a file of them is the generation input passed as ``ref``."""
    empty = [at for at, ref in refs if not any(isinstance(leaf, str) and leaf.strip() or
                                               leaf is not None and not isinstance(leaf, (str, dict))
                                               for _, leaf in _leaves(ref[ANSWER_KEY]))]
    if len(empty) == len(refs) and refs:
        raise DataFormatError(f"every reference {ANSWER_KEY!r} in {ref_jsonl} is empty (first: {empty[0]}): is it "
                              f"the generation input? pass the file with the reference answers as `ref`")
    if empty:
        raise DataFormatError(f"{empty[0]}: the reference {ANSWER_KEY!r} is empty ({len(empty)} of {len(refs)} "
                              f"are), which would lower every score: fill it in or drop the record from both "
                              f"files")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def evaluate_files(pred_jsonl: str, ref_jsonl: str, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Score the ``"<ans>"`` of each record of ``pred_jsonl`` against the same record of ``ref_jsonl``
    (checked to be its prediction: :func:`check_aligned`)."""
    preds, refs = list(answered_records(pred_jsonl, ANSWER_KEY)), list(answered_records(ref_jsonl, ANSWER_KEY))
    check_aligned(pred_jsonl, preds, ref_jsonl, refs)
    check_references(ref_jsonl, refs)
    return compute_metrics(metrics, [r[ANSWER_KEY] for _, r in preds], [r[ANSWER_KEY] for _, r in refs])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score generated <ans> values against references.")
    p.add_argument("--pred", required=True, help="jsonl with generated <ans> (text_generation.py output)")
    p.add_argument("--ref", required=True, help="jsonl with reference <ans>, one per --pred record in the same "
                                                "order (fields other than <ans> must agree)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated, from {','.join(METRICS)}")
    p.add_argument("--output", default=None, help="also write the scores to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_cpu_threads()
    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    try:
        if args.output is not None:
            check_output_file(args.output, [args.pred, args.ref], force=args.force)
        scores = evaluate_files(args.pred, args.ref, names)
        text = json.dumps(scores, indent=2) + "\n"
        print(text, end="")
        if args.output is not None:
            with reported_write(args.output):
                atomic_write_text(args.output, text)
    except CPMLiveError as e:
        raise SystemExit(f"error: {for_cli(e, parser)}") from None
    return 0
