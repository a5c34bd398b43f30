"""The QueryInst meta-architecture: backbone -> learnable proposals -> query stages.

Paper section 3; docs/method.md §1-3. It is Detectron2's ``GeneralizedRCNN`` wiring (preprocessing,
training losses) with QueryInst's own post-processing: final boxes are rescaled but never
clipped and no detection is dropped, as in the reference implementation (docs/method.md,
section 3); the ROI heads honour ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` (default 0) and
``TEST.DETECTIONS_PER_IMAGE``.
"""
from __future__ import annotations

import contextlib

import torch
from detectron2.config import configurable
from detectron2.layers import paste_masks_in_image
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes, Instances

from ..fast_inference import (
    InferenceWeights,
    check_inference_dtype,
    check_train_dtype,
    resolve_inference_dtype,
    resolve_memory_format,
    resolve_train_dtype,
)
from ..memory_format import apply_channels_last, resolve_fpn_output_memory_format

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
    empty pixel range; their pasted masks are empty by definition. They are pasted at a
    1-pixel box inside the image and their rows cleared after: one (R, H, W) buffer for all.
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    outside = (x0 >= width) | (y0 >= height) | (x1 <= 0) | (y1 <= 0)
    if not outside.any():  # the usual case
        return paste_masks_in_image(masks, Boxes(boxes), (height, width), threshold=threshold)
    boxes = torch.where(outside[:, None], boxes.new_tensor([0.0, 0.0, 1.0, 1.0]), boxes)
    pasted = paste_masks_in_image(masks, Boxes(boxes), (height, width), threshold=threshold)
    # index_fill_ writes those rows only (a boolean index would read all R x H x W).
    return pasted.index_fill_(0, outside.nonzero()[:, 0], 0)


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

    Inference speed-ups (``queryinst.modeling.fast_inference``; docs/deployment.md): BatchNorm
    folded into the convolutions for the call (``fuse_bn_inference``), convolution weights in
    ``inference_memory_format`` and autocast to ``inference_dtype``; training uses none.
    """

    @configurable
    def __init__(self, *, channels_last: bool = False, fpn_output_memory_format: str = "auto",
                 fuse_bn_inference: bool = True, inference_memory_format: str = "auto",
                 inference_dtype: str = "float32", train_dtype: str = "float32", **kwargs):
        """
        Args:
            channels_last: store the backbone's conv weights channels-last
                (``MODEL.QUERYINST.CHANNELS_LAST``), so its convolutions run and return
                channels-last maps, in training too: faster on CPUs.
            fpn_output_memory_format: with ``channels_last``, the layout of the FPN's output
                convolutions (``MODEL.QUERYINST.FPN_OUTPUT_MEMORY_FORMAT``; module
                :mod:`queryinst.modeling.memory_format`): "channels_last", "contiguous" or
                "auto" (here resolved for the CPU; ``from_config`` resolves it for
                ``MODEL.DEVICE``).
            fuse_bn_inference: fold every conv + fixed-statistics BatchNorm pair into one
                convolution during inference (``MODEL.QUERYINST.FUSE_BN_INFERENCE``;
                :class:`~queryinst.modeling.fast_inference.InferenceWeights`): the same outputs
                up to float rounding; parameters and ``state_dict()`` are unchanged.
            inference_memory_format: "auto" (channels-last on the CPU, else unchanged),
                "channels_last" or "contiguous": the memory format of every convolution
                weight (backbone and mask heads) during inference
                (``MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT``); oneDNN's CPU convolutions are
                faster channels-last (docs/benchmark.md). Same outputs up to float rounding.
            inference_dtype: "float32", "bfloat16" or "float16" (CUDA only), the autocast
                dtype of inference (``MODEL.QUERYINST.INFERENCE_DTYPE``); RoIAlign, box
                decoding, scores, top-k and mask pasting stay fp32.
            train_dtype: "float32", "bfloat16" or "auto", the autocast dtype of the training
                forward pass (``MODEL.QUERYINST.TRAIN_DTYPE``; :meth:`training_autocast`).
            kwargs: ``GeneralizedRCNN``'s arguments (backbone, proposal_generator,
                roi_heads, pixel_mean, pixel_std, ...).

        Raises:
            ValueError: ``inference_dtype``, ``inference_memory_format`` or
                ``fpn_output_memory_format`` is not one of its three names, or
                ``train_dtype`` is not one of its three.
        """
        super().__init__(**kwargs)
        fpn_format = resolve_fpn_output_memory_format(fpn_output_memory_format, "cpu")
        if channels_last:
            apply_channels_last(self.backbone, fpn_format)
        check_inference_dtype(inference_dtype)
        check_train_dtype(train_dtype)
        resolve_memory_format(inference_memory_format, "cpu")  # refuses an unknown name
        self.fuse_bn_inference = fuse_bn_inference
        self.inference_memory_format = inference_memory_format
        self.inference_dtype = inference_dtype
        self.train_dtype = train_dtype
        self._inference_weights = InferenceWeights(self)
        self._autocast_dtypes: dict = {}  # (name, device type) -> autocast dtype or None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        q = cfg.MODEL.QUERYINST
        ret["channels_last"] = q.CHANNELS_LAST
        ret["fpn_output_memory_format"] = resolve_fpn_output_memory_format(
            q.FPN_OUTPUT_MEMORY_FORMAT, torch.device(cfg.MODEL.DEVICE).type)
        ret["fuse_bn_inference"] = q.FUSE_BN_INFERENCE
        ret["inference_memory_format"] = q.INFERENCE_MEMORY_FORMAT
        # Refused before the model is built: an unknown name, float16 with MODEL.DEVICE cpu.
        check_inference_dtype(q.INFERENCE_DTYPE, torch.device(cfg.MODEL.DEVICE).type)
        ret["inference_dtype"] = q.INFERENCE_DTYPE
        ret["train_dtype"] = q.TRAIN_DTYPE
        return ret

    @contextlib.contextmanager
    def training_autocast(self):
        """Autocast of the training forward pass to ``train_dtype`` (docs/training.md, "bf16
        training"); nothing for "float32" (nor for "auto" where bf16 is not faster), and
        float32 with a warning (once per model) for "bfloat16" on a device without native bf16. Parameters, gradients and optimizer state stay float32.

        Yields:
            torch.dtype or None: the autocast dtype, None when none applies.
        """
        key = (self.train_dtype, self.device.type, "train")
        if key not in self._autocast_dtypes:  # warns once about a bf16 fallback
            self._autocast_dtypes[key] = resolve_train_dtype(*key[:2])
        dtype = self._autocast_dtypes[key]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            yield dtype

    def forward(self, batched_inputs):
        """``GeneralizedRCNN.forward``: :meth:`inference` in eval mode; in training
        :meth:`training_losses` under :meth:`training_autocast`, the losses returned as
        float32 scalars when autocast applied (else in the model's dtype)."""
        if not self.training:
            return super().forward(batched_inputs)
        with self.training_autocast() as dtype:
            losses = self.training_losses(batched_inputs)
        return losses if dtype is None else {k: v.float() for k, v in losses.items()}

    def training_losses(self, batched_inputs) -> dict:
        """The training losses of a batch (``GeneralizedRCNN``'s training path; docs/method.md
        §2): a dict of scalar tensors, ``s{t}_loss_{cls,bbox,giou,mask}``. Subclasses with
        other training inputs (``QueryInstVIS``) override this, not :meth:`forward`."""
        return super().forward(batched_inputs)

    def train(self, mode: bool = True):
        """``nn.Module.train``; also forgets the swapped inference weights (recomputed at the
        next inference from the current parameters)."""
        self._inference_weights.clear()
        return super().train(mode)

    @contextlib.contextmanager
    def fast_inference(self, device: torch.device):
        """The inference speed-ups around a block: swapped conv weights and autocast.

        Used by :meth:`inference` around backbone, proposals and ROI heads (preprocessing
        and pasting stay outside, in fp32). Nothing applies while tracing for export
        (``queryinst.export`` traces the plain fp32 model).

        Args:
            device: where the block runs (its type picks the autocast device).

        Raises:
            ValueError: ``inference_dtype`` "float16" on the CPU.
        """
        if torch.jit.is_tracing():
            yield
            return
        key = (self.inference_dtype, device.type)
        if key not in self._autocast_dtypes:  # warns once about a bf16 fallback
            self._autocast_dtypes[key] = resolve_inference_dtype(*key)
        dtype = self._autocast_dtypes[key]
        memory_format = resolve_memory_format(self.inference_memory_format, device.type)
        with contextlib.ExitStack() as stack:
            if self.fuse_bn_inference or memory_format is not None or dtype is not None:
                stack.enter_context(self._inference_weights.applied(
                    dtype, self.fuse_bn_inference, memory_format))
            if dtype is not None:
                stack.enter_context(torch.autocast(device.type, dtype=dtype))
            yield

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        """Detect in a batch; see the class docstring for the format.

        Raises:
            NotImplementedError: with ``detected_instances`` (QueryInst predicts its own boxes).
        """
        assert not self.training
        if detected_instances is not None:
            raise NotImplementedError("QueryInst does not take given boxes")
        images = self.preprocess_image(batched_inputs)
        with self.fast_inference(images.tensor.device):
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
