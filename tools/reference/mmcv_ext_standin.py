"""A stand-in for ``mmcv._ext``, the compiled operators that mmcv-lite leaves out.

Runs inside the reference's venv (see ``tools/reference/setup.sh``). MMDetection's QueryInst
needs one compiled operator at inference, RoIAlign (``mmcv.ops.RoIAlign`` with
``aligned=True``, average pooling). Here it is torchvision's ``roi_align``, which implements
the same definition (Detectron2's ROIAlignV2 is the same op too). MaskTrack R-CNN (Mask
R-CNN's RPN and box head) also needs NMS (``mmcv.ops.nms``, offset 0): torchvision's ``nms``,
the same definition (keep boxes by descending score, drop those whose IoU with a kept one
exceeds the threshold). Every other operator name
resolves to a function that raises ``NotImplementedError`` naming the op, so ``import
mmcv.ops`` succeeds (it checks that the names exist) but no other op can run silently.

Use: ``install()`` before the first import of ``mmcv.ops`` or ``mmdet.models``.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

MODULE = "mmcv._ext"


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height=7,
                      aligned_width=7, spatial_scale=1.0, sampling_ratio=0, pool_mode=1,
                      aligned=True):
    """mmcv's ``roi_align_forward`` signature, computed by ``torchvision.ops.roi_align``.

    Args:
        input: (N, C, H, W) float feature maps.
        rois: (R, 5) float, (batch index, x1, y1, x2, y2) in input-image pixels.
        output: (R, C, aligned_height, aligned_width), written in place.
        argmax_y, argmax_x: used by max pooling only (unsupported here).
        spatial_scale: feature-map pixels per image pixel (1 / stride).
        sampling_ratio: sampling points per bin side (0: adaptive, as mmcv and torchvision).
        pool_mode: 1 = average (0 = max pooling is refused).
        aligned: shift the boxes by -0.5 pixel (mmcv's and torchvision's ``aligned``).

    Raises:
        NotImplementedError: for max pooling.
    """
    import torch
    from torchvision.ops import roi_align

    if pool_mode != 1:
        raise NotImplementedError("mmcv._ext stand-in: only average RoIAlign (pool_mode=1)")
    with torch.no_grad():
        output.copy_(roi_align(input, rois.to(input.dtype), (aligned_height, aligned_width),
                               spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                               aligned=bool(aligned)))


def nms(boxes, scores, iou_threshold=0.5, offset=0):
    """mmcv's ``nms`` signature, computed by ``torchvision.ops.nms``.

    Args:
        boxes: (N, 4) float, (x1, y1, x2, y2).
        scores: (N,) float.
        iou_threshold: boxes overlapping a kept, higher-scoring box by more IoU are dropped.
        offset: 0 (MMDetection 3's boxes); mmcv's legacy offset 1 (+1 pixel widths) is refused.

    Returns:
        int64 (K,): indices of the kept boxes, by descending score.

    Raises:
        NotImplementedError: for offset 1.
    """
    from torchvision.ops import nms as tv_nms

    if offset != 0:
        raise NotImplementedError("mmcv._ext stand-in: nms with offset 1 (legacy boxes)")
    return tv_nms(boxes, scores, float(iou_threshold))


class _StandIn(types.ModuleType):
    """The module object put in ``sys.modules['mmcv._ext']``."""

    roi_align_forward = staticmethod(roi_align_forward)
    nms = staticmethod(nms)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv._ext.{name}: mmcv-lite has no compiled ops and the reference's "
                "stand-in (tools/reference/mmcv_ext_standin.py) provides RoIAlign's forward "
                "and NMS only"
            )

        unavailable.__name__ = name
        return unavailable


def install() -> str:
    """Put the stand-in in place of ``mmcv._ext`` unless mmcv's compiled ops import.

    Returns:
        str: "compiled" if the genuine ``mmcv._ext`` was found (nothing is changed),
        "stand-in" if the stand-in was installed.

    Raises:
        RuntimeError: if ``mmcv.ops`` was imported before (it has bound the missing module).
    """
    try:
        importlib.import_module(MODULE)
        return "compiled"
    except ImportError:
        pass
    if "mmcv.ops" in sys.modules:
        raise RuntimeError("install() must run before mmcv.ops / mmdet.models are imported")
    import mmcv

    module = _StandIn(MODULE, __doc__)
    # A spec without a loader: mmengine's "is full mmcv installed" check then says no.
    module.__spec__ = importlib.machinery.ModuleSpec(MODULE, None)
    module.__file__ = __file__
    sys.modules[MODULE] = module
    mmcv._ext = module
    return "stand-in"
