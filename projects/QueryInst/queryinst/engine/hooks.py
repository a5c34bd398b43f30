"""The training loop's checks, as Detectron2 trainer classes.

Detectron2 0.6 checks the loss after ``backward()`` and before ``optimizer.step()``, in
``SimpleTrainer._write_metrics``, on the main process only and without naming the term.
:class:`FiniteLossTrainer` (and :class:`FiniteLossAMPTrainer` for ``SOLVER.AMP.ENABLED``)
checks first, on every process, naming the terms (:func:`check_losses_finite`); train_net.py's
``Trainer`` swaps ``DefaultTrainer``'s inner trainer for one with :func:`with_finite_loss_check`.
Detectron2 0.6 has no hook between ``backward()`` and ``optimizer.step()``, hence a subclass
of the inner trainer rather than a ``HookBase``.

:class:`GatherRngStates` (a ``HookBase``) collects every process's RNG states for the
checkpoint that rank 0 writes, so that each process of a resumed job continues its own.
"""
from __future__ import annotations

import math
from typing import Mapping, Union

import torch
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm

from ..data.train_loader import rng_state

__all__ = ["FiniteLossAMPTrainer", "FiniteLossTrainer", "check_losses_finite",
           "with_finite_loss_check", "GatherRngStates"]


def check_losses_finite(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raise before an optimizer step on a NaN or infinite loss, naming the terms.

    Detectron2 0.6's ``SimpleTrainer`` raises only on its main process, from the sum of the
    losses averaged over processes, with the whole loss dict; this names the offending terms
    of this process (e.g. ``s2_loss_mask``). Call it between ``backward()`` and
    ``optimizer.step()``: the weights then keep their last finite values.

    Args:
        loss_dict: loss name -> scalar tensor (the model's training output).
        iteration (int): the 0-based training iteration, for the message.

    Raises:
        FloatingPointError: "Loss became infinite or NaN at iteration=<i>: <name>=nan, ...;
            the optimizer step was not applied" (Detectron2's wording, then the terms).
    """
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration={iteration}: {terms}; the optimizer "
            f"step was not applied (all losses: {values})")


class _FiniteLossCheck:
    """Mixin for Detectron2's ``SimpleTrainer`` / ``AMPTrainer``: :func:`check_losses_finite`
    before the metrics are written, i.e. after ``backward()`` and before the optimizer step."""

    def _write_metrics(self, loss_dict, data_time, prefix=""):
        check_losses_finite(loss_dict, self.iter)
        super()._write_metrics(loss_dict, data_time, prefix)


class FiniteLossTrainer(_FiniteLossCheck, SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` that raises on a NaN or infinite loss term before the
    optimizer step (:func:`check_losses_finite`); otherwise the same training step."""


class FiniteLossAMPTrainer(_FiniteLossCheck, AMPTrainer):
    """Detectron2's ``AMPTrainer`` with the check of :class:`FiniteLossTrainer`."""


def with_finite_loss_check(
    trainer: Union[SimpleTrainer, AMPTrainer]
) -> Union[FiniteLossTrainer, FiniteLossAMPTrainer]:
    """The checked trainer over the same model, data loader and optimizer (and grad scaler).

    The new trainer continues the given trainer's data-loader iterator (no second ``iter()``
    of the loader: that would start new workers and draw a new base seed from torch's RNG).

    Args:
        trainer: the inner trainer ``DefaultTrainer.__init__`` built (``self._trainer``).

    Returns:
        FiniteLossAMPTrainer for an ``AMPTrainer``, else FiniteLossTrainer.

    Raises:
        TypeError: ``trainer`` is not a Detectron2 ``SimpleTrainer``.
    """
    if not isinstance(trainer, SimpleTrainer):
        raise TypeError(f"with_finite_loss_check: a Detectron2 SimpleTrainer or AMPTrainer, "
                        f"got {type(trainer).__name__}")
    # iter() of the running iterator is the iterator itself: the stream goes on unchanged.
    if isinstance(trainer, AMPTrainer):
        checked = FiniteLossAMPTrainer(trainer.model, trainer._data_loader_iter,
                                       trainer.optimizer, trainer.grad_scaler)
    else:
        checked = FiniteLossTrainer(trainer.model, trainer._data_loader_iter, trainer.optimizer)
    checked.data_loader = trainer.data_loader
    return checked


class GatherRngStates(HookBase):
    """With several processes, each process's RNG states for the checkpoint rank 0 writes.

    Only rank 0 writes checkpoints, so its :func:`rng_state` alone would be restored in every
    process of a resumed job, whose other ranks would then draw other numbers (dropout) than
    in an uninterrupted run. After each iteration that ends with a checkpoint (every
    ``period`` iterations and the last), all processes gather their states into
    ``trainer.rng_by_rank`` (a list by rank); register it before the checkpointer, in every
    process (``all_gather`` is collective).

    Args:
        period (int): ``SOLVER.CHECKPOINT_PERIOD``.
        max_iter (int): ``SOLVER.MAX_ITER``.
    """

    def __init__(self, period: int, max_iter: int):
        self._period, self._max_iter = int(period), int(max_iter)

    def after_step(self):
        it = self.trainer.iter
        if comm.get_world_size() > 1 and ((it + 1) % self._period == 0
                                           or it >= self._max_iter - 1):
            self.trainer.rng_by_rank = comm.all_gather(rng_state())
