"""A format-trained stand-in for a pretrained CPM-Bee, for any vocab, built on CPU in about a minute.

    cpm-bee-format-base --data bee_data/train.jsonl --vocab bee.txt --out format_base
    # -> format_base/base.pt (fp32, original key layout), config.json, format_tasks.jsonl, train/metrics.jsonl

**Why a random model is no base for LoRA.** CPMBee's init is the original's (``models/bee.py`` and
``layers/`` of OpenBMB/CPM-Bee: projections N(0, 1), embedding N(0, 0.02), position bias N(0, 1),
norm weights 1). The logits are ``(h / sqrt(d)) E^T`` where ``h`` leaves the final RMSNorm with
``|h| = sqrt(d)`` (weight 1), so no logit is larger than ``|E_t| ~ 0.02 sqrt(d)``: 0.16 for d = 64,
1.3 for d = 4096. Every answer token starts at ``ln(V + X)`` (11.37 with the 86,583-token vocab),
and while the embedding and the norms stay frozen, as they do under LoRA, no adapter can take more
than ``2 * 0.02 * sqrt(d)`` nats off it (3% of 11.37 for d = 64). A released CPM-Bee has learned its
embedding and norms; this module makes a small model that has too.

**What the stand-in learns.** A short full fine-tune from random weights on generic CPM-Bee tasks
built from the *text* of any CPM-Bee records: every string leaf, deduplicated. Nothing under
``"<ans>"`` is read, so the base never sees the answers of the task it is later fine-tuned on::

    pick   {"input": s, "options": {"<option_0>": t0, ..., "<option_3>": t3}, "question": PICK,
            "<ans>": "<option_k>"}                      # s is option k, the others are random texts
    write  the same input and options, "question": WRITE, "<ans>": s
    copy   {"input": s, "question": COPY, "<ans>": s}

It learns the ``<ans>`` format, logits that are sharp over the real vocabulary, ``<option_k>``
answers, and that the question decides the form of the answer (a label or text). The question of a
new task is none of these three, so what that task wants, the form of its answer included, is left
to fine-tuning; the demo (:mod:`cpm_live.demo.pipeline`) trains its base with the same
:func:`train_base` on its bundled data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cpm_live.errors import CPMLiveError, DataFormatError, MissingFileError, for_cli
from cpm_live.models import CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.training.metrics import read_metrics
from cpm_live.utils import JSON_TOO_DEEP, atomic_write_text, set_cpu_threads

PICK = "哪个选项与原文相同？"
WRITE = "原文是哪个选项？写出这个选项。"
COPY = "复述原文。"
TASKS = ("pick", "write", "copy")
OPTIONS = 4


def format_base_config(vocab_size: int) -> CPMBeeConfig:
    """The repository's ``cpm-bee-tiny.json`` shape (2 layers, d = 64, 4 heads of 16, fp32) for ``vocab_size``."""
    return CPMBeeConfig(vocab_size=vocab_size, dim_model=64, num_heads=4, dim_head=16, dim_ff=128, num_layers=2,
                        half=False)


def record_texts(records: Iterable[Mapping[str, Any]], min_chars: int = 2, max_chars: int = 24) -> list[str]:
    """Distinct string leaves of CPM-Bee records (first-seen order) of ``min_chars..max_chars``
    characters; keys and everything under the top-level ``"<ans>"`` are skipped."""
    seen: dict[str, None] = {}

    def visit(value: Any) -> None:
        if isinstance(value, str):
            if min_chars <= len(value) <= max_chars:
                seen.setdefault(value)
        elif isinstance(value, Mapping):
            for child in value.values():
                visit(child)

    for record in records:
        visit({k: v for k, v in record.items() if k != "<ans>"})
    return list(seen)


def format_tasks(texts: Sequence[str], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` records, the three tasks in equal turns, each on a text drawn with ``seed``."""
    if len(texts) < OPTIONS:
        raise DataFormatError(f"need at least {OPTIONS} distinct texts to build options, got {len(texts)}")
    rng = random.Random(seed)
    records = []
    for i in range(count):
        task, text = TASKS[i % len(TASKS)], rng.choice(texts)
        if task == "copy":
            records.append({"input": text, "question": COPY, "<ans>": text})
            continue
        others: list[str] = []
        while len(others) < OPTIONS - 1:  # distinct texts other than the input
            other = rng.choice(texts)
            if other != text and other not in others:
                others.append(other)
        answer = rng.randrange(OPTIONS)
        choices = others[:answer] + [text] + others[answer:]
        options = {f"<option_{k}>": choice for k, choice in enumerate(choices)}
        records.append({"input": text, "options": options, "question": PICK if task == "pick" else WRITE,
                        "<ans>": f"<option_{answer}>" if task == "pick" else text})
    rng.shuffle(records)
    return records


class BuildInterrupted(CPMLiveError, RuntimeError):
    """A resumable base build stopped on SIGTERM after saving a checkpoint; calling again continues it."""


def train_base(config_path: str, vocab: str, dataset: str, out: str, steps: int, *, lr: float, batch_size: int,
               max_length: int, warmup: int, seed: int, log_interval: int, decay: str = "constant",
               heldout: str | None = None, eval_interval: int = 0, save_iters: int = 0) -> str:
    """Full fine-tune of ``config_path``'s model from random weights on ``dataset`` with the training
    CLI; returns ``out/base.pt`` (fp32, the original CPM-Bee key layout). ``out/train`` keeps the run's
    ``metrics.jsonl`` (with the loss on ``heldout`` every ``eval_interval`` steps when given).

    ``save_iters = 0`` starts ``out/train`` afresh on every call. ``save_iters > 0`` makes the build
    resumable: a checkpoint every ``save_iters`` steps, a call continues from the newest one, and a
    SIGTERM saves and raises :class:`BuildInterrupted` (how a long build is split into sessions)."""
    from cpm_live.training.cli import main as finetune_main

    run_dir = os.path.join(out, "train")
    if not save_iters:
        shutil.rmtree(run_dir, ignore_errors=True)
    resume = ["--save-iters", str(save_iters), "--keep-checkpoints", "1", "--resume", "auto"] if save_iters else []
    evaluation = ["--eval_dataset", heldout, "--eval-interval", str(eval_interval),
                  "--early-stop-patience", str(steps)] if heldout else []
    try:
        finetune_main(["--model-config", config_path, "--vocab", vocab, "--dataset", dataset, "--save", run_dir,
                      "--save-name", "base", "--train-iters", str(steps), "--stop-at-train-iters",
                      "--epoch", "1000", "--batch-size", str(batch_size), "--max-length", str(max_length),
                      "--lr", str(lr), "--lr-decay-style", decay, "--warmup-iters", str(warmup),
                      "--weight-decay", "0.0", "--seed", str(seed), "--log-interval", str(log_interval),
                      "--engine", "torch", "--device", "cpu", "--inspect-iters", "0",
                      "--no-activation-checkpointing", *resume, *evaluation])
    except SystemExit as e:  # a run stopped by SIGTERM/SIGINT saved its checkpoint and exits 128 + signal
        if e.code not in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            raise
        raise BuildInterrupted(f"base build stopped before step {steps}; its checkpoint is under {run_dir}: run "
                               f"the same command again to continue") from None
    checkpoint = os.path.join(out, "base.pt")
    shutil.copyfile(os.path.join(run_dir, "base-last.pt"), checkpoint)
    return checkpoint


def _read_records(paths: Sequence[str]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        if not os.path.isfile(path):
            raise MissingFileError(f"`data` {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{number}: not valid JSON ({e.msg})") from e
                except RecursionError:
                    raise DataFormatError(f"{path}:{number}: {JSON_TOO_DEEP}") from None
    return records


def build_format_base(data: Sequence[str], vocab: str, out: str, model_config: str | None = None, steps: int = 400,
                      records: int = 8000, lr: float = 1e-2, batch_size: int = 4, max_length: int = 256,
                      max_chars: int = 24, seed: int = 1234) -> dict[str, Any]:
    """Write the tasks, train the stand-in and return a summary (paths, loss, seconds)."""
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    texts = record_texts(_read_records(data), max_chars=max_chars)
    if len(texts) < OPTIONS:
        raise DataFormatError(f"{', '.join(data)} hold {len(texts)} distinct texts of 2..{max_chars} characters; "
                         f"need at least {OPTIONS}")
    tasks_file = os.path.join(out, "format_tasks.jsonl")
    atomic_write_text(tasks_file, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in format_tasks(texts, records, seed)))
    if model_config is None:
        model_config = os.path.join(out, "config.json")
        format_base_config(CPMBeeTokenizer(vocab).vocab_size).to_json_file(model_config)
    checkpoint = train_base(model_config, vocab, tasks_file, out, steps, lr=lr, batch_size=batch_size,
                            max_length=max_length, warmup=min(10, steps), seed=seed, log_interval=10)
    losses = [r["loss"] for r in read_metrics(os.path.join(out, "train", "metrics.jsonl")) if "loss" in r]
    summary = {"checkpoint": checkpoint, "model_config": model_config, "tasks": tasks_file, "texts": len(texts),
               "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
               "seconds": round(time.perf_counter() - started, 1)}
    print(f"format base: {len(texts)} texts -> {records} task records; loss {losses[0]:.3f} -> {losses[-1]:.3f} in "
          f"{steps} steps, {summary['seconds']:.0f} s; checkpoint {checkpoint} (config {model_config})", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Train a small format-trained stand-in for a pretrained CPM-Bee on "
                                            "generic tasks (pick / write / copy) built from the text of CPM-Bee "
                                            "records; their answers are never read.")
    p.add_argument("--data", nargs="+", required=True, help="CPM-Bee .jsonl files whose texts the tasks use")
    p.add_argument("--vocab", required=True, help="vocab file (e.g. CPM-Bee's bee.txt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model-config", default=None,
                   help="model config JSON (default: 2 layers, d=64, sized to the vocab, written to OUT/config.json)")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--records", type=int, default=8000, help="task records to generate (default 8000)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-chars", type=int, default=24, help="longest text used, in characters (default 24)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the tasks and of training")
    args = p.parse_args(argv)
    # d=64: intra-op threads only add synchronisation; on a shared 2-core machine two threads took
    # 6x as long as one (measured with `time cpm-bee-format-base` against OMP_NUM_THREADS=1).
    set_cpu_threads(preferred=1)
    try:
        return build_format_base(args.data, args.vocab, args.out, args.model_config, args.steps, args.records,
                                 args.lr, args.batch_size, args.max_length, args.max_chars, args.seed)
    except CPMLiveError as e:  # a bad data file or path: one line saying what to fix
        raise SystemExit(f"error: {for_cli(e, p)}") from e


if __name__ == "__main__":
    main()
