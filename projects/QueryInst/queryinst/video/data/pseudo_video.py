"""Nuclei pseudo-videos: a moving crop window over one real image (docs/method.md §6.5).

The source is the 512x512 nuclei image and its instance label image that the image datasets
``nuclei_dsb_train`` / ``nuclei_dsb_val`` use (``queryinst.data.bundled_sources``). A square
crop window moves along a straight path, frame by frame, and may change its side (zoom); every
window is resampled to a fixed frame size. The motion is synthetic, the pixels and labels are
real: nuclei move through the frame, enter and leave it, and keep their identity, which is the
value of the label image (one track per label).

Splits follow the image datasets: the validation quadrant is x, y in [256, 512) (the tile at
``NUCLEI_VAL_XY``); no training window shares a pixel with it, and the validation video lies
inside it.

Everything here is pure (arrays in, arrays / dicts out, no RNG, no IO); ``builtin.py`` fetches
the source, writes the files and registers the datasets.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ...data.bundled_sources import (
    NUCLEI_TILE,
    NUCLEI_VAL_XY,
    ConvertedDataset,
    _encode_png,
    _info,
    _mask_annotation,
    normalize_to_uint8,
)

__all__ = [
    "Window", "VideoPath", "NUCLEI_VIDEO_FRAME", "NUCLEI_VIDEO_MIN_AREA", "NUCLEI_VIDEO_PATHS",
    "window_path", "windows_overlap", "resample_labels", "resample_image", "label_tracks",
    "track_annotation", "convert_nuclei_videos",
]

NUCLEI_VIDEO_FRAME = 192  # frame side in pixels (every window is resampled to this)
NUCLEI_VIDEO_MIN_AREA = 20  # an object with fewer visible pixels in a frame is absent there


class Window(NamedTuple):
    """A square crop window in source-image pixels: top-left (x, y) and side length."""

    x: int
    y: int
    side: int


class VideoPath(NamedTuple):
    """A straight window path: ``num_frames`` windows interpolated from ``start`` to ``end``."""

    name: str
    start: Window
    end: Window
    num_frames: int


# Training paths never touch the val quadrant [256, 512)^2: each window lies in the top band
# (y + side <= 256) or in the left band (x + side <= 256). Side 192 = scale 1: those videos are
# pure integer pans (frame t+1 = frame t shifted), the others zoom and are resampled.
NUCLEI_VIDEO_PATHS: Dict[str, Tuple[VideoPath, ...]] = {
    "train": (
        VideoPath("pan_right", Window(0, 32, 192), Window(288, 32, 192), 10),  # 32 px/frame
        VideoPath("pan_down", Window(32, 0, 192), Window(32, 288, 192), 10),  # 32 px/frame
        VideoPath("pan_diagonal_slow", Window(0, 0, 192), Window(90, 54, 192), 10),  # (10, 6)
        VideoPath("pan_left_zoom_in", Window(288, 16, 224), Window(16, 80, 176), 10),
        VideoPath("pan_up_zoom_out", Window(16, 340, 160), Window(24, 8, 224), 10),
    ),
    # Inside the val quadrant: down-right while zooming in (side 192 -> 160, scale 1 -> 1.2).
    "val": (VideoPath("val_pan_zoom", Window(256, 256, 192), Window(352, 320, 160), 12),),
}


def window_path(path: VideoPath) -> List[Window]:
    """Return the ``path.num_frames`` windows of a path: x, y and side each linearly
    interpolated from start to end (frame t at fraction t / (num_frames - 1)) and rounded to
    integer pixels with ``np.round`` (halves to even)."""
    t = np.linspace(0.0, 1.0, path.num_frames)
    values = [np.round(a + (b - a) * t).astype(int) for a, b in zip(path.start, path.end)]
    return [Window(int(x), int(y), int(s)) for x, y, s in zip(*values)]


def windows_overlap(window: Window, x: int, y: int, w: int, h: int) -> bool:
    """Whether ``window`` shares at least one pixel with the rectangle (x, y, w, h) (pixels)."""
    return (window.x < x + w and x < window.x + window.side
            and window.y < y + h and y < window.y + window.side)


def _source_indices(start: int, side: int, size: int) -> np.ndarray:
    # Pixel-centre nearest neighbour: output pixel i (centre i + 0.5) maps to source
    # start + floor((i + 0.5) * side / size), in exact integer arithmetic.
    return start + ((2 * np.arange(size) + 1) * side) // (2 * size)


def resample_labels(labels: np.ndarray, window: Window, size: int) -> np.ndarray:
    """Crop a label image to ``window`` and resample it to (size, size), nearest neighbour.

    Args:
        labels (ndarray): (H, W) integer label image; the window must lie inside it.
        window (Window): crop in source pixels.
        size (int): output side in pixels.

    Returns:
        ndarray: (size, size), same dtype; output pixel (r, c) is the source pixel
        (window.y + floor((r + 0.5) * side / size), window.x + floor((c + 0.5) * side / size))
        (pixel centres aligned, as Pillow's NEAREST does). With side == size it is the crop.
    """
    rows = _source_indices(window.y, window.side, size)
    cols = _source_indices(window.x, window.side, size)
    return labels[rows[:, None], cols[None, :]]


def resample_image(image: np.ndarray, window: Window, size: int) -> np.ndarray:
    """Crop a uint8 image (H, W) or (H, W, C) to ``window`` and resize it to (size, size).

    Pillow's BILINEAR filter, pixel centres aligned (the same geometry as
    :func:`resample_labels`): bilinear interpolation when zooming in, a triangle filter
    over the covered source pixels (antialiased, area-like) when zooming out. With
    side == size the crop is returned unchanged.
    """
    crop = image[window.y:window.y + window.side, window.x:window.x + window.side]
    if window.side == size:
        return crop.copy()
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


def label_tracks(label_frames: Sequence[np.ndarray],
                 min_area: int = NUCLEI_VIDEO_MIN_AREA) -> Dict[int, List[Optional[np.ndarray]]]:
    """Per-object masks over a video from its per-frame label images.

    Args:
        label_frames: T label images (H, W), 0 = background, value = object identity.
        min_area (int): pixels; an object with fewer visible pixels in a frame is absent (None)
            in that frame.

    Returns:
        dict: label -> T entries, bool (H, W) mask or None, for every label present (with at
        least ``min_area`` pixels) in at least one frame; ascending label order.
    """
    labels = np.unique(np.concatenate([np.unique(f) for f in label_frames]))
    tracks = {}
    for label in labels[labels > 0]:
        masks = [frame == label for frame in label_frames]
        masks = [m if int(m.sum()) >= min_area else None for m in masks]
        if any(m is not None for m in masks):
            tracks[int(label)] = masks
    return tracks


def track_annotation(masks: Sequence[Optional[np.ndarray]], track_id: int, video_id: int,
                     category_id: int) -> dict:
    """One YouTube-VIS 2019 annotation (a track) from its T per-frame masks.

    Args:
        masks: T entries, (H, W) binary mask or None (absent); at least one is a mask.
        track_id, video_id, category_id (int): the json ids.

    Returns:
        dict with id, video_id, category_id, iscrowd 0, height, width, length 1 (as the
        YouTube-VIS files write it), and per frame: "segmentations" (compressed RLE, str
        counts, or None), "bboxes" ([x, y, w, h] float pixels or None), "areas" (int or None).
    """
    frames = [None if m is None else _mask_annotation(m) for m in masks]
    height, width = next(f for f in frames if f is not None)["segmentation"]["size"]
    return {
        "id": track_id, "video_id": video_id, "category_id": category_id, "iscrowd": 0,
        "height": height, "width": width, "length": 1,
        "segmentations": [None if f is None else f["segmentation"] for f in frames],
        "bboxes": [None if f is None else f["bbox"] for f in frames],
        "areas": [None if f is None else f["area"] for f in frames],
    }


def convert_nuclei_videos(image: np.ndarray, labels: np.ndarray, source: str = "",
                          license: str = "") -> Dict[str, ConvertedDataset]:
    """Build the "train" and "val" pseudo-video splits (YouTube-VIS 2019 format).

    Args:
        image (ndarray): (512, 512) intensity image, any numeric dtype; normalised over the
            whole image with ``normalize_to_uint8`` (as the image datasets' tiles), resampled
            with :func:`resample_image`, gray copied to 3 channels, PNG frames.
        labels (ndarray): (512, 512) integer label image (0 = background, value = nucleus),
            resampled with :func:`resample_labels`.
        source, license (str): provenance text stored in the json "info".

    Returns:
        dict: "train" / "val" -> ConvertedDataset whose ``coco`` is the YouTube-VIS json
        (videos, annotations, categories, info) and ``files`` maps "<video>/<t:05d>.png" to
        PNG bytes. Videos carry "windows" ([x, y, side] per frame, source pixels); tracks
        (category 1 "nucleus") carry "source_label", objects smaller than
        NUCLEI_VIDEO_MIN_AREA pixels in a frame are None there.

    Raises:
        ValueError: a training window touches the val quadrant or a val window leaves it, or
            a window leaves the image.
    """
    gray = normalize_to_uint8(image)
    height, width = labels.shape
    size = NUCLEI_VIDEO_FRAME
    quadrant = (*NUCLEI_VAL_XY, NUCLEI_TILE, NUCLEI_TILE)
    out = {}
    for split, paths in NUCLEI_VIDEO_PATHS.items():
        videos, annotations, files = [], [], {}
        for path in paths:
            windows = window_path(path)
            for w in windows:
                inside_image = w.x >= 0 and w.y >= 0 and w.x + w.side <= width \
                    and w.y + w.side <= height
                inside_val = (w.x >= quadrant[0] and w.y >= quadrant[1]
                              and w.x + w.side <= quadrant[0] + quadrant[2]
                              and w.y + w.side <= quadrant[1] + quadrant[3])
                if not inside_image or (windows_overlap(w, *quadrant) if split == "train"
                                        else not inside_val):
                    raise ValueError(f"{split} video {path.name}: window {tuple(w)} leaves "
                                     "the image or crosses the train / val boundary")
            video_id = len(videos) + 1
            names = [f"{path.name}/{t:05d}.png" for t in range(len(windows))]
            for name, w in zip(names, windows):
                frame = resample_image(gray, w, size)
                files[name] = _encode_png(np.repeat(frame[:, :, None], 3, axis=2))
            videos.append({"id": video_id, "width": size, "height": size,
                           "length": len(windows), "file_names": names,
                           "windows": [list(w) for w in windows]})
            tracks = label_tracks([resample_labels(labels, w, size) for w in windows])
            for label, masks in tracks.items():
                annotations.append({**track_annotation(masks, len(annotations) + 1, video_id, 1),
                                    "source_label": label})
        ytvis = {"info": _info(f"nuclei_dsb_video {split} (synthetic motion over a real image)",
                               source, license),
                 "videos": videos, "annotations": annotations,
                 "categories": [{"id": 1, "name": "nucleus"}]}
        out[split] = ConvertedDataset(ytvis, files)
    return out
