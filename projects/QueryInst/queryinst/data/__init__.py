"""Datasets: checked COCO-format loading, and real datasets bundled from registry packages.

Importing this package registers the bundled datasets (``nuclei_dsb_train``,
``nuclei_dsb_val``, ``voc_mini``) with Detectron2; nothing is read or downloaded until one
of them is first loaded.
"""
from .builtin import (
    BUNDLED_DATASETS,
    BundledDataset,
    datasets_root,
    prepare_bundled_datasets,
    register_bundled_datasets,
)
from .coco_format import (
    DatasetFormatError,
    load_coco_instances,
    register_coco_instances_checked,
    validate_coco_instances,
)
from .package_files import (
    PackageFetchError,
    download_package,
    package_cache_dir,
    read_package_files,
)

__all__ = [
    "BUNDLED_DATASETS",
    "BundledDataset",
    "DatasetFormatError",
    "PackageFetchError",
    "datasets_root",
    "download_package",
    "load_coco_instances",
    "package_cache_dir",
    "prepare_bundled_datasets",
    "read_package_files",
    "register_bundled_datasets",
    "register_coco_instances_checked",
    "validate_coco_instances",
]
