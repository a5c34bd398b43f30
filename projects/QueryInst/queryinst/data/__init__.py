"""Datasets: checked COCO-format loading, config checks, image reading, bundled datasets,
Cityscapes (a real sample in its layout, a check of its files); the dataset mapper and the
resumable training loader.

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
from .checks import (
    ClassCountError,
    check_config_datasets,
    check_dataset,
    check_num_classes_keys,
    input_size_note,
)
from .class_names import dataset_class_names, model_metadata, record_class_names
from .cityscapes import MissingPackageError, check_cityscapes_dataset, write_cityscapes_sample
from .coco_format import (
    DatasetFormatError,
    load_coco_instances,
    register_coco_instances_checked,
    validate_coco_instances,
)
from .dataset_mapper import QueryInstDatasetMapper, build_train_augmentation
from .dataset_option import (
    DatasetSpec,
    add_dataset_argument,
    parse_dataset_spec,
    register_dataset_specs,
)
from .image_io import read_image, to_uint8
from .package_files import (
    PackageFetchError,
    download_package,
    package_cache_dir,
    read_package_files,
)
from .train_loader import build_resumable_train_loader

__all__ = [
    "BUNDLED_DATASETS",
    "BundledDataset",
    "ClassCountError",
    "DatasetFormatError",
    "DatasetSpec",
    "MissingPackageError",
    "PackageFetchError",
    "QueryInstDatasetMapper",
    "add_dataset_argument",
    "build_resumable_train_loader",
    "build_train_augmentation",
    "check_cityscapes_dataset",
    "check_config_datasets",
    "check_dataset",
    "check_num_classes_keys",
    "dataset_class_names",
    "datasets_root",
    "download_package",
    "input_size_note",
    "load_coco_instances",
    "model_metadata",
    "package_cache_dir",
    "parse_dataset_spec",
    "prepare_bundled_datasets",
    "read_image",
    "read_package_files",
    "record_class_names",
    "write_cityscapes_sample",
    "register_bundled_datasets",
    "register_coco_instances_checked",
    "register_dataset_specs",
    "to_uint8",
    "validate_coco_instances",
]
