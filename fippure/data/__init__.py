"""Datasets, clean-set splits, augmentation and batching."""

from fippure.data.augment import augment, random_crop, random_flip
from fippure.data.catalog import DATASETS, DatasetSpec, get_spec
from fippure.data.pipeline import (
    DeviceDataset,
    batch_from_permutation,
    denormalize,
    epoch_permutation,
    iterate_batches,
    normalize,
    to_device,
    to_unit_range,
)
from fippure.data.sources import ImageDataset, load_dataset
from fippure.data.splits import CleanSplit, check_clean_set, clean_set_size, split_clean_set

__all__ = [
    "DATASETS",
    "CleanSplit",
    "DatasetSpec",
    "DeviceDataset",
    "ImageDataset",
    "augment",
    "batch_from_permutation",
    "check_clean_set",
    "clean_set_size",
    "denormalize",
    "epoch_permutation",
    "get_spec",
    "iterate_batches",
    "load_dataset",
    "normalize",
    "random_crop",
    "random_flip",
    "split_clean_set",
    "to_device",
    "to_unit_range",
]
