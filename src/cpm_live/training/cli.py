"""Entry points of ``src/finetune_cpm_bee.py`` and ``src/finetune_cpm_bee_qlora.py``."""

from __future__ import annotations

from collections.abc import Sequence

from cpm_live.training.args import build_parser, validate


def main(argv: Sequence[str] | None = None, qlora: bool = False) -> dict:
    parser = build_parser("Fine-tune CPM-Bee with QLoRA (4-bit base + LoRA)." if qlora else None)
    if qlora:
        # The only difference from plain fine-tuning: a 4-bit base and LoRA on by default.
        parser.set_defaults(int4=True, use_delta=True)
    args = parser.parse_args(argv)
    validate(args)
    from cpm_live.training.loop import Trainer

    trainer = Trainer(args)
    try:
        return trainer.train()
    finally:
        trainer.engine.close()


def qlora_main(argv: Sequence[str] | None = None) -> dict:
    return main(argv, qlora=True)
