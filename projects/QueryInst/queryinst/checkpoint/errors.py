"""Errors of loading weights (``MODEL.WEIGHTS``): one base class and its two kinds.

Programs catch :class:`CheckpointError` to print the message without a traceback. In a module
of their own so that :mod:`queryinst.checkpoint.official_layout` (which raises them on state
dicts) and :mod:`queryinst.checkpoint.checkpointer` (files, checkpointer; it re-exports them)
need not import each other.
"""

__all__ = ["CheckpointError", "CheckpointFormatError", "WeightsUnavailableError"]

# What a checkpoint of this model may look like; the end of most CheckpointFormatError messages.
_EXPECTED = (
    "expected either a Detectron2 checkpoint of this model ({'model': state_dict} with keys "
    "such as 'roi_heads.box_heads.0.cls_score.weight') or an official QueryInst checkpoint "
    "(hustvl/QueryInst or MMDetection: {'state_dict': {...}, 'meta': {...}} with keys such as "
    "'roi_head.bbox_head.0.fc_cls.weight'), or a torchvision MobileNetV2 state dict "
    "('features.0.0.weight', ...) for the MobileNetV2 backbone"
)



def _some(keys: list, limit: int = 5) -> str:
    """``count (e.g. first few)`` for one-line messages about checkpoint keys."""
    more = ", ..." if len(keys) > limit else ""
    return f"{len(keys)} (e.g. {', '.join(map(str, keys[:limit]))}{more})"

class CheckpointError(Exception):
    """The weights named (``MODEL.WEIGHTS``) cannot be used; the message says why and what to pass.

    Programs catch this one class to print the message without a traceback.
    """


class CheckpointFormatError(CheckpointError, ValueError):
    """A file is not a readable checkpoint, or does not have the layout or the tensors that
    were expected; the message names the file and the keys."""


class WeightsUnavailableError(CheckpointError):
    """No weights file to read: it does not exist, its download failed, or none was named
    (empty ``MODEL.WEIGHTS``) where a trained model is needed."""
