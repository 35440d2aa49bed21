"""Run logging on rank 0: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsLogger:
    """Appends one JSON line per record and mirrors numbers to TensorBoard.

    Each line is written and flushed whole, so a crash loses at most the record being written; on
    resume, records past the resumed step are dropped first so the file reads as one clean run.
    """

    def __init__(self, save_dir: str | None, tensorboard_dir: str | None, enabled: bool, resume_step: int = 0):
        self._file = None
        self._tb = None
        if not enabled:
            return
        if save_dir is not None:
            path = os.path.join(save_dir, "metrics.jsonl")
            if os.path.exists(path):
                _truncate_after(path, resume_step)
            self._file = open(path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any], tb_prefix: str = "train") -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{tb_prefix}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    from cpm_live.utils import atomic_write_text

    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
