"""Video dataset mapper of QueryInst-VIS: a key and a reference frame in training, every frame
in inference (docs/method.md §6.1).

Training follows MaskTrack R-CNN's pair sampling: a key frame drawn uniformly among the
video's T frames (or the key frame that a key-frame record names, ``INPUT.KEY_FRAME_SAMPLING``
"frame"), and a reference frame drawn uniformly among the other frames at most
``INPUT.SAMPLING_FRAME_RANGE`` frames away. Both get the same augmentation (the transforms
drawn for the key frame are applied to the reference frame, random crops included), so an
object keeps its place relative to the image, and its identity (the YouTube-VIS track id).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ...data.image_io import read_image
from ...data.dataset_mapper import (
    boxes_from_masks_in_training,
    build_train_augmentation,
    without_identity_resizes,
)

__all__ = ["YTVISDatasetMapper", "sample_frame_pair"]


def sample_frame_pair(length: int, frame_range: int, rng=np.random,
                      key: Optional[int] = None) -> Tuple[int, int]:
    """Draw a (key, reference) pair of frame indices (docs/method.md §6.1).

    The key is uniform over 0..T-1 (or the given ``key``); the reference is uniform over the
    frames t with ``|t - key| <= frame_range`` and ``t != key``. A video of one frame (or
    ``frame_range`` 0) gives the key twice.

    Args:
        length (int): T, the number of frames (>= 1).
        frame_range (int): the largest key-reference distance, in frames (>= 0).
        rng: a ``numpy.random.RandomState``-like object with ``randint``; default numpy's
            global one (which Detectron2 seeds per data-loader worker).
        key (int or None): the key frame, 0 <= key < T; None draws it.

    Returns:
        (key, ref) frame indices.

    Raises:
        ValueError: ``length`` < 1, ``frame_range`` < 0 or ``key`` outside 0..T-1.
    """
    if length < 1 or frame_range < 0:
        raise ValueError(f"sample_frame_pair: need length >= 1 and frame_range >= 0, got "
                         f"{length}, {frame_range}")
    if key is None:
        key = int(rng.randint(length))
    elif not 0 <= key < length:
        raise ValueError(f"sample_frame_pair: key frame {key} outside 0..{length - 1}")
    candidates = [t for t in range(max(0, key - frame_range), min(length, key + frame_range + 1))
                  if t != key]
    if not candidates:
        return key, key
    return key, candidates[int(rng.randint(len(candidates)))]


class YTVISDatasetMapper:
    """Map one video dict of :func:`queryinst.video.data.ytvis.load_ytvis_json` to model inputs.

    Training output, one dict per video record (a new key / reference pair on every call; a
    key-frame record of :func:`queryinst.video.data.build.key_frame_records` keeps its key)::

        {"video_id", "height", "width", "length",
         "file_names": [key path, ref path], "frame_indices": [k, r] (in the whole video),
         "image": [key, ref]: uint8 tensors (C, H', W') in ``INPUT.FORMAT``, augmented alike,
         "instances": [key, ref]: Instances of size (H', W') with gt_boxes (Boxes, XYXY
             absolute pixels), gt_classes (int64 (R,)), gt_ids (int64 (R,), the YouTube-VIS
             track id, equal for the same object in both frames) and, with MODEL.MASK_ON,
             gt_masks (PolygonMasks or BitMasks (R, H', W') as INPUT.MASK_FORMAT says; the
             reference frame's only with ``reference_masks``)}

    Each frame holds only the objects annotated in it; crowd objects are dropped and objects
    left empty by the augmentation (``filter_empty_instances``) are removed from that frame
    only. With a crop and masks, boxes are the tight boxes of the cropped masks.

    Inference output: ``{"video_id", "height", "width", "length", "file_names": [T],
    "image": [T uint8 tensors (C, H', W')]}``, every frame resized by
    ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``; no annotations.

    Frames are read with :func:`queryinst.data.image_io.read_image` (16-bit and float images
    mapped linearly to 8 bits), as the image mapper reads them.
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations: Sequence[T.Augmentation],
                 image_format: str, use_instance_mask: bool = False,
                 instance_mask_format: str = "polygon", sampling_frame_range: int = 20,
                 recompute_boxes: bool = False, reference_masks: bool = True):
        """
        Args:
            is_train (bool): sample a frame pair with annotations, or map every frame.
            augmentations (list[Augmentation]): drawn once per call and applied to every
                frame mapped.
            image_format (str): as Detectron2's ``read_image`` (e.g. "BGR").
            use_instance_mask (bool): keep masks (gt_masks).
            instance_mask_format (str): "polygon" or "bitmask" (RLE annotations need
                "bitmask", Detectron2 raises ValueError otherwise).
            sampling_frame_range (int): largest key-reference distance in frames (>= 0).
            recompute_boxes (bool): boxes from the masks after augmentation (with crops).
            reference_masks (bool): False, the reference frame (the second of each training
                pair) gets no gt_masks, only boxes, classes and ids: a model that supervises
                the key frame alone matches the reference frame by boxes and classes
                (``MODEL.QUERYINST_VIS.SUPERVISE_REFERENCE_FRAME`` False), and decoding its
                masks is wasted work (~70 cell masks a PSC frame: 0.07 s an iteration).

        Raises:
            ValueError: ``sampling_frame_range`` < 0; ``recompute_boxes`` without
                ``use_instance_mask`` or without ``reference_masks`` (the boxes come from
                the masks).
        """
        if sampling_frame_range < 0:
            raise ValueError(f"INPUT.SAMPLING_FRAME_RANGE must be >= 0, got "
                             f"{sampling_frame_range}")
        if recompute_boxes and not (use_instance_mask and reference_masks):
            raise ValueError("recompute_boxes needs use_instance_mask and reference_masks")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self.sampling_frame_range = sampling_frame_range
        self.recompute_boxes = recompute_boxes
        self.reference_masks = reference_masks

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        """Training: :func:`queryinst.build_train_augmentation` (the image model's),
        ``INPUT.SAMPLING_FRAME_RANGE``, the reference frame's masks only where the model
        supervises that frame or the boxes come from masks; inference:
        ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``.

        Raises:
            ValueError: see :func:`queryinst.build_train_augmentation`.
        """
        if is_train:
            augmentations = build_train_augmentation(cfg)
        else:
            augmentations = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST,
                                                  cfg.INPUT.MAX_SIZE_TEST, "choice")]
        recompute_boxes = is_train and boxes_from_masks_in_training(cfg)
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "use_instance_mask": cfg.MODEL.MASK_ON,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
            "sampling_frame_range": cfg.INPUT.SAMPLING_FRAME_RANGE,
            "recompute_boxes": recompute_boxes,
            "reference_masks": (recompute_boxes
                                or cfg.MODEL.QUERYINST_VIS.SUPERVISE_REFERENCE_FRAME),
        }

    def _read(self, video: dict, t: int) -> np.ndarray:
        image = read_image(video["file_names"][t], format=self.image_format)
        utils.check_image_size(video, image)  # every frame has the video's size
        return image

    def _frame_instances(self, objects: List[dict], transforms, image_shape,
                         masks: bool = True) -> Instances:
        """One frame's objects -> filtered Instances with gt_ids (see the class docstring);
        without gt_masks unless ``masks`` and ``use_instance_mask``."""
        annos = []
        for obj in copy.deepcopy(objects):
            if obj.get("iscrowd", 0):
                continue
            if not (masks and self.use_instance_mask):
                obj.pop("segmentation", None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
        instances = utils.annotations_to_instances(annos, image_shape,
                                                   mask_format=self.instance_mask_format)
        instances.gt_ids = torch.tensor([obj["id"] for obj in annos], dtype=torch.int64)
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        return utils.filter_empty_instances(instances)

    def __call__(self, video: dict) -> dict:
        """Map one video dict (see the class docstring for the output)."""
        length = len(video["file_names"])
        if self.is_train:
            # A key-frame record (INPUT.KEY_FRAME_SAMPLING "frame") names its key frame.
            frame_indices = list(sample_frame_pair(length, self.sampling_frame_range,
                                                   key=video.get("key_frame")))
        else:
            frame_indices = list(range(length))
        out = {key: video[key] for key in ("video_id", "height", "width") if key in video}
        out["length"] = video.get("length", length)
        out["file_names"] = [video["file_names"][t] for t in frame_indices]
        if self.is_train:
            offset = video.get("frame_offset", 0)  # a key-frame record's first frame
            out["frame_indices"] = [offset + t for t in frame_indices]

        # The transforms are drawn on the first frame and replayed on the others: the same
        # resize, flip and crop for every frame of the call.
        aug_input = T.AugInput(self._read(video, frame_indices[0]))
        transforms = without_identity_resizes(self.augmentations(aug_input))
        images = [aug_input.image]
        images += [transforms.apply_image(self._read(video, t)) for t in frame_indices[1:]]
        out["image"] = [torch.as_tensor(np.ascontiguousarray(im.transpose(2, 0, 1)))
                        for im in images]
        if self.is_train:
            image_shape = images[0].shape[:2]
            out["instances"] = [
                self._frame_instances(video["annotations"][t], transforms, image_shape,
                                      masks=i == 0 or self.reference_masks)
                for i, t in enumerate(frame_indices)
            ]
        return out
