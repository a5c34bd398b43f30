"""Training data of QueryInst: the paper's augmentations (docs/method.md §2) and the dataset mapper.

The three training policies, all made of Detectron2 augmentations
(``detectron2.data.transforms``) and chosen by the config:

- 1x: ``ResizeShortestEdge(800, 1333, "choice")`` then ``RandomFlip(0.5)``
  (``INPUT.MIN_SIZE_TRAIN: (800,)``): Detectron2's ``build_augmentation``.
- 3x multi-scale: the same builder with ``INPUT.MIN_SIZE_TRAIN: (480, 512, ..., 800)``.
- 300-query crop policy (``INPUT.CROP_POLICY.ENABLED``): ``RandomFlip``, then with
  probability 0.5 each either the multi-scale resize, or
  ``ResizeShortestEdge((400, 500, 600), 1333)`` -> ``RandomCrop("absolute_range", (384, 600))``
  -> the multi-scale resize. This is the ``AutoAugment`` policy of MMDetection's QueryInst
  and Sparse R-CNN configs (originally DETR's); an image whose crop holds no object is kept,
  with no instance (their ``allow_negative_crop=True``).

Detectron2 0.6 has ``RandomApply`` (apply one augmentation or not) but nothing that applies
one of two augmentations, so :class:`RandomSelect` adds that.
"""
from __future__ import annotations

import copy
from typing import List, Sequence, Union

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform

from .image_io import read_image

__all__ = ["ImageReadError", "QueryInstDatasetMapper", "RandomSelect", "boxes_from_masks_in_training",
           "build_train_augmentation", "without_identity_resizes"]

_AugLike = Union[T.Augmentation, Transform, Sequence[Union[T.Augmentation, Transform]]]


def _as_augmentation(aug: _AugLike) -> T.Augmentation:
    """An Augmentation as it is; a Transform or a sequence of them as an AugmentationList."""
    if isinstance(aug, T.Augmentation):
        return aug
    if isinstance(aug, Transform):
        return T.AugmentationList([aug])
    return T.AugmentationList(list(aug))


class RandomSelect(T.Augmentation):
    """Apply ``first`` with probability ``prob``, otherwise ``second`` (exactly one of them).

    Like ``T.AugmentationList``, it is applied by calling it on a ``T.AugInput``
    (``aug(aug_input)`` transforms the input in place and returns the transform used);
    ``get_transform`` cannot be used because a list of augmentations needs each step's output.
    """

    def __init__(self, first: _AugLike, second: _AugLike, prob: float = 0.5):
        """
        Args:
            first, second: an Augmentation, a Transform, or a list of them applied in order.
            prob: probability in [0, 1] of applying ``first``.

        Raises:
            ValueError: ``prob`` outside [0, 1].
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomSelect: prob must be in [0, 1], got {prob}")
        self.first = _as_augmentation(first)
        self.second = _as_augmentation(second)
        self.prob = prob

    def __call__(self, aug_input: T.AugInput) -> Transform:
        chosen = self.first if self._rand_range() < self.prob else self.second
        return chosen(aug_input)

    def get_transform(self, *args):
        raise NotImplementedError("RandomSelect is applied by calling it on an AugInput")


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """Training augmentations of QueryInst from a config (docs/method.md §2; see the
    module docstring).

    Sizes are in pixels. Keys read: ``INPUT.MIN_SIZE_TRAIN``, ``MAX_SIZE_TRAIN``,
    ``MIN_SIZE_TRAIN_SAMPLING`` and ``RANDOM_FLIP`` (through Detectron2's
    ``detection_utils.build_augmentation``), ``INPUT.CROP_POLICY`` and Detectron2's own
    ``INPUT.CROP``.

    Args:
        cfg: a config with :func:`queryinst.add_queryinst_config`'s keys.

    Returns:
        list[Augmentation], applied in order:

        - ``INPUT.CROP_POLICY.ENABLED``: ``[RandomFlip, RandomSelect(resize,
          [ResizeShortestEdge(PRE_RESIZE, MAX_SIZE_TRAIN, "choice"),
          RandomCrop("absolute_range", SIZE), resize])]``, where ``resize`` is
          ``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING)``
          (no flip with ``RANDOM_FLIP: "none"``);
        - otherwise Detectron2's default ``[resize, RandomFlip]``, preceded by
          ``RandomCrop(INPUT.CROP.TYPE, INPUT.CROP.SIZE)`` if ``INPUT.CROP.ENABLED`` (exactly
          what Detectron2's ``DatasetMapper`` builds);
        - then, if ``INPUT.VERTICAL_FLIP_PROB`` > 0, ``RandomFlip(p, vertical=True)`` (an
          extension for images without an up and down, e.g. microscopy; 0 in the paper).

    Raises:
        ValueError: ``INPUT.VERTICAL_FLIP_PROB`` outside [0, 1], both ``INPUT.CROP`` and
            ``INPUT.CROP_POLICY`` enabled, or
            ``INPUT.CROP_POLICY.SIZE`` not a (min, max) pair with 0 < min <= max.
    """
    vflip_prob = cfg.INPUT.VERTICAL_FLIP_PROB
    if not 0.0 <= vflip_prob <= 1.0:
        raise ValueError(f"INPUT.VERTICAL_FLIP_PROB must be in [0, 1], got {vflip_prob}")
    vflip = [T.RandomFlip(vflip_prob, horizontal=False, vertical=True)] if vflip_prob else []
    return _build_geometric_augmentation(cfg) + vflip


def _build_geometric_augmentation(cfg) -> List[T.Augmentation]:
    """:func:`build_train_augmentation` without ``INPUT.VERTICAL_FLIP_PROB``."""
    resize, *flip = utils.build_augmentation(cfg, is_train=True)
    policy = cfg.INPUT.CROP_POLICY
    if not policy.ENABLED:
        if cfg.INPUT.CROP.ENABLED:
            return [T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE), resize, *flip]
        return [resize, *flip]
    if cfg.INPUT.CROP.ENABLED:
        raise ValueError("INPUT.CROP and INPUT.CROP_POLICY are both enabled; enable one only "
                         "(INPUT.CROP_POLICY is QueryInst's 300-query policy)")
    crop_size = tuple(policy.SIZE)
    if len(crop_size) != 2 or not 0 < crop_size[0] <= crop_size[1]:
        raise ValueError(f"INPUT.CROP_POLICY.SIZE must be (min, max) with 0 < min <= max, "
                         f"got {crop_size}")
    crop_branch = [
        T.ResizeShortestEdge(tuple(policy.PRE_RESIZE), cfg.INPUT.MAX_SIZE_TRAIN, "choice"),
        T.RandomCrop("absolute_range", crop_size),
        resize,
    ]
    return [*flip, RandomSelect(resize, crop_branch, prob=0.5)]


def boxes_from_masks_in_training(cfg) -> bool:
    """Whether training boxes are recomputed from the augmented masks: with masks and a crop
    (``INPUT.CROP`` or ``INPUT.CROP_POLICY``), so a box never reaches past its cropped mask."""
    cropping = cfg.INPUT.CROP.ENABLED or cfg.INPUT.CROP_POLICY.ENABLED
    return bool(cfg.MODEL.MASK_ON and cropping)


def without_identity_resizes(transforms: T.TransformList) -> T.TransformList:
    """``transforms`` less the ``ResizeTransform`` steps that keep the size.

    ``ResizeShortestEdge`` returns a ``ResizeTransform`` even when the image already has the
    drawn size, and replaying that on each RLE / bitmap annotation goes through PIL once per
    mask: about a quarter of the loading time of a 536x700 time-lapse frame with ~70 cells,
    for a copy. PIL's resize to the same size is a copy and the coordinate scale is 1, so
    the result is the same.

    Args:
        transforms: as drawn by an ``AugmentationList``.

    Returns:
        T.TransformList: the other transforms, in their order.
    """
    kept = [
        t for t in transforms.transforms
        if not (isinstance(t, T.ResizeTransform) and (t.h, t.w) == (t.new_h, t.new_w))
    ]
    return T.TransformList(kept)


class ImageReadError(OSError):
    """A dataset image cannot be read; the message names the file and the reader's error."""


def _read_named(file_name: str, image_format: str) -> np.ndarray:
    """:func:`queryinst.data.image_io.read_image`, whose errors name the file.

    PIL's errors often do not (a truncated PNG: "image file is truncated (8 bytes not
    processed)"; a broken one: ``SyntaxError`` "broken PNG file").

    Raises:
        ImageReadError: from the reader's ``OSError`` (missing file, truncated data,
            unidentified format), ``SyntaxError`` or ``ValueError``.
    """
    try:
        return read_image(file_name, format=image_format)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {file_name}: {type(e).__name__}: {e}") from e


class QueryInstDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` with QueryInst's training augmentations.

    Only the construction from a config differs (``from_config``); the mapping is
    Detectron2's: read the image, apply the augmentations to it and, consistently, to the
    boxes and masks (polygons: ``apply_polygons``; RLE / bitmaps: ``apply_segmentation``,
    nearest neighbour), drop crowd annotations, then ``filter_empty_instances``. When a crop
    is on (``INPUT.CROP_POLICY`` or ``INPUT.CROP``) and masks are used, boxes are recomputed
    as the tight boxes of the cropped masks (``recompute_boxes``), so instances cut away by
    the crop disappear and partly cut ones get boxes inside the crop. An image left without
    any instance is kept with an empty ``Instances`` (the model trains on it as all
    background).

    Output (training), per image: a dict with the input's fields plus
    "image": uint8 tensor (C, H, W) in ``INPUT.FORMAT`` of the augmented image, and
    "instances": ``Instances`` of image size (H, W) with ``gt_boxes`` (Boxes, XYXY absolute
    pixels), ``gt_classes`` (int64, (R,)) and, with ``MODEL.MASK_ON``, ``gt_masks``
    (``PolygonMasks`` or ``BitMasks`` (R, H, W) as ``INPUT.MASK_FORMAT`` says). RLE
    annotations need ``INPUT.MASK_FORMAT: "bitmask"`` (Detectron2 raises ``ValueError``
    otherwise). Inference mapping (``is_train=False``) is Detectron2's otherwise unchanged.

    Images are read with :func:`queryinst.data.image_io.read_image`: 8-bit images exactly as
    Detectron2 reads them, 16-bit and float ones mapped linearly to 8 bits
    (:func:`queryinst.data.image_io.to_uint8`) instead of clipped to white.

    Cropping polygons uses ``shapely`` (through fvcore's ``CropTransform``).

    Construct from a config, ``QueryInstDatasetMapper(cfg, is_train=True)``, or from plain
    arguments as ``DatasetMapper`` (``augmentations=[...]``, ``image_format=...``, ...).
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        """Detectron2's mapper arguments, with :func:`build_train_augmentation` in training.

        Raises:
            ValueError: see :func:`build_train_augmentation`.
        """
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = build_train_augmentation(cfg)
            ret["recompute_boxes"] = boxes_from_masks_in_training(cfg)
        return ret

    # Detectron2's DatasetMapper.__call__ with its image reading replaced ("USER: Write your
    # own image loading" there): it calls detection_utils.read_image directly, no hook.
    def __call__(self, dataset_dict: dict) -> dict:
        """Map one Detectron2 dataset dict (see the class docstring for the output).

        Raises:
            ImageReadError: the image cannot be read (missing, truncated, not an image);
                the message names the file. In a DataLoader worker, PyTorch re-raises it in
                the main process with the worker's traceback, which holds that message.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = _read_named(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = without_identity_resizes(self.augmentations(aug_input))
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms,
                                      proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
