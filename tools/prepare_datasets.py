#!/usr/bin/env python3
"""Build QueryInst's bundled datasets and print what was built.

Downloads the source packages once (``$QUERYINST_CACHE/packages``), converts them under the
datasets root (``--root``, default ``$DETECTRON2_DATASETS`` or ``./datasets``), loads each one
with the validated COCO or YouTube-VIS loader and prints name, images (frames for the video
sets), instances (track-frames for the video sets) and json path.
It also writes a 5-image Cityscapes sample in Cityscapes' layout to ``<root>/cityscapes_sample/
cityscapes/`` (``DETECTRON2_DATASETS=<root>/cityscapes_sample`` makes Detectron2's
``cityscapes_fine_instance_seg_train`` / ``_val`` read it), counted with Detectron2's
Cityscapes loader; its last column is the gtFine folder.
Already-built datasets are only checked. Exit code 0 on success.
With ``--config-file``, only the bundled datasets that the config's ``DATASETS.TRAIN`` and
``DATASETS.TEST`` name are built and listed (``make demo``: the PhC-C2DL-PSC sets alone, no
Cityscapes sample); a name there that is not bundled exits 2 with a message naming it.

Usage: ``python tools/prepare_datasets.py [--root DIR] [--config-file FILE]``
"""
import argparse
import os
import sys

# Use the package of this checkout, installed or not.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "projects", "QueryInst"))

import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets.cityscapes import load_cityscapes_instances  # noqa: E402

from queryinst import add_queryinst_config  # noqa: E402
from queryinst.config_loading import merge_config  # noqa: E402
from queryinst.data import (  # noqa: E402
    BUNDLED_DATASETS,
    datasets_root,
    register_bundled_datasets,
    write_cityscapes_sample,
)
from queryinst.video.data.builtin import (  # noqa: E402
    BUNDLED_VIDEO_DATASETS,
    register_bundled_video_datasets,
)


def _config_datasets(config_file: str) -> list:
    """The bundled datasets that ``DATASETS.TRAIN`` and ``DATASETS.TEST`` of a config name.

    Raises:
        ValueError: the config names a dataset that is not bundled (names it and the fix).
    """
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, config_file)
    names = list(dict.fromkeys(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST))
    unknown = [n for n in names if n not in BUNDLED_DATASETS and n not in BUNDLED_VIDEO_DATASETS]
    if unknown:
        raise ValueError(f"{config_file}: DATASETS names {unknown}, which are not bundled "
                         "datasets; run this script without --config-file to build all the "
                         "bundled ones, or register your own (docs/datasets.md)")
    return names


def _row(name: str) -> tuple:
    """(name, images, instances, json) of a registered bundled dataset, read and checked."""
    dicts = DatasetCatalog.get(name)  # built if needed, validated, counts checked
    if name in BUNDLED_VIDEO_DATASETS:  # one dict per video, one object list per frame
        images = sum(d["length"] for d in dicts)
        instances = sum(len(f) for d in dicts for f in d["annotations"])
    else:
        images, instances = len(dicts), sum(len(d["annotations"]) for d in dicts)
    return name, str(images), str(instances), MetadataCatalog.get(name).json_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="build only the bundled datasets this config trains or tests on")
    args = parser.parse_args(argv)

    register_bundled_datasets(args.root)
    register_bundled_video_datasets(args.root)
    if args.config_file:
        try:
            names = _config_datasets(args.config_file)
        except ValueError as e:
            parser.error(str(e))  # exit code 2
    else:  # each is built by its first DatasetCatalog.get, in _row
        names = list(BUNDLED_DATASETS) + list(BUNDLED_VIDEO_DATASETS)
    rows = [("name", "images", "instances", "json")] + [_row(name) for name in names]
    if not args.config_file:
        sample = write_cityscapes_sample(os.path.join(datasets_root(args.root),
                                                      "cityscapes_sample"))
        for split in ("train", "val"):  # Detectron2's own loader, as its built-in datasets use
            folder = os.path.join(sample["root"], "cityscapes")
            gt_dir = os.path.join(folder, "gtFine", split)
            dicts = load_cityscapes_instances(os.path.join(folder, "leftImg8bit", split), gt_dir)
            rows.append((f"cityscapes_sample ({split})", str(len(dicts)),
                         str(sum(len(d["annotations"]) for d in dicts)), gt_dir))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
