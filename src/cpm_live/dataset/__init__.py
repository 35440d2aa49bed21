"""Compatibility re-export: CPM-Bee's ``preprocess_dataset.py`` imports ``build_dataset`` and
``shuffle_dataset`` from ``cpm_live.dataset``. The readers and writers live in :mod:`cpm_live.data`."""

from cpm_live.data.distributed_dataset import DistributedDataset, FileInfo, SimpleDataset, build_dataset
from cpm_live.data.jsonl import JsonlDataset
from cpm_live.data.serializer import (
    AutoSerializer,
    JsonSerializer,
    PickleSerializer,
    RawSerializer,
    Serializer,
    safe_pickle_loads,
)
from cpm_live.data.shuffle import shuffle_dataset
from cpm_live.errors import DataFormatError, UnsafePickleError

__all__ = [
    "AutoSerializer", "DataFormatError", "DistributedDataset", "FileInfo", "JsonSerializer", "JsonlDataset",
    "PickleSerializer", "RawSerializer", "Serializer", "SimpleDataset", "UnsafePickleError", "build_dataset",
    "safe_pickle_loads", "shuffle_dataset",
]
