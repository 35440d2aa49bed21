"""Dynamic loss scaling for fp16 gradients (the torch engine's; BMTrain has its own OptimManager)."""

from __future__ import annotations

from typing import Any

from cpm_live.errors import ConfigError


class DynamicLossScaler:
    """GradScaler-style scale: the loss is multiplied by ``scale`` before backward.

    An overflow (inf/NaN in any fp16 gradient on any rank) skips the step and divides the scale by
    ``factor`` (not below ``min_scale``); after ``window`` good steps in a row it is multiplied by
    ``factor``. Disabled, the scale is 1 and never moves: with fp32 or bf16 gradients there is
    nothing to protect, and an unchecked scale would only grow (the original's fp32 QLoRA runs).
    """

    def __init__(self, init_scale: float = 2.0**20, factor: float = 2.0, window: int = 512,
                 min_scale: float = 1.0):
        if not init_scale > 0:
            raise ConfigError(f"`loss_scale` must be > 0, got {init_scale}")
        if not factor > 1:
            raise ConfigError(f"`loss_scale_factor` must be > 1, got {factor}")
        if int(window) != window or window < 1:
            raise ConfigError(f"`loss_scale_steps` must be a positive integer, got {window}")
        self.factor, self.window, self.min_scale = float(factor), int(window), float(min_scale)
        self._scale = float(init_scale)
        self._good_steps = 0
        self.enabled = False

    @property
    def scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def update(self, overflow: bool) -> None:
        """Record one step's outcome."""
        if not self.enabled:
            return
        if overflow:
            self._scale = max(self._scale / self.factor, self.min_scale)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= self.window:
            self._scale *= self.factor
            self._good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
