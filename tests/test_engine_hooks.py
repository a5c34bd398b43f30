"""queryinst.engine.hooks: the trainer that stops on a NaN or infinite loss before the step.

train_net.py's whole run is tested in test_fault_tolerance.py; here the trainer classes on a
one-parameter model, whose SGD steps are computed by hand.
"""
import warnings

import pytest
import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch import nn

from queryinst.engine import (
    FiniteLossAMPTrainer,
    FiniteLossTrainer,
    check_losses_finite,
    with_finite_loss_check,
)


class SquareLoss(nn.Module):
    """loss_a = (w - x)^2 and loss_b = 0 * w for an input batch ``x`` (a float, or nan)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        return {"loss_a": (self.w - x) ** 2, "loss_b": self.w * 0.0}


def _trainer(batches):
    model = SquareLoss()
    return SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.25))


def test_steps_as_simple_trainer_and_continues_the_iterator():
    inner = _trainer([1.0, 2.0, 3.0, 4.0])
    next(inner._data_loader_iter)  # batch 1.0 already drawn: the checked trainer goes on at 2.0
    checked = with_finite_loss_check(inner)
    assert type(checked) is FiniteLossTrainer and checked.data_loader == [1.0, 2.0, 3.0, 4.0]
    checked.train(0, 2)
    # w <- w - 0.25 * 2 (w - x): 0 -> 0.5 * 2.0 = 1.0 -> 1.0 + 0.5 * (3.0 - 1.0) = 2.0
    assert checked.model.w.item() == pytest.approx(2.0)
    assert checked.storage.history("loss_a").latest() == pytest.approx((1.0 - 3.0) ** 2)


def test_nan_term_raises_naming_it_and_the_step_is_not_applied():
    checked = with_finite_loss_check(_trainer([2.0, float("nan"), 5.0]))
    with pytest.raises(FloatingPointError, match=r"iteration=1: loss_a=nan;.*not applied"):
        checked.train(0, 3)
    assert checked.model.w.item() == pytest.approx(1.0)  # the first step only
    assert checked.model.w.grad is not None and torch.isnan(checked.model.w.grad)


def test_amp_trainer_keeps_its_grad_scaler_and_other_objects_are_refused():
    model = SquareLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler without CUDA warns and disables itself
        amp = AMPTrainer(model, [1.0], torch.optim.SGD(model.parameters(), lr=0.1))
    checked = with_finite_loss_check(amp)
    assert type(checked) is FiniteLossAMPTrainer and checked.grad_scaler is amp.grad_scaler
    with pytest.raises(TypeError, match="SimpleTrainer or AMPTrainer, got SquareLoss"):
        with_finite_loss_check(model)


def test_check_losses_finite_names_every_bad_term():
    check_losses_finite({"a": torch.tensor(1.0)}, 0)  # finite: no error
    with pytest.raises(FloatingPointError, match=r"iteration=7: a=inf, c=-inf;"):
        check_losses_finite({"a": torch.tensor(float("inf")), "b": torch.tensor(0.0),
                             "c": torch.tensor(float("-inf"))}, 7)
