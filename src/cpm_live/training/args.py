"""Command-line options of the fine-tuning scripts.

Every flag of the original ``cpm_live/arguments.py`` is kept with its default and is honoured
(the original ignored ``--clip-grad``, ``--lr-decay-style``, ``--loss-scale-factor/steps`` and
``--lr-decay-iters``). New flags cover engines, LoRA, accumulation, checkpointing and resume.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from cpm_live.training.schedulers import DECAY_STYLES


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    from cpm_live.delta import add_lora_args
    from cpm_live.engine import add_engine_args

    p = argparse.ArgumentParser(description=description or "Fine-tune CPM-Bee (full, LoRA or QLoRA).")
    model = p.add_argument_group("model")
    model.add_argument("--model-config", required=True, help="CPM-Bee JSON config")
    model.add_argument("--load", default=None, help="checkpoint: .pt / .safetensors, fp or int4-compressed")
    model.add_argument("--vocab", default=None, help="vocab file (default: vocab.txt beside --load)")
    model.add_argument("--int4", action="store_true", default=None,
                       help="quantize the base projections to 4 bit (overrides the config's int4)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="dataset.json", help="training data: .jsonl or binary dataset dir")
    data.add_argument("--eval_dataset", "--eval-dataset", dest="eval_dataset", default=None)
    data.add_argument("--task-name", default="task")
    data.add_argument("--max-length", type=int, default=512)
    data.add_argument("--batch-size", type=int, default=32, help="rows per rank per micro-batch")
    data.add_argument("--drop-last", action="store_true")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epoch", type=int, default=1)
    opt.add_argument("--train-iters", type=int, default=1000000, help="stop after this many optimizer steps")
    opt.add_argument("--lr", type=float, default=1e-4)
    opt.add_argument("--weight-decay", type=float, default=1e-2)
    opt.add_argument("--clip-grad", type=float, default=1.0, help="max global grad norm (0 disables)")
    opt.add_argument("--warmup-iters", type=int, default=100)
    opt.add_argument("--lr-decay-style", default="noam", choices=DECAY_STYLES)
    opt.add_argument("--lr-decay-iters", type=int, default=None, help="end of decay (default --train-iters)")
    opt.add_argument("--start-step", type=int, default=0, help="scheduler step of the first update")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=1)
    opt.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                     help="recompute block activations in backward (less memory, ~30%% more compute)")

    run = p.add_argument_group("evaluation, saving and logging")
    run.add_argument("--save", default=None, help="output directory")
    run.add_argument("--save-name", default="cpm_bee_finetune")
    run.add_argument("--save-iters", type=int, default=0, help="write a resumable checkpoint every N steps")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="resumable checkpoints kept on disk")
    run.add_argument("--resume", default=None, help="'auto' (latest under --save) or a checkpoint directory")
    run.add_argument("--eval-interval", type=int, default=500)
    run.add_argument("--early-stop-patience", type=int, default=5)
    run.add_argument("--eval-metrics", default=None,
                     help="comma-separated generation metrics on the eval set: accuracy,rouge,bleu")
    run.add_argument("--max-eval-samples", type=int, default=None, help="limit the eval set")
    run.add_argument("--tensorboard", default=None, help="TensorBoard dir (default <save>/tensorboard)")
    run.add_argument("--inspect-iters", type=int, default=1000, help="print a parameter summary every N")
    run.add_argument("--log-interval", type=int, default=1)
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_engine_args(p)
    add_lora_args(p)
    return p


def validate(args: argparse.Namespace) -> None:
    """Fail early, before any process group or model is built, on inconsistent options."""
    problems = []
    for name in ("batch_size", "max_length", "gradient_accumulation_steps", "epoch"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.save_iters and not args.save:
        problems.append("--save-iters needs --save (where the checkpoints go)")
    if args.resume == "auto" and not args.save:
        problems.append("--resume auto needs --save (it looks for the latest checkpoint there)")
    if args.eval_metrics and not args.eval_dataset:
        problems.append("--eval-metrics needs --eval_dataset")
    if args.save and not problems:
        problems += _check_writable(args.save)
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def _check_writable(directory: str) -> list[str]:
    """Create ``--save`` now, so an unwritable path fails before hours of training, not at the end."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return [f"--save {directory} is not a writable directory ({e.strerror}); choose another path"]
    return []
