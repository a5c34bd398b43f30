"""Reading images, 16-bit and float ones included, as Detectron2's ``read_image`` does for 8-bit.

Detectron2's ``read_image`` converts with PIL (``Image.convert("RGB")``), which clips every
value above 255: a 16-bit grayscale PNG whose data fill the 16-bit range comes out white, one
from a 12-bit camera mostly white, and float TIFFs in [0, 1] black. :func:`read_image` reads
those images with one stated rule instead (:func:`normalize_to_uint8`); every other image is
read exactly as Detectron2 reads it.
"""
from __future__ import annotations

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["HIGH_BIT_DEPTH_MODES", "normalize_to_uint8", "read_image"]

# PIL modes of single-channel images with more than 8 bits: 16-bit integer (PNG, TIFF; the
# byte-order variants), 32-bit integer, 32-bit float (TIFF). PIL has no multi-channel
# 16-bit mode: it reads a 48-bit RGB PNG as 8-bit "RGB" itself.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# The percentiles mapped to 0 and 255 (see normalize_to_uint8).
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.8


def normalize_to_uint8(image: np.ndarray, low_pct: float = LOW_PERCENTILE,
                       high_pct: float = HIGH_PERCENTILE) -> np.ndarray:
    """Map an intensity image to uint8 by a linear stretch of two of its own percentiles.

    The rule: the ``low_pct`` and ``high_pct`` percentiles of the image (numpy's linear
    interpolation; NaNs ignored) become 0 and 255, values in between are scaled linearly,
    values beyond are clipped, then rounded. Defaults 1 and 99.8: the normalisation of
    CSBDeep / StarDist (``normalize(x, 1, 99.8)``), and the one that made the bundled nuclei
    tiles from their uint16 source, so a raw 16-bit microscope image gets the input
    distribution the bundled model was trained on.

    Why per image rather than a fixed ``>> 8``: the rule does not depend on the bit depth the
    data really use (a 12-bit camera in a 16-bit file, the bundled source whose values stop
    at 235, a float image in [0, 1] or in photon counts all give a full-contrast image), and
    percentiles rather than min / max keep a few hot pixels from darkening the whole image.
    The cost: intensities are not comparable between images, and an image that already uses
    its whole range is contrast-stretched by up to 1% / 0.2% clipping.

    Args:
        image (ndarray): (H, W) or (H, W, C) array of any real dtype; the percentiles are
            taken over all its values (all channels together).
        low_pct, high_pct (float): percentiles in [0, 100] mapped to 0 and 255.

    Returns:
        ndarray: uint8 array of the same shape. A constant image gives zeros; NaN gives 0.
    """
    data = image.astype(np.float64)
    lo, hi = np.nanpercentile(data, [low_pct, high_pct])
    scaled = (data - lo) / max(hi - lo, 1e-12)
    scaled = np.nan_to_num(np.clip(scaled, 0.0, 1.0), nan=0.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def read_image(file_name: str, format: str = None) -> np.ndarray:
    """Read an image like Detectron2's ``detection_utils.read_image``, 16-bit and float too.

    8-bit images (any PIL mode other than :data:`HIGH_BIT_DEPTH_MODES`) give exactly what
    Detectron2's ``read_image`` gives. Single-channel 16-bit, 32-bit integer and float
    images (PIL modes "I;16*", "I", "F": 16-bit PNG / TIFF, float32 TIFF) are mapped to
    uint8 by :func:`normalize_to_uint8` (linear stretch of the image's 1st..99.8th
    percentiles to 0..255) and then converted like an 8-bit grayscale ("L") image. EXIF
    orientation is applied in both cases, as Detectron2 does.

    Args:
        file_name (str): image path (anything Detectron2's ``PathManager`` opens).
        format (str or None): as in Detectron2: a PIL mode, "BGR" or "YUV-BT.601"; None
            keeps the file's mode (for a high-bit-depth file: the normalised uint8 "L").

    Returns:
        ndarray: (H, W, C) uint8 for "BGR" / "RGB" (C = 3) or "L" (C = 1), as Detectron2's
        ``read_image``; float for "YUV-BT.601".

    Raises:
        OSError / PIL.UnidentifiedImageError: the file is missing or not an image (PIL's).
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = utils._apply_exif_orientation(image)  # Detectron2's, as in its read_image
        if image.mode in HIGH_BIT_DEPTH_MODES:
            image = Image.fromarray(normalize_to_uint8(np.asarray(image)))  # "L"
        return utils.convert_PIL_to_numpy(image, format)
