"""The official QueryInst checkpoint layout (hustvl/QueryInst, MMDetection) and its conversion.

docs/method.md §4 gives the official layout: files ``{"state_dict": ..., "meta": ...}`` with
mmdet's module names (torchvision ResNet under ``backbone.``, ``neck.``, ``rpn_head.``,
``roi_head.bbox_head.{s}.``, ``roi_head.mask_head.{s}.``); every such file (QueryInst and
Sparse R-CNN) has keys starting with ``roi_head.bbox_head.0.``. This module holds the rules
that rename every tensor to this project's names and works on state dicts in memory; reading
files and the checkpointer are in :mod:`queryinst.checkpoint`, which re-exports the names here.

Public names:

- :func:`is_official_state_dict`: whether a state dict has the official layout.
- :func:`detect_official_config`: the config values (queries, classes, stages, depth) that
  the tensors imply; :func:`format_config_summary` and :func:`config_as_opts` give them as
  log lines and as ``cfg.merge_from_list`` overrides.
- :func:`convert_official_state_dict`: official ``state_dict`` -> this model's state dict.
- :func:`check_against_model`: refuse a converted state dict that does not fill exactly a
  model's tensors; :func:`fill_num_batches_tracked`: add the BN counters a file lacks.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .errors import _EXPECTED, CheckpointFormatError

__all__ = [
    "check_against_model",
    "compare_state_dicts",
    "config_as_opts",
    "convert_official_state_dict",
    "detect_official_config",
    "fill_num_batches_tracked",
    "format_config_summary",
    "is_official_state_dict",
    "may_be_absent",
]

# Every official QueryInst (and Sparse R-CNN) checkpoint has this key prefix (docs/method.md §4).
_OFFICIAL_MARKER = "roi_head.bbox_head.0."

# ResNet blocks per stage (res2..res5) -> Detectron2 MODEL.RESNETS.DEPTH.
_RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def _format_keys(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {shown}{more}"


# --------------------------------------------------------------------------- renaming rules
def _sub(pattern: str, repl: str) -> tuple[re.Pattern, str]:
    return re.compile(pattern), repl


# (official regex, our name template), applied to whole keys; the first full match wins.
# "<+k \1>" is group 1 plus k: mmdet counts ResNet stages from layer1 (Detectron2's res2) and
# FPN levels from 0 (p2).
_BB = "backbone.bottom_up"
_LAYER = r"backbone\.layer(\d)\.(\d+)\."  # -> res<+1 \1>.\2.
_BOX, _MASK = r"roi_head\.bbox_head\.(\d+)\.", r"roi_head\.mask_head\.(\d+)\."
_OUR_BOX, _OUR_MASK = r"roi_heads.box_heads.\1.", r"roi_heads.mask_heads.\1."
_RULES: list[tuple[re.Pattern, str]] = [
    # Backbone: torchvision ResNet -> Detectron2 ResNet (norm = FrozenBN with running stats).
    _sub(r"backbone\.conv1\.weight", _BB + r".stem.conv1.weight"),
    _sub(r"backbone\.bn1\.(\w+)", _BB + r".stem.conv1.norm.\1"),
    _sub(_LAYER + r"conv(\d)\.weight", _BB + r".res<+1 \1>.\2.conv\3.weight"),
    _sub(_LAYER + r"bn(\d)\.(\w+)", _BB + r".res<+1 \1>.\2.conv\3.norm.\4"),
    _sub(_LAYER + r"downsample\.0\.weight", _BB + r".res<+1 \1>.\2.shortcut.weight"),
    _sub(_LAYER + r"downsample\.1\.(\w+)", _BB + r".res<+1 \1>.\2.shortcut.norm.\3"),
    # Neck: mmdet FPN, k = 0..3 for C2..C5 -> Detectron2 FPN p2..p5.
    _sub(r"neck\.lateral_convs\.(\d)\.conv\.(\w+)", r"backbone.fpn_lateral<+2 \1>.\2"),
    _sub(r"neck\.fpn_convs\.(\d)\.conv\.(\w+)", r"backbone.fpn_output<+2 \1>.\2"),
    # Learnable proposals.
    _sub(r"rpn_head\.init_proposal_bboxes\.weight",
         "proposal_generator.init_proposal_boxes.weight"),
    _sub(r"rpn_head\.init_proposal_features\.weight",
         "proposal_generator.init_proposal_features.weight"),
    # Box stages (DIIHead). mmcv's MultiheadAttention wraps nn.MultiheadAttention as ".attn":
    # in_proj_weight (3D, D) holds the q, k, v rows in that order, as in ours.
    _sub(_BOX + r"attention\.attn\.(in_proj_\w+|out_proj\.\w+)", _OUR_BOX + r"self_attn.\2"),
    _sub(_BOX + r"attention_norm\.(\w+)", _OUR_BOX + r"self_attn_norm.\2"),
    _sub(_BOX + r"instance_interactive_conv\.(\w+\.\w+)", _OUR_BOX + r"instance_interaction.\2"),
    _sub(_BOX + r"instance_interactive_conv_norm\.(\w+)",
         _OUR_BOX + r"instance_interaction_norm.\2"),
    # mmcv FFN: layers.0 = Sequential(Linear, ReLU, Dropout), layers.1 = Linear; ours is one
    # Sequential(Linear, ReLU, Dropout, Linear, Dropout).
    _sub(_BOX + r"ffn\.layers\.0\.0\.(\w+)", _OUR_BOX + r"ffn.0.\2"),
    _sub(_BOX + r"ffn\.layers\.1\.(\w+)", _OUR_BOX + r"ffn.3.\2"),
    _sub(_BOX + r"ffn_norm\.(\w+)", _OUR_BOX + r"ffn_norm.\2"),
    # [Linear, LN, ReLU] blocks: the same Sequential indices on both sides.
    _sub(_BOX + r"(cls_fcs|reg_fcs)\.(\d+)\.(\w+)", _OUR_BOX + r"\2.\3.\4"),
    _sub(_BOX + r"fc_cls\.(\w+)", _OUR_BOX + r"cls_score.\2"),
    _sub(_BOX + r"fc_reg\.(\w+)", _OUR_BOX + r"bbox_pred.\2"),
    # Mask stages (DynamicMaskHead). convs.{i}.conv.bias is folded separately (see below).
    _sub(_MASK + r"instance_interactive_conv\.(\w+\.\w+)", _OUR_MASK + r"instance_interaction.\2"),
    _sub(_MASK + r"convs\.(\d+)\.conv\.weight", _OUR_MASK + r"mask_convs.\2.0.weight"),
    _sub(_MASK + r"convs\.(\d+)\.bn\.(\w+)", _OUR_MASK + r"mask_convs.\2.1.\3"),
    _sub(_MASK + r"upsample\.(\w+)", _OUR_MASK + r"deconv.\2"),
    _sub(_MASK + r"conv_logits\.(\w+)", _OUR_MASK + r"predictor.\2"),
]

# Official mask-conv bias (official repo after 2021-05-20, docs/method.md §4): folded into the BN.
_MASK_CONV_BIAS = re.compile(r"roi_head\.mask_head\.(\d+)\.convs\.(\d+)\.conv\.bias")


def _rename(key: str) -> str | None:
    """Our name for an official key, or None when no rule applies."""
    for pattern, template in _RULES:
        m = pattern.fullmatch(key)
        if m:
            name = m.expand(template)
            return re.sub(r"<\+(\d) (\d+)>", lambda g: str(int(g[1]) + int(g[2])), name)
    return None


# --------------------------------------------------------------------------- detection
def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has the official QueryInst key layout (docs/method.md §4)."""
    return any(isinstance(k, str) and k.startswith(_OFFICIAL_MARKER) for k in state_dict)


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return sorted(found)


def detect_official_config(state_dict: Mapping[str, Tensor]) -> "OrderedDict[str, Any]":
    """The config values implied by an official state dict's tensors.

    Args:
        state_dict: an official ``state_dict`` (docs/method.md §4 names).

    Returns:
        OrderedDict: Detectron2 config key -> value, for ``cfg.merge_from_list``:
        ``MODEL.RESNETS.DEPTH`` (50/101/152, from the block counts),
        ``MODEL.QUERYINST.NUM_PROPOSALS``, ``MODEL.QUERYINST.TEST_TOPK`` and
        ``TEST.DETECTIONS_PER_IMAGE`` (N, from the proposal embeddings; the official test
        top-k is N), ``MODEL.QUERYINST.NUM_CLASSES`` (C, from
        ``fc_cls``), ``MODEL.QUERYINST.NUM_STAGES`` and ``MODEL.MASK_ON`` (whether mask heads
        are present; without them it is a Sparse R-CNN checkpoint). Also
        ``NUM_CLS_FCS``/``NUM_REG_FCS``/``NUM_MASK_CONVS`` where they differ from the defaults.

    Raises:
        CheckpointFormatError: if the file is not in the official layout, or the shapes
            contradict each other (e.g. stages with different class counts).
    """
    if not is_official_state_dict(state_dict):
        raise CheckpointFormatError(f"not an official QueryInst state_dict: {_EXPECTED}")
    missing = [
        k for k in ("rpn_head.init_proposal_bboxes.weight", "backbone.conv1.weight")
        if k not in state_dict
    ]
    if missing:
        raise CheckpointFormatError(f"official state_dict lacks {missing}")

    blocks = tuple(
        len(_indices(state_dict, rf"backbone\.layer{i}\.(\d+)\.conv1\.weight"))
        for i in (1, 2, 3, 4)
    )
    if blocks not in _RESNET_DEPTHS or "backbone.layer1.0.conv3.weight" not in state_dict:
        raise CheckpointFormatError(
            f"backbone is not a bottleneck ResNet-50/101/152 (blocks per stage: {blocks})"
        )
    num_proposals = state_dict["rpn_head.init_proposal_bboxes.weight"].shape[0]
    stages = _indices(state_dict, r"roi_head\.bbox_head\.(\d+)\.")
    mask_stages = _indices(state_dict, r"roi_head\.mask_head\.(\d+)\.")
    if stages != list(range(len(stages))) or mask_stages not in ([], stages):
        raise CheckpointFormatError(f"box stages {stages} and mask stages {mask_stages} differ")
    try:
        classes = {state_dict[f"roi_head.bbox_head.{s}.fc_cls.weight"].shape[0] for s in stages}
        classes |= {
            state_dict[f"roi_head.mask_head.{s}.conv_logits.weight"].shape[0] for s in mask_stages
        }
    except KeyError as e:
        raise CheckpointFormatError(f"official state_dict lacks {e}") from None
    if len(classes) != 1:
        raise CheckpointFormatError(f"stages disagree on the number of classes: {sorted(classes)}")

    cfg: OrderedDict[str, Any] = OrderedDict()
    cfg["MODEL.RESNETS.DEPTH"] = _RESNET_DEPTHS[blocks]
    cfg["MODEL.QUERYINST.NUM_PROPOSALS"] = num_proposals
    cfg["MODEL.QUERYINST.TEST_TOPK"] = num_proposals
    cfg["TEST.DETECTIONS_PER_IMAGE"] = num_proposals
    cfg["MODEL.QUERYINST.NUM_CLASSES"] = classes.pop()
    cfg["MODEL.QUERYINST.NUM_STAGES"] = len(stages)
    cfg["MODEL.MASK_ON"] = bool(mask_stages)
    # Linear layers of each branch are at indices 0, 3, 6, ... of the [Linear, LN, ReLU] stack.
    num_cls = len(_indices(state_dict, r"roi_head\.bbox_head\.0\.cls_fcs\.(\d+)\.weight")) // 2
    num_reg = len(_indices(state_dict, r"roi_head\.bbox_head\.0\.reg_fcs\.(\d+)\.weight")) // 2
    if num_cls != 1:
        cfg["MODEL.QUERYINST.NUM_CLS_FCS"] = num_cls
    if num_reg != 3:
        cfg["MODEL.QUERYINST.NUM_REG_FCS"] = num_reg
    if mask_stages:
        pattern = r"roi_head\.mask_head\.0\.convs\.(\d+)\.conv\.weight"
        num_convs = len(_indices(state_dict, pattern))
        if num_convs != 4:
            cfg["MODEL.QUERYINST.NUM_MASK_CONVS"] = num_convs
    return cfg


def format_config_summary(config: Mapping[str, Any]) -> str:
    """One line per detected config value, for logs and the converter's output."""
    return "\n".join(f"  {k}: {v}" for k, v in config.items())


def config_as_opts(config: Mapping[str, Any]) -> list:
    """``detect_official_config``'s result as a flat list for ``cfg.merge_from_list``."""
    return [x for kv in config.items() for x in kv]


# --------------------------------------------------------------------------- conversion
def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Rename an official state dict to this project's module names (docs/method.md §4).

    - torchvision ResNet -> Detectron2 ResNet (``stem.conv1``, ``res{2..5}.{b}.conv{1,2,3}``
      with ``.norm`` = FrozenBN weight, bias, running_mean, running_var; ``shortcut``);
      the backbone's ``num_batches_tracked`` are dropped (FrozenBN has none);
    - FPN -> ``backbone.fpn_lateral{2..5}``, ``backbone.fpn_output{2..5}``;
    - ``rpn_head`` -> ``proposal_generator``; ``roi_head.bbox_head.{s}`` ->
      ``roi_heads.box_heads.{s}``; ``roi_head.mask_head.{s}`` -> ``roi_heads.mask_heads.{s}``
      (mask BN ``num_batches_tracked`` kept: they only matter with momentum None);
    - an official mask-conv bias ``convs.{i}.conv.bias`` (our convs have none, the BN follows)
      is folded into the BN exactly: ``running_mean <- running_mean - bias``, since
      ``BN(conv(x) + b)`` normalises ``conv(x) - (running_mean - b)`` in eval mode.

    Tensors are returned as they are (no copy of the data); the values are unchanged except
    for the folded running means.

    Args:
        state_dict: the official ``state_dict`` (key -> tensor).

    Returns:
        OrderedDict: our key -> tensor.

    Raises:
        CheckpointFormatError: if the layout is not the official one, or some official key
            matches no rule (listing them: nothing is dropped silently), or a folded bias has
            no BN to fold into.
    """
    if not is_official_state_dict(state_dict):
        raise CheckpointFormatError(f"not an official QueryInst state_dict: {_EXPECTED}")
    out: OrderedDict[str, Tensor] = OrderedDict()
    unused, biases = [], {}
    for key, value in state_dict.items():
        if key.startswith("backbone.") and key.endswith(".num_batches_tracked"):
            continue
        m = _MASK_CONV_BIAS.fullmatch(key)
        if m:
            stage, conv = m.groups()
            biases[f"roi_heads.mask_heads.{stage}.mask_convs.{conv}.1.running_mean"] = value
            continue
        name = _rename(key)
        if name is None:
            unused.append(key)
        else:
            out[name] = value
    if unused:
        raise CheckpointFormatError(
            f"{len(unused)} keys of the official checkpoint have no place in this model "
            f"(refusing a partial load):{_format_keys(unused)}"
        )
    for mean_key, bias in biases.items():
        if mean_key not in out:
            raise CheckpointFormatError(f"mask conv bias without a BN to fold into: {mean_key}")
        out[mean_key] = out[mean_key] - bias.to(out[mean_key].dtype)
    return out


def may_be_absent(key: str) -> bool:
    """Whether a model tensor may be missing from a checkpoint without harm.

    BN step counters (``num_batches_tracked``: read only with momentum None; FrozenBN has
    none) and the normalisation constants ``pixel_mean`` / ``pixel_std`` (they come from
    the config). The one rule of :func:`check_against_model` and the checkpointer's strict
    mode.
    """
    return key.endswith(".num_batches_tracked") or key in ("pixel_mean", "pixel_std")


def fill_num_batches_tracked(
    converted: "OrderedDict[str, Tensor]", model_state: Mapping[str, Tensor]
) -> None:
    """Add zero ``num_batches_tracked`` for the model's BNs that the file does not carry.

    They count training steps and matter only for BN with ``momentum=None``; inference and
    the default momentum never read them. In place.
    """
    for k in model_state:
        if k.endswith(".num_batches_tracked") and k not in converted:
            converted[k] = torch.zeros((), dtype=torch.long)


def compare_state_dicts(source: Mapping[str, Tensor], target: Mapping[str, Tensor]):
    """How well ``source`` fills ``target``, key by key.

    Returns:
        (missing, surplus, mismatched): target keys absent from source, source keys absent
        from target (both in their dict's order), and ``(key, source shape, target shape)``
        for the common keys whose shapes differ (shapes as tuples).
    """
    missing = [k for k in target if k not in source]
    surplus = [k for k in source if k not in target]
    mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in source.items()
                  if k in target and tuple(v.shape) != tuple(target[k].shape)]
    return missing, surplus, mismatched


# Modules of an official QueryInst model; a model tensor outside them (e.g. QueryInstVIS's
# "track_head.") is one the official files cannot have.
OFFICIAL_MODULES = ("backbone.", "proposal_generator.", "roi_heads.")
# Tensors whose shape follows the class count: box-stage logits and mask-head predictors.
_CLASS_TENSOR = re.compile(r"^roi_heads\.(box_heads\.\d+\.cls_score|mask_heads\.\d+\.predictor)\.")


def fine_tuning_differences(key: str) -> bool:
    """Whether a model tensor may stay unfilled when fine-tuning from an official file: the
    class-dependent tensors (another class count) and modules the official model lacks."""
    return bool(_CLASS_TENSOR.match(key)) or not key.startswith(OFFICIAL_MODULES)


def check_against_model(converted: Mapping[str, Tensor], model_state: Mapping[str, Tensor],
                        config: Mapping[str, Any] | None = None,
                        fine_tuning: bool = False) -> None:
    """Refuse a converted state dict that does not fill exactly this model's tensors.

    Args:
        converted: output of :func:`convert_official_state_dict`.
        model_state: ``model.state_dict()`` of the model to load into.
        config: the detected config (:func:`detect_official_config`), quoted in the error.
        fine_tuning: for training (not inference): the class-dependent tensors may differ
            in shape and modules the official model lacks may be missing
            (:func:`fine_tuning_differences`); they start from random initialisation (the
            checkpointer's load logs them).

    Raises:
        CheckpointFormatError: naming the model keys left unfilled, the converted keys the
            model lacks, and the shape mismatches. The mask BNs' ``num_batches_tracked`` may
            be missing from the file (not an error; they are not used at inference).
    """
    missing, unexpected, mismatched = compare_state_dicts(converted, model_state)
    missing = [k for k in missing if not may_be_absent(k)]
    if fine_tuning:
        missing = [k for k in missing if not fine_tuning_differences(k)]
        mismatched = [m for m in mismatched if not fine_tuning_differences(m[0])]
    shapes = [f"{k}: checkpoint {src}, model {dst}" for k, src, dst in mismatched]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"model tensors the checkpoint does not fill:{_format_keys(missing)}")
    if unexpected:
        parts.append(f"checkpoint tensors the model does not have:{_format_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches:{_format_keys(shapes)}")
    hint = ""
    if config is not None:
        hint = (
            "\nThe checkpoint implies this config (set it before building the model):\n"
            + format_config_summary(config)
        )
    raise CheckpointFormatError(
        "the official checkpoint does not fit this model (refusing a partial load):\n"
        + "\n".join(parts) + hint
    )
