"""QueryInst's optimiser: AdamW (or SGD), a backbone lr factor, full-model gradient clipping.

docs/method.md §2.4: AdamW with weight decay 1e-4 and gradient clipping by the L2
norm of *all* gradients together (official: lr 2.5e-5, max_norm 1; MMDetection's recipe:
lr 1e-4, backbone lr x 0.1, max_norm 0.1). Detectron2's own ``build_optimizer`` only builds
SGD and clips each parameter separately, hence this module.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer", "split_backbone_param_groups", "with_full_model_gradient_clipping"]

_OPTIMIZERS = ("ADAMW", "SGD")


def with_full_model_gradient_clipping(
    optimizer_cls: Type[torch.optim.Optimizer], max_norm: float, norm_type: float = 2.0
) -> Type[torch.optim.Optimizer]:
    """Subclass an optimiser so that ``step`` first clips the gradient norm of all its params.

    The norm is taken over the gradients of every parameter of every group at once (as
    ``torch.nn.utils.clip_grad_norm_`` over the whole model, docs/method.md §2), not per
    parameter like Detectron2's ``CLIP_TYPE: "norm"``. Clipping inside ``step`` makes it work with
    Detectron2's ``AMPTrainer``: its ``GradScaler.step`` unscales the gradients before it
    calls ``step``, so the threshold applies to the true (unscaled) gradients.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.AdamW``.
        max_norm: largest allowed total norm of the gradients (``CLIP_VALUE``), > 0.
        norm_type: the p of the p-norm (``NORM_TYPE``; 2.0 = L2, ``inf`` = max-abs).

    Returns:
        type: a subclass of ``optimizer_cls`` named ``<Name>WithFullModelGradientClip``.

    Raises:
        ValueError: if ``max_norm`` is not positive.
    """
    if not max_norm > 0:
        raise ValueError(f"full-model gradient clipping needs max_norm > 0, got {max_norm}")

    def step(self, closure=None):
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        return optimizer_cls.step(self, closure)

    return type(optimizer_cls.__name__ + "WithFullModelGradientClip", (optimizer_cls,),
                {"step": step})


def split_backbone_param_groups(
    param_groups: List[Dict[str, Any]], backbone: torch.nn.Module, multiplier: float
) -> List[Dict[str, Any]]:
    """Split optimiser param groups so that backbone parameters get ``lr * multiplier``.

    Args:
        param_groups: groups as from ``get_default_optimizer_params`` (each with "params"
            and "lr").
        backbone: the module whose parameters are "backbone" parameters.
        multiplier: factor on their learning rate (``SOLVER.BACKBONE_MULTIPLIER``).

    Returns:
        list[dict]: the same parameters; each input group becomes at most two groups (its
        non-backbone and its backbone parameters), with equal hyper-parameters except "lr".
        With ``multiplier == 1`` the input is returned unchanged.
    """
    if multiplier == 1.0:
        return param_groups
    in_backbone = {id(p) for p in backbone.parameters()}
    out = []
    for group in param_groups:
        rest = [p for p in group["params"] if id(p) not in in_backbone]
        ours = [p for p in group["params"] if id(p) in in_backbone]
        if rest:
            out.append({**group, "params": rest})
        if ours:
            out.append({**group, "params": ours, "lr": group["lr"] * multiplier})
    return out


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build QueryInst's optimiser from ``cfg.SOLVER`` (docs/method.md §2.4).

    - ``OPTIMIZER``: "ADAMW" (paper; betas (0.9, 0.999)) or "SGD" (with ``MOMENTUM`` and
      ``NESTEROV``); learning rate ``BASE_LR``, weight decay ``WEIGHT_DECAY``, and
      Detectron2's ``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS`` through
      ``get_default_optimizer_params``. Frozen parameters are left out.
    - ``BACKBONE_MULTIPLIER``: lr factor of the ResNet (``model.backbone.bottom_up``, the
      part MMDetection calls "backbone"; the FPN is the neck and keeps ``BASE_LR``). A
      backbone without ``bottom_up`` is scaled as a whole.
    - ``FUSED_ADAMW``: AdamW's fused kernel (``torch.optim.AdamW(fused=True)``), unless
      ``AMP.ENABLED``; several times faster on the CPU, the same update to float rounding.
    - ``CLIP_GRADIENTS``: with ``ENABLED`` and ``CLIP_TYPE: "full_model"`` the global norm
      of all gradients is clipped to ``CLIP_VALUE`` (``NORM_TYPE``-norm) in every ``step``;
      "value" and "norm" (per parameter) go through Detectron2's
      ``maybe_add_gradient_clipping``.

    Args:
        cfg: a config with ``add_queryinst_config`` applied.
        model: the model; must have a ``backbone`` attribute when the multiplier is not 1.

    Returns:
        torch.optim.Optimizer: AdamW or SGD, possibly a subclass that clips in ``step``.
        Its param groups carry the initial lrs that Detectron2's LR scheduler multiplies.

    Raises:
        ValueError: for an unknown ``SOLVER.OPTIMIZER`` or ``CLIP_TYPE``.
    """
    solver = cfg.SOLVER
    name = solver.OPTIMIZER.upper()
    if name not in _OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {_OPTIMIZERS}, got {solver.OPTIMIZER!r}")
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
    )
    if solver.BACKBONE_MULTIPLIER != 1.0:
        backbone = getattr(model.backbone, "bottom_up", model.backbone)
        params = split_backbone_param_groups(params, backbone, solver.BACKBONE_MULTIPLIER)

    if name == "ADAMW":
        # torch's fused kernel: one pass over all parameters instead of ~10 per parameter
        # (the same update to float rounding). Not under AMP: its GradScaler would hand a
        # fused step still-scaled gradients, which the full-model clipping must not see.
        fused = solver.FUSED_ADAMW and not solver.AMP.ENABLED
        optimizer_cls, kwargs = torch.optim.AdamW, ({"fused": True} if fused else {})
    else:
        optimizer_cls = torch.optim.SGD
        kwargs = {"momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}

    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = with_full_model_gradient_clipping(
            optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE
        )
    else:  # disabled, or Detectron2's per-parameter "value" / "norm" (ValueError otherwise)
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    return optimizer_cls(params, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY, **kwargs)
