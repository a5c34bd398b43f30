"""Inference-only speed-ups: BatchNorm folded into convolutions, channels-last convolution
weights, reduced-precision autocast.

None changes the method (docs/method.md) or what is trained or saved; all apply inside
``QueryInst.inference`` only (docs/deployment.md; measurements in docs/benchmark.md,
"Fast CPU inference").

- :class:`InferenceWeights` (``MODEL.QUERYINST.FUSE_BN_INFERENCE`` and
  ``MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT``): during an inference call, each convolution
  followed by a BatchNorm that uses fixed statistics (Detectron2's ``FrozenBatchNorm2d``, or
  ``nn.BatchNorm2d`` in eval mode) runs as one convolution with
  ``torch.nn.utils.fusion.fuse_conv_bn_weights``'s weights, the norm skipped; and every
  convolution's weight can be given another memory format (channels-last on the CPU); with
  ``INFERENCE_DTYPE`` bfloat16 / float16, the ``nn.Linear`` weights are cast once. The
  swapped weights live outside the module tree, are swapped in for the call and back after
  it: ``state_dict()``, checkpoints and training never see them.
- :func:`resolve_inference_dtype` (``MODEL.QUERYINST.INFERENCE_DTYPE``): the autocast dtype
  of inference, with the checks and the fp32 fallback on CPUs without bf16 instructions;
  :func:`resolve_train_dtype` (``MODEL.QUERYINST.TRAIN_DTYPE``) does the same for the
  training forward pass (``QueryInst.training_autocast``), the one piece here that training uses.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "INFERENCE_DTYPES",
    "INFERENCE_MEMORY_FORMATS",
    "InferenceWeights",
    "bf16_supported",
    "check_inference_dtype",
    "check_train_dtype",
    "conv_bn_pairs",
    "resolve_inference_dtype",
    "resolve_memory_format",
    "resolve_train_dtype",
]

# MODEL.QUERYINST.INFERENCE_DTYPE values -> torch dtype.
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEY = "MODEL.QUERYINST.INFERENCE_DTYPE"
TRAIN_DTYPE_KEY = "MODEL.QUERYINST.TRAIN_DTYPE"
TRAIN_DTYPES = ("float32", "bfloat16", "auto")  # its values


def check_inference_dtype(
    name: str, device_type: str | None = None, key: str = _KEY
) -> torch.dtype:
    """The torch dtype of an ``INFERENCE_DTYPE`` value, refusing what cannot run.

    Args:
        name: "float32", "bfloat16" or "float16".
        device_type: "cpu", "cuda", ...; None checks the name only.
        key: the config key named in errors and warnings (``INFERENCE_DTYPE``, or
            ``TRAIN_DTYPE`` for :func:`resolve_train_dtype`).

    Returns:
        torch.dtype: ``INFERENCE_DTYPES[name]``.

    Raises:
        ValueError: for another name (the message lists the valid ones), or "float16" on the
            CPU (no fast fp16 kernels there; the message names the key and the alternatives).
    """
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"{key} {name!r} is not supported: use one of {list(INFERENCE_DTYPES)}")
    if name == "float16" and device_type == "cpu":
        raise ValueError(
            f"{key} float16 needs CUDA (MODEL.DEVICE cuda): the CPU has no fast fp16 "
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


def resolve_inference_dtype(
    name: str, device_type: str, key: str = _KEY
) -> torch.dtype | None:
    """The autocast dtype for inference on ``device_type``; None means plain fp32.

    Args:
        name: the ``INFERENCE_DTYPE`` value.
        device_type: the device the model runs on ("cpu", "cuda").
        key: the config key named in the errors and the warning.

    Returns:
        ``torch.bfloat16`` / ``torch.float16``, or None for "float32", and for "bfloat16"
        where :func:`bf16_supported` is False (then with a ``RuntimeWarning``: fp32 is used).

    Raises:
        ValueError: see :func:`check_inference_dtype`.
    """
    dtype = check_inference_dtype(name, device_type, key)
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and not bf16_supported(device_type):
        what = "training" if key == TRAIN_DTYPE_KEY else "inference"
        warnings.warn(
            f"{key} bfloat16: this {device_type.upper()} has no native bf16 support (on "
            f"CPUs: AVX512-BF16 or AMX), where bf16 runs much slower than fp32; running "
            f"{what} in float32 instead",
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


# MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT values.
INFERENCE_MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_memory_format(name: str, device_type: str) -> torch.memory_format | None:
    """The memory format of the convolution weights during inference on ``device_type``.

    Args:
        name: the ``INFERENCE_MEMORY_FORMAT`` value: "channels_last", "contiguous", or "auto"
            (channels-last on the CPU, where oneDNN runs the convolutions faster that way,
            docs/benchmark.md; elsewhere None).
        device_type: "cpu", "cuda", ...

    Returns:
        ``torch.channels_last``, ``torch.contiguous_format``, or None: each weight's own.

    Raises:
        ValueError: for another name (the message names the key and the valid values).
    """
    if name not in INFERENCE_MEMORY_FORMATS:
        raise ValueError(f"MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT {name!r} is not supported: "
                         f"use one of {list(INFERENCE_MEMORY_FORMATS)}")
    if name == "auto":
        return torch.channels_last if device_type == "cpu" else None
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


@dataclass
class _Swapped:
    """The weights one conv or linear layer runs with during inference, and their sources."""

    sources: tuple  # the tensors read (weight and bias, and the norm's when folded)
    versions: tuple  # their in-place modification counters at that time
    key: tuple  # (eps or None, dtype, memory format)
    weight: nn.Parameter
    bias: nn.Parameter | None

    def still_valid(self, sources: tuple, key: tuple) -> bool:
        return (self.key == key and len(sources) == len(self.sources)
                and all(a is b for a, b in zip(sources, self.sources))
                and self.versions == _versions(sources))


def _versions(tensors) -> tuple:
    # Tensor._version counts in-place changes (load_state_dict's copy_, optimiser steps).
    return tuple(None if t is None else t._version for t in tensors)


def _relaid(like: torch.Tensor, value: torch.Tensor, dtype: torch.dtype,
            memory_format: torch.memory_format | None) -> nn.Parameter:
    """``value`` (shaped as ``like``) copied with ``dtype`` and the strides of
    ``memory_format``, or with ``like``'s own strides when it is None.

    ``empty_like`` gives exact strides. ``Tensor.contiguous`` would not: a 1x1 kernel is
    dense in both formats, and keeping the other one's strides makes oneDNN convert every
    input map to that layout (measured: +0.24 s per 800x1333 image).
    """
    out = torch.empty_like(like, dtype=dtype, memory_format=memory_format or torch.preserve_format)
    return nn.Parameter(out.copy_(value), requires_grad=False)


class InferenceWeights:
    """The weights of a module tree swapped, while a block runs, for faster ones.

    ``with weights.applied(dtype, fold, memory_format):`` sets each convolution's ``weight``
    and ``bias`` to:

    - with ``fold``, for a conv followed by a BatchNorm with fixed statistics
      (:func:`conv_bn_pairs`): the folded ones (``fuse_conv_bn_weights``:
      W * g / sqrt(v + eps) and (b - m) * g / sqrt(v + eps) + beta, per output channel), in
      ``dtype`` (the autocast dtype, so autocast does not cast them again each call), and
      removes the norm from the forward pass;
    - with ``memory_format``, for every ``nn.Conv2d`` / ``nn.ConvTranspose2d`` (folded or not):
      the weight in that memory format. oneDNN then runs the convolution, and returns its
      output, in that layout (channels-last: the backbone and the mask head's convs).

    and, with a ``dtype``, each plain ``nn.Linear``'s to copies in ``dtype``: autocast would
    cast them to that dtype anyway, on every call (~50 ms per 800x1333 image in bf16 for
    the heads' 32768x256 dynamic layers and the rest). ``nn.MultiheadAttention``'s
    projections are left to autocast (their module reads them directly; they are small).

    On leaving, the original parameters and norms are put back, so ``state_dict()``,
    ``parameters()`` and training are untouched. Outputs equal the original model's up to
    float rounding.

    The swapped weights are kept between calls and recomputed when a source tensor is
    replaced or changed in place (its version counter, which ``load_state_dict``, optimiser
    steps and ``copy_`` advance), or after :meth:`clear`. Changes made through ``.data``
    bypass the version counter: call :meth:`clear` after them (``QueryInst.train()`` and
    ``.eval()`` do).

    Concurrent inference calls from several threads share one swap: the first to enter
    swaps the weights in, the last to leave swaps them out (all with the same settings).

    Args:
        root: the module whose weights are swapped (the whole QueryInst model).
    """

    def __init__(self, root: nn.Module):
        # A plain attribute of a non-Module object: not a submodule of root (no recursion
        # into it from root.modules(), state_dict() or .to()).
        self._root = root
        self._cache: dict[int, _Swapped] = {}
        self._lock = threading.Lock()
        self._active = 0
        self._restore: list = []

    def __getstate__(self):  # copy.deepcopy / pickle of the model: no lock, no cache
        return {"_root": self._root}

    def __setstate__(self, state):
        self.__init__(state["_root"])

    def clear(self) -> None:
        """Forget the swapped weights (recomputed at the next call)."""
        self._cache = {}

    @torch.no_grad()
    def _weights(self, module: nn.Module, norm: nn.Module | None, dtype: torch.dtype | None,
                 memory_format: torch.memory_format | None) -> _Swapped:
        sources = (module.weight, module.bias)
        if norm is not None:
            sources += (norm.weight, norm.bias, norm.running_mean, norm.running_var)
        if dtype is None or (norm is None and not isinstance(module, nn.Linear)):
            dtype = module.weight.dtype
        key = (None if norm is None else norm.eps, dtype, memory_format)
        hit = self._cache.get(id(module))
        if hit is not None and hit.still_valid(sources, key):
            return hit
        if isinstance(module, nn.Linear):
            weight = nn.Parameter(module.weight.to(dtype), requires_grad=False)
            bias = None if module.bias is None else nn.Parameter(module.bias.to(dtype),
                                                                 requires_grad=False)
        elif norm is None:
            weight, bias = _relaid(module.weight, module.weight, dtype, memory_format), module.bias
        else:
            weight, bias = fuse_conv_bn_weights(
                module.weight, module.bias, norm.running_mean, norm.running_var, norm.eps,
                norm.weight, norm.bias,
            )
            weight = _relaid(module.weight, weight, dtype, memory_format)
            bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        swapped = _Swapped(sources, _versions(sources), key, weight, bias)
        self._cache[id(module)] = swapped
        return swapped

    def _swap_in(self, dtype, fold: bool, memory_format) -> None:
        norms = {}  # id(conv) -> (norm, owner, attribute)
        if fold:
            norms = {id(conv): rest for conv, *rest in conv_bn_pairs(self._root)}
        swapped_modules = [m for m in self._root.modules()
                 if (isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and
                     (id(m) in norms or memory_format is not None))
                 or (type(m) is nn.Linear and dtype is not None)]  # noqa: E721 (not MHA's)
        cache, restore = {}, []
        try:
            for module in swapped_modules:
                norm, owner, attr = norms.get(id(module), (None, None, None))
                fmt = None if isinstance(module, nn.Linear) else memory_format
                swapped = self._weights(module, norm, dtype, fmt)
                cache[id(module)] = swapped
                restore.append((module, module.weight, module.bias, owner, attr, norm))
                module.weight, module.bias = swapped.weight, swapped.bias
                if norm is not None:
                    setattr(owner, attr, None if attr == "norm" else nn.Identity())
        except BaseException:
            self._restore = restore
            self._swap_out()
            raise
        self._cache = cache  # modules gone from the tree are forgotten
        self._restore = restore

    def _swap_out(self) -> None:
        for module, weight, bias, owner, attr, norm in reversed(self._restore):
            module.weight, module.bias = weight, bias
            if norm is not None:
                setattr(owner, attr, norm)
        self._restore = []

    @contextlib.contextmanager
    def applied(self, dtype: torch.dtype | None = None, fold: bool = True,
                memory_format: torch.memory_format | None = None):
        """Run the block with the swapped weights.

        Args:
            dtype: the dtype of the folded conv weights and of the ``nn.Linear`` weights
                (the autocast dtype), None for each weight's own. Convolutions without a
                folded norm keep their dtype (autocast casts them).
            fold: fold the conv + fixed-statistics BatchNorm pairs.
            memory_format: the memory format of every conv weight, None for each one's own.
        """
        with self._lock:
            if self._active == 0:
                self._swap_in(dtype, fold, memory_format)
            self._active += 1
        try:
            yield self
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._swap_out()


def check_train_dtype(name: str) -> None:
    """Refuse a ``MODEL.QUERYINST.TRAIN_DTYPE`` value other than "float32", "bfloat16", "auto".

    Raises:
        ValueError: naming the key and the valid values; for "float16" also why (fp16
            training needs loss scaling, which is Detectron2's ``SOLVER.AMP.ENABLED`` on CUDA).
    """
    if name not in TRAIN_DTYPES:
        why = (" (fp16 training needs loss scaling: Detectron2's SOLVER.AMP.ENABLED True, on "
               "CUDA)" if name == "float16" else "")
        raise ValueError(
            f"{TRAIN_DTYPE_KEY} {name!r} is not supported{why}: use one of {list(TRAIN_DTYPES)}")


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The value of the first ``name`` line of ``cpuinfo`` (Linux's /proc/cpuinfo), e.g.
    "AuthenticAMD" for "vendor_id" or the space-separated flags for "flags"; None where the
    file cannot be read (not Linux) or has no such line."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_vendor() -> str:
    """The CPU's ``vendor_id`` ("AuthenticAMD", "GenuineIntel"), or "" where unknown."""
    return cpuinfo_field("vendor_id") or ""


def _cpu_feature(name: str) -> bool:
    """``torch.cpu._is_<name>_supported()`` (PyTorch's cpuinfo), False where PyTorch lacks it."""
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(probe()) if probe is not None else False


def bf16_training_faster(device_type: str) -> bool:
    """Whether ``TRAIN_DTYPE`` "auto" trains in bf16 on this machine's ``device_type``.

    CPU: only where bf16 was measured (or documented) faster than float32, for a whole
    training step (docs/training.md, "bf16 training"):

    - AMD CPUs with AVX512-BF16 (Zen 4): 1.27-1.42x faster on ``make demo``'s config;
    - CPUs with AMX tiles (Intel Xeon 4th generation and later): 1,024 bf16 against 64 fp32
      operations a cycle (PyTorch's AMX recipe); not measured in this project;
    - but not Intel CPUs with AVX512-BF16 and no AMX: the same step was 1.18-1.28x *slower*
      in bf16 on the Intel Xeon VM, so these train in float32.

    CUDA: ``torch.cuda.is_bf16_supported()``. Other devices: False.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu" or not bf16_supported("cpu"):
        return False
    if _cpu_feature("amx_tile"):
        return True
    return _cpu_vendor() == "AuthenticAMD" and _cpu_feature("avx512_bf16")


@functools.lru_cache(maxsize=None)
def _log_auto_choice(device_type: str, dtype_name: str) -> None:
    # Detectron2's logger: the one train_net.py and tools/run_demo.py print and write to log.txt.
    logging.getLogger("detectron2").info(
        "%s auto: training in %s on this %s (docs/training.md, \"bf16 training\")",
        TRAIN_DTYPE_KEY, dtype_name, device_type.upper())


def resolve_train_dtype(name: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of the training forward pass (``MODEL.QUERYINST.TRAIN_DTYPE``).

    Mixed precision as ``torch.autocast`` defines it: parameters, gradients and optimizer
    state stay float32; matrix products and convolutions run in bf16. Box decoding, the
    matching costs and the returned losses are float32 (docs/training.md, "bf16 training").

    Args:
        name: "float32", "bfloat16", or "auto" (bf16 where :func:`bf16_training_faster`,
            else float32; the choice is logged once).
        device_type: the device the model trains on ("cpu", "cuda").

    Returns:
        ``torch.bfloat16``, or None (plain fp32) for "float32", for "auto" where bf16 is not
        faster, and for "bfloat16" where :func:`bf16_supported` is False (then with a
        ``RuntimeWarning``).

    Raises:
        ValueError: see :func:`check_train_dtype`.
    """
    check_train_dtype(name)
    if name == "auto":
        name = "bfloat16" if bf16_training_faster(device_type) else "float32"
        _log_auto_choice(device_type, name)
    return resolve_inference_dtype(name, device_type, TRAIN_DTYPE_KEY)
