"""The QueryInst meta-architecture: backbone -> learnable proposals -> query stages.

Paper section 3; docs/method.md §1-3. It is Detectron2's ``GeneralizedRCNN`` wiring (preprocessing,
training losses) with QueryInst's own post-processing: final boxes are rescaled but never
clipped and no detection is dropped, as in the reference implementation (docs/method.md,
section 3); the ROI heads honour ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` (default 0) and
``TEST.DETECTIONS_PER_IMAGE``.
"""
from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import paste_masks_in_image
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes, Instances

__all__ = ["QueryInst", "queryinst_postprocess"]


def queryinst_postprocess(
    results: Instances, output_height: int, output_width: int, mask_threshold: float = 0.5
) -> Instances:
    """Rescale detections from the resized input to the original image (docs/method.md §3).

    Args:
        results: detections with ``pred_boxes`` (absolute xyxy in ``results.image_size``)
            and optionally ``pred_masks`` (float (R, 1, M, M) probabilities).
        output_height, output_width: size of the original image, pixels.
        mask_threshold: binarisation threshold of the pasted masks.

    Returns:
        Instances: the same R detections in original-image pixels; boxes are not clipped
        (unlike Detectron2's ``detector_postprocess``), masks become bool (R, H, W) pasted
        bilinearly with Detectron2's ``paste_masks_in_image``.
    """
    scale_x = output_width / results.image_size[1]
    scale_y = output_height / results.image_size[0]
    out = Instances((output_height, output_width), **results.get_fields())
    boxes = results.pred_boxes.tensor
    out.pred_boxes = Boxes(boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y]))
    if results.has("pred_masks"):
        out.pred_masks = _paste_masks(
            results.pred_masks[:, 0], out.pred_boxes.tensor, output_height, output_width,
            mask_threshold,
        )
    return out


def _paste_masks(masks, boxes, height: int, width: int, threshold: float):
    """Detectron2's ``paste_masks_in_image``, plus empty masks for boxes outside the image.

    Unclipped boxes can lie wholly outside the image, where Detectron2's paste fails on an
    empty pixel range; their pasted masks are empty by definition.
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    inside = (x0 < width) & (y0 < height) & (x1 > 0) & (y1 > 0)
    if inside.all():  # the usual case: no second (R, H, W) buffer and copy
        return paste_masks_in_image(masks, Boxes(boxes), (height, width), threshold=threshold)
    pasted = masks.new_zeros((len(masks), height, width), dtype=torch.bool)
    if inside.any():
        pasted[inside] = paste_masks_in_image(
            masks[inside], Boxes(boxes[inside]), (height, width), threshold=threshold
        )
    return pasted


@META_ARCH_REGISTRY.register()
class QueryInst(GeneralizedRCNN):
    """QueryInst (Fang et al., ICCV 2021): instances as queries, six stages, dynamic masks.

    Built from a config with ``MODEL.META_ARCHITECTURE: QueryInst``,
    ``MODEL.PROPOSAL_GENERATOR.NAME: LearnableProposals`` and
    ``MODEL.ROI_HEADS.NAME: QueryInstROIHeads`` (``configs/Base-QueryInst.yaml``), or from
    plain modules like ``GeneralizedRCNN``.

    Input and output are Detectron2's: ``list[dict]`` with "image" (C, H, W) in
    ``INPUT.FORMAT``, optional "height"/"width" (output size) and, in training, "instances".
    Training returns a dict of per-stage losses; inference returns ``list[dict]`` with
    "instances" holding ``pred_boxes``, ``scores``, ``pred_classes``, ``query_indices`` and
    ``pred_masks`` (bool (R, height, width)) when masks are on.
    """

    @configurable
    def __init__(self, *, channels_last: bool = False, **kwargs):
        """
        Args:
            channels_last: store the backbone's conv weights channels-last
                (``MODEL.QUERYINST.CHANNELS_LAST``), so its convolutions run and return
                channels-last maps: faster on CPUs. The heads stay NCHW (their small
                RoI convolutions gain nothing, and RoIAlign reads NCHW).
            kwargs: ``GeneralizedRCNN``'s arguments (backbone, proposal_generator,
                roi_heads, pixel_mean, pixel_std, ...).
        """
        super().__init__(**kwargs)
        if channels_last:
            # Module.to keeps this layout through later .to(device) and load_state_dict.
            self.backbone.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["channels_last"] = cfg.MODEL.QUERYINST.CHANNELS_LAST
        return ret

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        """Detect in a batch; see the class docstring for the format.

        Raises:
            NotImplementedError: with ``detected_instances`` (QueryInst predicts its own boxes).
        """
        assert not self.training
        if detected_instances is not None:
            raise NotImplementedError("QueryInst does not take given boxes")
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        results, _ = self.roi_heads(images, features, proposals, None)
        if not do_postprocess:
            return results
        return [
            {
                "instances": queryinst_postprocess(
                    r, inp.get("height", size[0]), inp.get("width", size[1])
                )
            }
            for r, inp, size in zip(results, batched_inputs, images.image_sizes)
        ]
