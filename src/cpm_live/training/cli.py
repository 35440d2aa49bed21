"""Entry points of ``src/finetune_cpm_bee.py`` and ``src/finetune_cpm_bee_qlora.py``."""

from __future__ import annotations

import os
from collections.abc import Sequence

from cpm_live.engine import EngineError
from cpm_live.engine.base import is_collective_timeout
from cpm_live.errors import AdapterError, CheckpointError, DataFormatError
from cpm_live.models import ConfigError
from cpm_live.tokenizers.bee import VocabError
from cpm_live.training.args import build_parser, validate

USER_ERRORS = (CheckpointError, ConfigError, DataFormatError, AdapterError, EngineError, VocabError,
               FileNotFoundError)


def main(argv: Sequence[str] | None = None, qlora: bool = False) -> dict:
    parser = build_parser("Fine-tune CPM-Bee with QLoRA (4-bit base + LoRA)." if qlora else None)
    if qlora:
        # The only differences from plain fine-tuning: a 4-bit base and LoRA on by default, and
        # --train-iters ends training (the qlora PR's meaning; CPM-Bee's finetune only sized the schedule).
        parser.set_defaults(int4=True, use_delta=True, stop_at_train_iters=True)
    args = parser.parse_args(argv)
    validate(args)
    from cpm_live.training.loop import Trainer, TrainingError

    trainer = Trainer(args)
    try:
        try:
            return trainer.setup().train()
        finally:
            trainer.close()
    except (*USER_ERRORS, TrainingError) as e:  # a bad file, flag or config: one line saying what to fix, no traceback
        raise SystemExit(f"error: {e}") from e
    except RuntimeError as e:
        if not is_collective_timeout(e):
            raise
        rank = os.environ.get("RANK", "0")
        reason = str(e).splitlines()[0].split("] ")[-1]  # gloo prefixes its source file and line
        raise SystemExit(f"error: rank {rank}: another rank did not answer within --dist-timeout "
                         f"{args.dist_timeout:g} s ({reason}): it stopped, hangs or died; see its log") from e


def qlora_main(argv: Sequence[str] | None = None) -> dict:
    return main(argv, qlora=True)
