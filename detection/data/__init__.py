"""Datasets (COCO json and the synthetic shapes set), mapping/augmentation and loaders."""

from detection.data.build import build_test_loader, build_train_loader, get_dataset_records
from detection.data.catalog import (
    DatasetCatalog,
    get_metadata,
    register_coco_instances,
    register_dataset,
    set_datasets_root,
)
from detection.data.coco import filter_images_without_annotations, load_coco_json
from detection.data.image_io import ImageReadError, read_image
from detection.data.mapper import DatasetMapper, MapDataset
from detection.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler
from detection.data.shapes import ensure_shapes_dataset

__all__ = [
    "DatasetCatalog",
    "DatasetMapper",
    "GroupedBatchSampler",
    "ImageReadError",
    "InferenceSampler",
    "MapDataset",
    "TrainingSampler",
    "build_test_loader",
    "build_train_loader",
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
