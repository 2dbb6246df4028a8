"""Datasets (COCO json and the synthetic shapes set), mapping/augmentation and loaders."""

from detection.data.build import (
    Batch,
    build_test_loader,
    build_train_loader,
    checked_records,
    get_dataset_records,
)
from detection.data.catalog import (
    DatasetCatalog,
    get_metadata,
    register_coco_instances,
    register_dataset,
    set_datasets_root,
)
from detection.data.check import DataCheckError, check_records
from detection.data.coco import filter_images_without_annotations, load_coco_json
from detection.data.errors import DatasetError, ImageSizeError, InvalidAnnotationError
from detection.data.image_io import ImageReadError, read_image
from detection.data.mapper import DatasetMapper, MapDataset
from detection.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler
from detection.data.shapes import ensure_shapes_dataset

__all__ = [
    "Batch",
    "DataCheckError",
    "DatasetCatalog",
    "DatasetError",
    "DatasetMapper",
    "GroupedBatchSampler",
    "ImageReadError",
    "ImageSizeError",
    "InvalidAnnotationError",
    "InferenceSampler",
    "MapDataset",
    "TrainingSampler",
    "build_test_loader",
    "build_train_loader",
    "check_records",
    "checked_records",
    "ensure_shapes_dataset",
    "filter_images_without_annotations",
    "get_dataset_records",
    "get_metadata",
    "load_coco_json",
    "read_image",
    "register_coco_instances",
    "register_dataset",
    "set_datasets_root",
]
