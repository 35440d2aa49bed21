"""Learning-rate schedules: pure functions of the step, with BMTrain's formulas."""

import pytest
import torch

from cpm_live.training.schedulers import LRSchedule


def test_schedules_follow_bmtrain_formulas():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    noam = LRSchedule(opt, "noam", 1.0, warmup_iter=4, end_iter=100)
    assert noam.lr_at(0) == 0.0 and noam.lr_at(2) == pytest.approx(2 / 4 ** 1.5)
    assert noam.lr_at(16) == pytest.approx(1 / 4)
    linear = LRSchedule(opt, "linear", 1.0, warmup_iter=10, end_iter=110)
    assert linear.lr_at(5) == 0.5 and linear.lr_at(60) == pytest.approx(0.5) and linear.lr_at(200) == 0.0
    cosine = LRSchedule(opt, "cosine", 1.0, warmup_iter=0, end_iter=100)
    assert cosine.lr_at(50) == pytest.approx(0.5)
    assert LRSchedule(opt, "exponential", 1.0, 0, 10).lr_at(2) == pytest.approx(0.95 ** 2)
    assert LRSchedule(opt, "constant", 1.0, 0, 10).apply(7) == 1.0 and opt.param_groups[0]["lr"] == 1.0
    with pytest.raises(ValueError, match="`lr_decay_style`"):
        LRSchedule(opt, "step", 1.0, 0, 10)
