"""What a run tells its user: step progress while it trains, eval progress, and one closing summary.

On a terminal the steps are a tqdm bar (step/total, elapsed, ETA, loss, lr, tokens/s); in a log file
or CI (no TTY) they are timestamped lines with the same numbers, as HF Trainer and torchtune users
expect. The summary says where the adapter and the last checkpoint are and how to resume.
"""

from __future__ import annotations

import datetime
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def clock(seconds: float) -> str:
    """``H:MM:SS`` (as tqdm shows elapsed time)."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class StepProgress:
    """A tqdm bar on a terminal, else nothing; :meth:`line` is the timestamped form for logs.

    ``total`` is where training stops at the latest (None when only ``--epoch`` decides: then the
    line shows ``step N/?`` and no ETA).
    """

    def __init__(self, total: int | None, start_step: int, enabled: bool):
        self.total, self.start_step = total, start_step
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=None if enabled else True)

    @property
    def on_terminal(self) -> bool:
        return not self.bar.disable

    def update(self, record: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", dropped=record["dropped_records"])

    def eta(self, step: int) -> float | None:
        """Seconds left at this run's mean step time so far; None without a known total."""
        done = step - self.start_step
        if self.total is None or done <= 0:
            return None
        return (time.monotonic() - self.started) / done * max(self.total - step, 0)

    def line(self, record: dict[str, Any]) -> str:
        step = record["step"]
        total = "?" if self.total is None else str(self.total)
        eta = self.eta(step)
        return (f"{timestamp()} | step {step}/{total} | epoch {record['epoch']} | "
                f"elapsed {clock(time.monotonic() - self.started)} | eta {'?' if eta is None else clock(eta)} | "
                f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | tokens/s {record['tokens_per_s']:.0f} | "
                f"grad_norm {record['grad_norm']:.4f} | scale {record['loss_scale']:g} | "
                f"peak {record['peak_memory_mb']:.0f} MiB | dropped {record['dropped_records']} |")

    def close(self) -> None:
        self.bar.close()


def eval_bar(desc: str, total: int | None, enabled: bool) -> tqdm:
    """An evaluation's bar, counting records (``unit="rec"``); off when not on a terminal."""
    return tqdm(total=total, desc=desc, unit="rec", dynamic_ncols=True, leave=False,
                disable=None if enabled else True)


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line of this run with ``--resume auto`` (replacing any ``--resume`` it had)."""
    argv = list(sys.argv if argv is None else argv)
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        out.append(arg)
    return shlex.join(["python", argv[0], *out, "--resume", "auto"])


@dataclass
class RunOutcome:
    """Where a run left its results, for :func:`summary`."""

    step: int
    stop_reason: str
    save: str | None
    best: str | None  # the best weights (adapter dir or .pt), None without --save
    best_note: str  # how the best weights were chosen
    last: str | None
    checkpoint: str | None  # the newest resumable checkpoint
    best_eval: float | None
    best_step: int | None


def summary(outcome: RunOutcome, argv: Sequence[str] | None = None) -> str:
    """The closing block of a run: adapter, last checkpoint, resume command, best eval."""
    if outcome.save is None:
        return (f"run summary: stopped at step {outcome.step} ({outcome.stop_reason}); nothing was saved "
                "(no --save given)")
    lines = [f"run summary: stopped at step {outcome.step} ({outcome.stop_reason})",
             f"  best weights:    {outcome.best} ({outcome.best_note})" if outcome.best else
             "  best weights:    none written",
             f"  last weights:    {outcome.last}" if outcome.last else "  last weights:    none written",
             f"  last checkpoint: {outcome.checkpoint}" if outcome.checkpoint else
             "  last checkpoint: none (--save-iters 0 writes no resumable checkpoint)"]
    if outcome.checkpoint:
        lines.append(f"  resume:          {resume_command(argv)}")
    lines.append(f"  best eval loss:  {outcome.best_eval:.4f} at step {outcome.best_step or '?'}"
                 if outcome.best_eval is not None else "  best eval loss:  none (no evaluation ran)")
    return "\n".join(lines)
