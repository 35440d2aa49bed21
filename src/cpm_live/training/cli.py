"""Entry points of ``src/finetune_cpm_bee.py`` and ``src/finetune_cpm_bee_qlora.py``."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from cpm_live.engine.base import is_collective_timeout
from cpm_live.errors import CPMLiveError, for_cli
from cpm_live.training.args import FinetuneArgs, build_parser, check_writable
from cpm_live.utils import set_cpu_threads


def main(argv: Sequence[str] | None = None, qlora: bool = False) -> dict:
    parser = build_parser("Fine-tune CPM-Bee with QLoRA (4-bit base + LoRA)." if qlora else None)
    if qlora:
        # The only differences from plain fine-tuning: LoRA on by default, a 4-bit base unless the
        # flags or the config choose one, and --train-iters ends training (the qlora PR's meaning;
        # CPM-Bee's finetune only sized the schedule).
        parser.set_defaults(use_delta=True, stop_at_train_iters=True)
    namespace = parser.parse_args(argv)
    set_cpu_threads()
    from cpm_live.training.loop import STOP_SIGNAL_NAMES, Trainer

    try:
        args = FinetuneArgs.from_args(namespace, default_quantization="int4" if qlora else None)
        if args.saving.save:
            check_writable(args.saving.save)
        trainer = Trainer(args)
        try:
            result = trainer.setup().train()
        finally:
            trainer.close()
    except KeyboardInterrupt:  # Ctrl-C before the loop catches it (while loading): nothing to save yet
        print("error: interrupted (SIGINT) before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except CPMLiveError as e:  # a bad file, flag or config: one line saying what to fix, no traceback
        raise SystemExit(f"error: {for_cli(e, parser)}") from e
    except RuntimeError as e:
        if not is_collective_timeout(e):
            raise
        rank = os.environ.get("RANK", "0")
        reason = str(e).splitlines()[0].split("] ")[-1]  # gloo prefixes its source file and line
        raise SystemExit(f"error: rank {rank}: another rank did not answer within --dist-timeout "
                         f"{namespace.dist_timeout:g} s ({reason}): it stopped, hangs or died; see its log") from e
    if result["stop_reason"] in STOP_SIGNAL_NAMES:
        # Saved, but not done: a scheduler must not read this as success (128 + the signal, as a shell does).
        raise SystemExit(128 + signal.Signals[result["stop_reason"]].value)
    return result


def qlora_main(argv: Sequence[str] | None = None) -> dict:
    return main(argv, qlora=True)
