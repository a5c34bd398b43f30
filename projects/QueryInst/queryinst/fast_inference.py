"""Inference-only speed-ups: BatchNorm folded into convolutions, reduced-precision autocast.

Neither changes the method (docs/method.md) nor what is trained or saved; both apply inside
``QueryInst.inference`` only (README, "Fast inference"; measurements in docs/benchmark.md,
"Fast CPU inference").

- :class:`ConvBNFolder` (``MODEL.QUERYINST.FUSE_BN_INFERENCE``): during an inference call,
  each convolution followed by a BatchNorm that uses fixed statistics (Detectron2's
  ``FrozenBatchNorm2d``, or ``nn.BatchNorm2d`` in eval mode) runs as one convolution with
  ``torch.nn.utils.fusion.fuse_conv_bn_weights``'s weights, and the norm is skipped. The
  folded weights live outside the module tree, are swapped in for the call and swapped back
  after it: ``state_dict()``, checkpoints and training never see them.
- :func:`resolve_inference_dtype` (``MODEL.QUERYINST.INFERENCE_DTYPE``): the autocast dtype
  of inference, with the checks and the fp32 fallback on CPUs without bf16 instructions.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass

import torch
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "INFERENCE_DTYPES",
    "ConvBNFolder",
    "bf16_supported",
    "check_inference_dtype",
    "conv_bn_pairs",
    "resolve_inference_dtype",
]

# MODEL.QUERYINST.INFERENCE_DTYPE values -> torch dtype.
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEY = "MODEL.QUERYINST.INFERENCE_DTYPE"


def check_inference_dtype(name: str, device_type: str | None = None) -> torch.dtype:
    """The torch dtype of an ``INFERENCE_DTYPE`` value, refusing what cannot run.

    Args:
        name: "float32", "bfloat16" or "float16".
        device_type: "cpu", "cuda", ...; None checks the name only.

    Returns:
        torch.dtype: ``INFERENCE_DTYPES[name]``.

    Raises:
        ValueError: for another name (the message lists the valid ones), or "float16" on the
            CPU (no fast fp16 kernels there; the message names the key and the alternatives).
    """
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"{_KEY} {name!r} is not supported: use one of {list(INFERENCE_DTYPES)}")
    if name == "float16" and device_type == "cpu":
        raise ValueError(
            f"{_KEY} float16 needs CUDA (MODEL.DEVICE cuda): the CPU has no fast fp16 "
            f"kernels. On the CPU use bfloat16 (CPUs with AVX512-BF16 or AMX) or float32"
        )
    return INFERENCE_DTYPES[name]


def bf16_supported(device_type: str) -> bool:
    """Whether bf16 autocast is fast on this machine's ``device_type``.

    CPU: oneDNN's check for native bf16 instructions (AVX512-BF16 / AMX, or AVX512 cores
    oneDNN accepts), ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``; without them bf16
    convolutions are emulated and much slower than fp32. CUDA: ``torch.cuda.is_bf16_supported()``.
    """
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def resolve_inference_dtype(name: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype for inference on ``device_type``; None means plain fp32.

    Args:
        name: the ``INFERENCE_DTYPE`` value.
        device_type: the device the model runs on ("cpu", "cuda").

    Returns:
        ``torch.bfloat16`` / ``torch.float16``, or None for "float32", and for "bfloat16"
        where :func:`bf16_supported` is False (then with a ``RuntimeWarning``: fp32 is used).

    Raises:
        ValueError: see :func:`check_inference_dtype`.
    """
    dtype = check_inference_dtype(name, device_type)
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and not bf16_supported(device_type):
        warnings.warn(
            f"{_KEY} bfloat16: this {device_type.upper()} has no native bf16 support (on "
            f"CPUs: AVX512-BF16 or AMX), where bf16 runs much slower than fp32; running "
            f"inference in float32 instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return dtype


def _foldable_norm(module: nn.Module | None) -> bool:
    """A norm whose output is a fixed per-channel affine map of its input."""
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return (isinstance(module, nn.BatchNorm2d) and not module.training
            and module.running_mean is not None and module.running_var is not None)


def conv_bn_pairs(root: nn.Module) -> list[tuple[nn.Conv2d, nn.Module, nn.Module, str]]:
    """The (convolution, norm) pairs of ``root`` that can be folded.

    Two forms are found: Detectron2's ``Conv2d`` with a ``.norm`` (ResNet, FPN with a norm),
    and an ``nn.Conv2d`` directly followed by the norm in an ``nn.Sequential`` (torchvision's
    MobileNetV2 blocks, the dynamic mask head's convs). The norm must use fixed statistics:
    ``FrozenBatchNorm2d``, or ``nn.BatchNorm2d`` (and subclasses) in eval mode.

    Returns:
        list of (conv, norm, owner, attribute): setting ``owner.<attribute>`` to None
        (Detectron2's Conv2d: attribute "norm") or to an ``nn.Identity`` (Sequential: the
        norm's index) removes the norm from the forward pass.
    """
    pairs = []
    for module in root.modules():
        if isinstance(module, D2Conv2d) and _foldable_norm(module.norm):
            pairs.append((module, module.norm, module, "norm"))
        elif isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (_, conv), (name, norm) in zip(children, children[1:]):
                plain = (isinstance(conv, nn.Conv2d) and getattr(conv, "norm", None) is None
                         and getattr(conv, "activation", None) is None)
                if plain and _foldable_norm(norm):
                    pairs.append((conv, norm, module, name))
    return pairs


@dataclass
class _Folded:
    """The folded weights of one pair, and what they were computed from."""

    sources: tuple  # the tensors read (conv weight and bias, norm weight, bias and statistics)
    versions: tuple  # their in-place modification counters at that time
    eps: float
    dtype: torch.dtype
    weight: nn.Parameter
    bias: nn.Parameter

    def still_valid(self, sources: tuple, eps: float, dtype: torch.dtype) -> bool:
        return (self.eps == eps and self.dtype == dtype and len(sources) == len(self.sources)
                and all(a is b for a, b in zip(sources, self.sources))
                and self.versions == _versions(sources))


def _versions(tensors) -> tuple:
    # Tensor._version counts in-place changes (load_state_dict's copy_, optimiser steps).
    return tuple(None if t is None else t._version for t in tensors)


class ConvBNFolder:
    """Folds the BatchNorms of a module tree into their convolutions while a block runs.

    ``with folder.folded(dtype):`` finds the pairs (:func:`conv_bn_pairs`), sets each conv's
    ``weight`` and ``bias`` to the folded ones (``fuse_conv_bn_weights``: W * g / sqrt(v + eps)
    and (b - m) * g / sqrt(v + eps) + beta, per output channel), removes the norm from the
    forward pass and, on leaving, puts the original parameters and norms back, so
    ``state_dict()``, ``parameters()`` and training are untouched. The result equals the
    unfolded model up to float rounding.

    The folded weights are kept between calls and recomputed when a source tensor is
    replaced or changed in place (its version counter, which ``load_state_dict``, optimiser
    steps and ``copy_`` advance), or after :meth:`clear`. Changes made through ``.data``
    bypass the version counter: call :meth:`clear` after them (``QueryInst.train()`` and
    ``.eval()`` do). They keep the conv weight's memory format (channels-last backbones) and
    are stored in the autocast dtype, so autocast does not cast them again each call.

    Concurrent inference calls from several threads share one folding: the first to enter
    swaps the folded weights in, the last to leave swaps them out.

    Args:
        root: the module whose pairs are folded (the whole QueryInst model).
    """

    def __init__(self, root: nn.Module):
        # A plain attribute of a non-Module object: not a submodule of root (no recursion
        # into it from root.modules(), state_dict() or .to()).
        self._root = root
        self._cache: dict[int, _Folded] = {}
        self._lock = threading.Lock()
        self._active = 0
        self._restore: list = []

    def __getstate__(self):  # copy.deepcopy / pickle of the model: no lock, no cache
        return {"_root": self._root}

    def __setstate__(self, state):
        self.__init__(state["_root"])

    def clear(self) -> None:
        """Forget the folded weights (recomputed at the next call)."""
        self._cache = {}

    @torch.no_grad()
    def _fold(self, conv: nn.Conv2d, norm: nn.Module, dtype: torch.dtype | None) -> _Folded:
        dtype = dtype or conv.weight.dtype
        sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                   norm.running_var)
        hit = self._cache.get(id(conv))
        if hit is not None and hit.still_valid(sources, norm.eps, dtype):
            return hit
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
            norm.weight, norm.bias,
        )
        # Exactly the conv weight's strides: for a 1x1 kernel NCHW and channels-last strides
        # are both dense, and the product above may come out with the other one, which makes
        # oneDNN convert every input map to that layout (measured: +0.24 s per 800x1333 image).
        weight = torch.empty_like(conv.weight, dtype=dtype).copy_(weight)
        weight = nn.Parameter(weight, requires_grad=False)
        bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        folded = _Folded(sources, _versions(sources), norm.eps, dtype, weight, bias)
        self._cache[id(conv)] = folded
        return folded

    def _swap_in(self, dtype: torch.dtype | None) -> None:
        pairs = conv_bn_pairs(self._root)
        cache = {}
        restore = []
        try:
            for conv, norm, owner, attr in pairs:
                folded = self._fold(conv, norm, dtype)
                cache[id(conv)] = folded
                restore.append((conv, conv.weight, conv.bias, owner, attr, norm))
                conv.weight, conv.bias = folded.weight, folded.bias
                setattr(owner, attr, None if attr == "norm" else nn.Identity())
        except BaseException:
            self._restore = restore
            self._swap_out()
            raise
        self._cache = cache  # pairs gone from the tree are forgotten
        self._restore = restore

    def _swap_out(self) -> None:
        for conv, weight, bias, owner, attr, norm in reversed(self._restore):
            conv.weight, conv.bias = weight, bias
            setattr(owner, attr, norm)
        self._restore = []

    @contextlib.contextmanager
    def folded(self, dtype: torch.dtype | None = None):
        """Run the block with the pairs folded; ``dtype``: the folded weights' dtype (the
        autocast dtype), None for each conv weight's own."""
        with self._lock:
            if self._active == 0:
                self._swap_in(dtype)
            self._active += 1
        try:
            yield self
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._swap_out()
