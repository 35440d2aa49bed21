"""Command-line options of the fine-tuning scripts.

Every flag of the original ``cpm_live/arguments.py`` is kept with its default and meaning, and is
honoured (the original ignored ``--clip-grad``, ``--lr-decay-style``, ``--loss-scale-factor/steps``
and ``--lr-decay-iters``). ``--epoch`` decides how long ``finetune_cpm_bee.py`` trains and
``--train-iters`` only sizes the learning-rate schedule, as in CPM-Bee; ``finetune_cpm_bee_qlora.py``
keeps the qlora PR's meaning and also stops at ``--train-iters`` (``--stop-at-train-iters``). New
flags cover engines, LoRA, accumulation, checkpointing and resume.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from cpm_live.training.schedulers import DECAY_STYLES

DEFAULT_TRAIN_ITERS = 1000000  # the original default


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    from cpm_live.engine import add_engine_args
    from cpm_live.lora import add_lora_args

    p = argparse.ArgumentParser(description=description or "Fine-tune CPM-Bee (full, LoRA or QLoRA).")
    model = p.add_argument_group("model")
    model.add_argument("--model-config", default=None,
                       help="CPM-Bee JSON config (default: config.json of a --load model directory)")
    model.add_argument("--load", default=None,
                       help="checkpoint: .pt / .bin / .safetensors (fp or int4-compressed), a qlora-PR .pt, or a "
                            "Hugging Face model directory")
    model.add_argument("--vocab", default=None, help="vocab file (default: vocab.txt beside or inside --load)")
    model.add_argument("--int4", action="store_true", default=None,
                       help="quantize the base projections to 4 bit (overrides the config's int4)")
    model.add_argument("--int8", action="store_true", default=None,
                       help="quantize the base projections to LLM.int8 (overrides the config's int4/int8)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="dataset.json", help="training data: .jsonl or binary dataset dir")
    data.add_argument("--eval_dataset", "--eval-dataset", dest="eval_dataset", default=None)
    data.add_argument("--task-name", default="task")
    data.add_argument("--max-length", type=int, default=512)
    data.add_argument("--batch-size", type=int, default=32, help="rows per rank per micro-batch")
    data.add_argument("--drop-last", action="store_true")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epoch", type=int, default=1, help="epochs to train (training length)")
    opt.add_argument("--train-iters", type=int, default=None,
                     help=f"steps the learning-rate schedule is sized for (default {DEFAULT_TRAIN_ITERS}); with "
                          f"--stop-at-train-iters training also stops there")
    opt.add_argument("--stop-at-train-iters", action=argparse.BooleanOptionalAction, default=False,
                     help="stop after --train-iters steps even if --epoch epochs are not done (default of "
                          "finetune_cpm_bee_qlora.py, as the qlora PR; CPM-Bee's finetune_cpm_bee.py did not)")
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
    run.add_argument("--delta-format", choices=("peft", "opendelta"), default="peft",
                     help="LoRA weights: peft's adapter directory (default); opendelta also writes CPM-Bee's "
                          "<save-name>-delta-{best,last}.pt")
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
    for name in ("batch_size", "max_length", "gradient_accumulation_steps", "epoch", "train_iters", "log_interval",
                 "eval_interval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_iters", "keep_checkpoints", "inspect_iters", "warmup_iters", "start_step", "clip_grad",
                 "weight_decay"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", "dist_timeout"):
        if not getattr(args, name) > 0 or getattr(args, name) == float("inf"):
            problems.append(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
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


def length_note(args: argparse.Namespace) -> str | None:
    """One line when ``--train-iters`` is given, so CPM-Bee's and the qlora PR's meanings could differ."""
    if args.train_iters is None:
        return None
    if args.stop_at_train_iters:
        return (f"note: training stops after --train-iters {args.train_iters} steps, or after --epoch {args.epoch} "
                f"epochs if sooner (the qlora PR's meaning; CPM-Bee's finetune_cpm_bee.py trains every epoch and "
                f"uses --train-iters only for the learning-rate schedule)")
    return (f"note: --train-iters {args.train_iters} only sizes the learning-rate schedule; training runs all "
            f"--epoch {args.epoch} epochs (CPM-Bee's meaning; finetune_cpm_bee_qlora.py or --stop-at-train-iters "
            f"stops after --train-iters steps)")


def _check_writable(directory: str) -> list[str]:
    """Create ``--save`` now, so an unwritable path fails before hours of training, not at the end."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return [f"--save {directory} is not a writable directory ({e.strerror}); choose another path"]
    return []
