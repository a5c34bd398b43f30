"""Drawing tracks: one stable colour and an id label per track (Detectron2's Visualizer).

Used by ``demo/demo.py`` (video and webcam input) and ``tools/run_demo.py`` (the animated
preview of ``make demo``).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer

from .structures import VideoTrack, decode_mask

__all__ = ["track_color", "draw_tracked_frame", "frame_instances", "save_gif"]

_PALETTE = colormap(rgb=True, maximum=1)  # Detectron2's 74 well-separated colours


def track_color(track_id: int) -> np.ndarray:
    """The colour of a track: Detectron2's colormap entry ``track_id`` (cycled), RGB in [0, 1].

    The same id gets the same colour in every frame, and consecutive ids differ.
    """
    return _PALETTE[track_id % len(_PALETTE)]


def frame_instances(tracks: Sequence[VideoTrack], t: int, image_size) -> Instances:
    """The detections of frame ``t`` of a tracked video, as one Instances.

    Args:
        tracks: a video's tracks (``QueryInstVIS`` output).
        t: frame index.
        image_size: (height, width) of the frames, pixels.

    Returns:
        Instances: one row per track present in frame t: ``pred_boxes``, ``scores`` (the
        frame's detection score), ``pred_classes`` (the track's category), ``track_ids`` and,
        when the tracks have masks, ``pred_masks`` (bool (R, H, W)).
    """
    present = [k for k in tracks if k.boxes[t] is not None]
    inst = Instances(tuple(image_size))
    inst.pred_boxes = Boxes(torch.stack([k.boxes[t].float().cpu() for k in present])
                            if present else torch.zeros(0, 4))
    inst.scores = torch.tensor([k.frame_scores[t] for k in present], dtype=torch.float32)
    inst.pred_classes = torch.tensor([k.category for k in present], dtype=torch.int64)
    inst.track_ids = torch.tensor([k.track_id for k in present], dtype=torch.int64)
    if present and all(k.masks[t] is not None for k in present):
        inst.pred_masks = torch.stack([decode_mask(k.masks[t]) for k in present])
    return inst


def draw_tracked_frame(frame_rgb: np.ndarray, instances: Instances, metadata,
                       scale: float = 1.0) -> np.ndarray:
    """Draw a frame's tracked detections, each in its track's colour, labelled
    "#id class score%".

    Args:
        frame_rgb: uint8 (H, W, 3) RGB.
        instances: the frame's detections with ``track_ids`` (and ``pred_boxes``,
            ``pred_classes``, ``scores``, optional ``pred_masks``), on the CPU.
        metadata: Detectron2 metadata (``thing_classes`` names the classes, if set).
        scale: enlargement of the drawing.

    Returns:
        np.ndarray: uint8 (scale*H, scale*W, 3) RGB.
    """
    visualizer = Visualizer(frame_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    if len(instances) == 0:
        return visualizer.output.get_image()
    names: List[str] = metadata.get("thing_classes", None) or []
    labels = [
        f"#{i} {names[c] if c < len(names) else c} {s * 100:.0f}%"
        for i, c, s in zip(instances.track_ids.tolist(), instances.pred_classes.tolist(),
                           instances.scores.tolist())
    ]
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
    drawn = visualizer.overlay_instances(
        boxes=None if masks is not None else instances.pred_boxes.tensor.numpy(),
        masks=masks,
        labels=labels,
        assigned_colors=[track_color(i) for i in instances.track_ids.tolist()],
        alpha=0.5,
    )
    return drawn.get_image()


def save_gif(frames_rgb: Sequence[np.ndarray], path: str, fps: float = 4.0) -> None:
    """Write an animated GIF that loops forever (Pillow).

    Args:
        frames_rgb: uint8 (H, W, 3) RGB frames of one size.
        path: the .gif file.
        fps: frames per second.

    Raises:
        ValueError: no frames.
    """
    from PIL import Image

    if not frames_rgb:
        raise ValueError(f"{path}: no frames to write")
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames_rgb]
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=int(round(1000 / fps)))


def save_mp4(frames_rgb: Sequence[np.ndarray], path: str, fps: float = 4.0) -> None:
    """Write an MP4 video (OpenCV ``VideoWriter``, codec mp4v, as ``demo/demo.py`` writes).

    Args:
        frames_rgb: uint8 (H, W, 3) RGB frames of one size.
        path: the .mp4 file.
        fps: frames per second.

    Raises:
        ValueError: no frames, or OpenCV cannot open a writer for ``path``.
    """
    import cv2

    if not frames_rgb:
        raise ValueError(f"{path}: no frames to write")
    height, width = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise ValueError(f"{path}: OpenCV cannot write an mp4v video here")
    try:
        for frame in frames_rgb:
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    finally:
        writer.release()
