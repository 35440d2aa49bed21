"""Training data: the CPM-Bee binary dataset format, jsonl files, and safe record serializers."""

from .distributed_dataset import DistributedDataset, FileInfo, SimpleDataset, build_dataset
from .errors import DataFormatError
from .jsonl import JsonlDataset
from .serializer import (
    AutoSerializer,
    JsonSerializer,
    PickleSerializer,
    RawSerializer,
    Serializer,
    UnsafePickleError,
    safe_pickle_loads,
)
from .utils import shuffle_dataset

__all__ = [
    "AutoSerializer",
    "DataFormatError",
    "DistributedDataset",
    "FileInfo",
    "JsonSerializer",
    "JsonlDataset",
    "PickleSerializer",
    "RawSerializer",
    "Serializer",
    "SimpleDataset",
    "UnsafePickleError",
    "build_dataset",
    "safe_pickle_loads",
    "shuffle_dataset",
]
