"""Command-line options of the fine-tuning scripts, and the typed settings they become.

Every flag of the original ``cpm_live/arguments.py`` is kept with its default and meaning, and is
honoured (the original ignored ``--clip-grad``, ``--lr-decay-style``, ``--loss-scale-factor/steps``
and ``--lr-decay-iters``). ``--epoch`` decides how long ``finetune_cpm_bee.py`` trains and
``--train-iters`` only sizes the learning-rate schedule, as in CPM-Bee; ``finetune_cpm_bee_qlora.py``
keeps the qlora PR's meaning and also stops at ``--train-iters`` (``--stop-at-train-iters``). New
flags cover engines, LoRA, accumulation, checkpointing and resume.

argv is parsed once into :class:`FinetuneArgs`: :class:`~cpm_live.checkpoint.base_model.ModelArgs`,
:class:`TrainArgs`, :class:`EvalArgs`, :class:`SaveArgs`, :class:`~cpm_live.engine.EngineArgs` and
the :class:`~cpm_live.lora.LoraSettings` (``None`` without ``--use-delta``). Each field is named as
its flag's destination, and each class checks its values when built; errors name settings as
```name``` and the command line shows them as flags (:func:`cpm_live.errors.for_cli`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, fields

from cpm_live.checkpoint.base_model import ModelArgs, add_model_args
from cpm_live.engine import EngineArgs, add_engine_args
from cpm_live.errors import ConfigError
from cpm_live.lora import LoraSettings, add_lora_args, lora_settings_from_args
from cpm_live.training.schedulers import DECAY_STYLES

DEFAULT_TRAIN_ITERS = 1000000  # the original default


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or "Fine-tune CPM-Bee (full, LoRA or QLoRA).")
    add_model_args(p)

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
    add_engine_args(p)
    add_lora_args(p)
    return p


def check_ranges(settings: object, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = ()) -> list[str]:
    """One problem per field of ``settings`` out of its range (``None`` means unset and passes)."""
    problems = []
    for name in at_least_one:
        value = getattr(settings, name)
        if value is not None and value < 1:
            problems.append(f"`{name}` must be >= 1, got {value}")
    for name in non_negative:
        value = getattr(settings, name)
        if value is not None and value < 0:
            problems.append(f"`{name}` must be >= 0, got {value}")
    for name in positive:
        value = getattr(settings, name)
        if not value > 0 or value == float("inf"):
            problems.append(f"`{name}` must be a positive number, got {value}")
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class TrainArgs:
    """What to train on and how: data, length, schedule, optimizer, logging."""

    dataset: str = "dataset.json"
    task_name: str = "task"
    max_length: int = 512
    batch_size: int = 32  # rows per rank per micro-batch
    drop_last: bool = False
    epoch: int = 1  # training length (CPM-Bee's meaning)
    train_iters: int | None = None  # the schedule's length; with stop_at_train_iters also the training's
    stop_at_train_iters: bool = False
    lr: float = 1e-4
    weight_decay: float = 1e-2
    clip_grad: float = 1.0  # max global grad norm; 0 disables
    warmup_iters: int = 100
    lr_decay_style: str = "noam"
    lr_decay_iters: int | None = None  # end of decay; default train_iters
    start_step: int = 0
    gradient_accumulation_steps: int = 1
    activation_checkpointing: bool = True
    log_interval: int = 1
    inspect_iters: int = 1000
    tensorboard: str | None = None  # default <save>/tensorboard

    def __post_init__(self) -> None:
        problems = check_ranges(
            self, at_least_one=("batch_size", "max_length", "gradient_accumulation_steps", "epoch", "train_iters",
                                "log_interval"),
            non_negative=("inspect_iters", "warmup_iters", "start_step", "clip_grad", "weight_decay"),
            positive=("lr",))
        if self.lr_decay_style not in DECAY_STYLES:
            problems.append(f"`lr_decay_style` must be one of {', '.join(DECAY_STYLES)}, got {self.lr_decay_style!r}")
        raise_problems(problems)

    @property
    def schedule_iters(self) -> int:
        return self.train_iters or DEFAULT_TRAIN_ITERS

    @property
    def max_steps(self) -> int | None:
        """Where training stops at the latest (None: after ``epoch`` epochs only)."""
        return self.schedule_iters if self.stop_at_train_iters else None

    def length_note(self) -> str | None:
        """One line when ``--train-iters`` is given, so CPM-Bee's and the qlora PR's meanings could differ."""
        if self.train_iters is None:
            return None
        if self.stop_at_train_iters:
            return (f"note: training stops after --train-iters {self.train_iters} steps, or after --epoch "
                    f"{self.epoch} epochs if sooner (the qlora PR's meaning; CPM-Bee's finetune_cpm_bee.py trains "
                    f"every epoch and uses --train-iters only for the learning-rate schedule)")
        return (f"note: --train-iters {self.train_iters} only sizes the learning-rate schedule; training runs all "
                f"--epoch {self.epoch} epochs (CPM-Bee's meaning; finetune_cpm_bee_qlora.py or --stop-at-train-iters "
                f"stops after --train-iters steps)")


@dataclass(frozen=True)
class EvalArgs:
    """Evaluation during training: the eval set, how often, early stopping, generation metrics."""

    eval_dataset: str | None = None
    eval_interval: int = 500
    early_stop_patience: int = 5
    eval_metrics: tuple[str, ...] = ()  # accuracy, rouge, bleu
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        problems = check_ranges(self, at_least_one=("eval_interval",))
        if self.eval_metrics and not self.eval_dataset:
            problems.append("`eval_metrics` needs `eval_dataset`")
        raise_problems(problems)


@dataclass(frozen=True)
class SaveArgs:
    """Where results and resumable checkpoints go, and where a run resumes from."""

    save: str | None = None  # output directory
    save_name: str = "cpm_bee_finetune"
    delta_format: str = "peft"  # peft, or opendelta (also CPM-Bee's *-delta-*.pt)
    save_iters: int = 0  # a resumable checkpoint every N steps (0: none)
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" or a checkpoint directory

    def __post_init__(self) -> None:
        problems = check_ranges(self, non_negative=("save_iters", "keep_checkpoints"))
        if self.save_iters and not self.save:
            problems.append("`save_iters` needs `save` (where the checkpoints go)")
        if self.resume == "auto" and not self.save:
            problems.append("`resume` auto needs `save` (it looks for the latest checkpoint there)")
        raise_problems(problems)


@dataclass(frozen=True)
class FinetuneArgs:
    """Every setting of a fine-tuning run, built once from argv."""

    model: ModelArgs
    train: TrainArgs
    eval: EvalArgs
    saving: SaveArgs
    engine: EngineArgs
    lora: LoraSettings | None

    @classmethod
    def from_args(cls, args: argparse.Namespace, default_quantization: str | None = None) -> FinetuneArgs:
        def take(settings_class: type) -> dict:
            return {f.name: getattr(args, f.name) for f in fields(settings_class) if hasattr(args, f.name)}

        evaluation = take(EvalArgs)
        evaluation["eval_metrics"] = tuple(m.strip() for m in (args.eval_metrics or "").split(",") if m.strip())
        return cls(model=ModelArgs.from_args(args, default_quantization), train=TrainArgs(**take(TrainArgs)),
                   eval=EvalArgs(**evaluation), saving=SaveArgs(**take(SaveArgs)), engine=EngineArgs.from_args(args),
                   lora=lora_settings_from_args(args))


def check_writable(directory: str) -> None:
    """Create ``--save`` now, so an unwritable path fails before hours of training, not at the end."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ConfigError(f"`save` {directory} is not a writable directory ({e.strerror}); choose another path") \
            from None
