"""Memory format of the backbone's convolutions in training (``MODEL.QUERYINST.CHANNELS_LAST``
and ``MODEL.QUERYINST.FPN_OUTPUT_MEMORY_FORMAT``; docs/training.md, "Channels-last training").

Channels-last makes oneDNN's CPU convolutions faster in the forward pass, and in the backward
pass of most of MobileNetV2's and ResNet's layers. The exception is a dense 3x3 convolution
over a large map on a CPU without AVX-512: there oneDNN has no fast channels-last kernel for
the weight gradient and falls back to a generic one, 3-4x slower than its blocked
(contiguous) kernel. In a QueryInst FPN the largest such layer is the stride-4 output conv
(P2), which every RoI of the small-object configs reads. So on those CPUs the FPN's output
convolutions keep contiguous weights and take a contiguous input, the rest of the backbone
stays channels-last. Outputs equal up to float rounding; parameters and checkpoints do not
change (a weight's memory format is not saved).
"""
from __future__ import annotations

import torch
from torch import nn

from .fast_inference import _cpu_feature

__all__ = [
    "FPN_OUTPUT_MEMORY_FORMATS",
    "apply_channels_last",
    "fpn_output_convs",
    "resolve_fpn_output_memory_format",
]

FPN_OUTPUT_MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # the key's values
_KEY = "MODEL.QUERYINST.FPN_OUTPUT_MEMORY_FORMAT"


def resolve_fpn_output_memory_format(name: str, device_type: str) -> str:
    """The memory format of the FPN's output convolutions when the backbone is channels-last.

    Args:
        name: the ``FPN_OUTPUT_MEMORY_FORMAT`` value: "channels_last", "contiguous" or
            "auto": "contiguous" on a CPU without AVX-512 (see the module), else
            "channels_last" (CPUs with AVX-512, where oneDNN has its faster "brgemm"
            kernels, and CUDA: the layouts their training speed was measured with, kept
            unchanged).
        device_type: ``MODEL.DEVICE``'s type, "cpu" or "cuda".

    Returns:
        "channels_last" or "contiguous".

    Raises:
        ValueError: for another name (the message names the key and the valid values).
    """
    if name not in FPN_OUTPUT_MEMORY_FORMATS:
        raise ValueError(f"{_KEY} {name!r} is not supported: use one of "
                         f"{list(FPN_OUTPUT_MEMORY_FORMATS)}")
    if name != "auto":
        return name
    slow_weight_grad = device_type == "cpu" and not _cpu_feature("avx512")
    return "contiguous" if slow_weight_grad else "channels_last"


def fpn_output_convs(backbone: nn.Module) -> list[nn.Conv2d]:
    """The output (3x3) convolutions of a Detectron2 ``FPN`` backbone, [] for another one."""
    return [m for m in getattr(backbone, "output_convs", []) if isinstance(m, nn.Conv2d)]


def _input_in_weight_format(conv: nn.Conv2d, args: tuple):
    """Forward pre-hook: a channels-last input becomes contiguous while the weight is
    contiguous, so oneDNN runs the convolution (and its backward) in the contiguous layout.
    While inference gives the weight channels-last (``INFERENCE_MEMORY_FORMAT``), nothing."""
    x = args[0]
    if conv.weight.is_contiguous() and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def apply_channels_last(backbone: nn.Module, fpn_output_memory_format: str) -> None:
    """Store the backbone's weights channels-last, the FPN's output convs as asked.

    Args:
        backbone: the model's backbone (modified in place; ``Module.to`` keeps the layout
            through later ``.to(device)`` and ``load_state_dict``).
        fpn_output_memory_format: "channels_last" or "contiguous" (resolved by
            :func:`resolve_fpn_output_memory_format`).
    """
    backbone.to(memory_format=torch.channels_last)
    if fpn_output_memory_format == "contiguous":
        for conv in fpn_output_convs(backbone):
            conv.to(memory_format=torch.contiguous_format)
            conv.register_forward_pre_hook(_input_in_weight_format)
