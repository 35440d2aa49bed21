"""Learning-rate schedules with BMTrain's formulas, so CPM-Bee runs keep their LR curves.

Every schedule warms up linearly from 0 over ``warmup_iter`` steps (Noam: to ``lr / sqrt(warmup)``)
and then decays. The schedule is a pure function of the step number, so resuming only needs the
step: no scheduler state is saved.
"""

from __future__ import annotations

import math

import torch

from cpm_live.errors import ConfigError

DECAY_STYLES = ("constant", "linear", "cosine", "exponential", "noam")


class LRSchedule:
    def __init__(self, optimizer: torch.optim.Optimizer, style: str, lr: float, warmup_iter: int,
                 end_iter: int, gamma: float = 0.95):
        if style not in DECAY_STYLES:
            raise ConfigError(f"`lr_decay_style` must be one of {DECAY_STYLES}, got {style!r}")
        self.optimizer = optimizer
        self.style = style
        self.start_lr = lr
        self.warmup_iter = warmup_iter
        self.end_iter = end_iter
        self.gamma = gamma

    def lr_at(self, step: int) -> float:
        lr, warmup, end = self.start_lr, self.warmup_iter, self.end_iter
        if step < warmup:
            if self.style == "noam":
                return lr / math.sqrt(warmup) * step / warmup
            return lr * step / warmup
        if self.style == "constant":
            return lr
        if self.style == "noam":
            return lr / math.sqrt(max(step, 1))
        if self.style == "exponential":
            return max(0.0, lr * self.gamma ** (step - warmup))
        if self.style == "linear":
            return max(0.0, lr * (end - step) / max(1, end - warmup))
        progress = (step - warmup) / max(1, end - warmup)  # cosine
        return max(0.0, lr * 0.5 * (1.0 + math.cos(progress * math.pi)))

    def apply(self, step: int) -> float:
        """Set the optimizer's LR for the update made at ``step`` and return it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
