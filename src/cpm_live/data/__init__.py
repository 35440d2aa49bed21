"""The data path, in the order a record travels: read -> encode -> pack -> tensors.

- read: :mod:`~cpm_live.data.jsonl` (``.jsonl`` files), :mod:`~cpm_live.data.distributed_dataset`
  (CPM-Bee's binary datasets, sharded by block across ranks) and the record
  :mod:`~cpm_live.data.serializer` (JSON, or legacy pickles read as plain data only);
  :mod:`~cpm_live.data.preprocess` and :mod:`~cpm_live.data.shuffle` write binary datasets.
- encode: :mod:`~cpm_live.data.encode`, a nested JSON sample -> token ids, segments and their
  relations (CPM-Bee's ``convert_data_to_id``); training and generation both use it.
- pack: :mod:`~cpm_live.data.pack`, samples packed into fixed-length rows, the resumable
  fine-tuning dataset.
- tensors: :mod:`~cpm_live.data.tensors`, the typed batch whose field names are ``CPMBee``'s
  parameters.
"""

from cpm_live.data.distributed_dataset import DistributedDataset, FileInfo, SimpleDataset, build_dataset
from cpm_live.data.encode import ExtTableStates, convert_data_to_id, rel_to_bucket
from cpm_live.data.jsonl import JsonlDataset, answered_records
from cpm_live.data.pack import BatchPacker, CPMBeeBatch, FinetuneDataset, open_record_source
from cpm_live.data.serializer import (
    AutoSerializer,
    JsonSerializer,
    PickleSerializer,
    RawSerializer,
    Serializer,
    safe_pickle_loads,
)
from cpm_live.data.shuffle import shuffle_dataset
from cpm_live.data.tensors import IGNORE_INDEX, CPMBeeInputs, LabelledInputs
from cpm_live.errors import DataFormatError, SampleTooLong, UnsafePickleError

__all__ = [
    "IGNORE_INDEX", "AutoSerializer", "BatchPacker", "CPMBeeBatch", "CPMBeeInputs", "DataFormatError",
    "DistributedDataset", "ExtTableStates", "FileInfo", "FinetuneDataset", "JsonSerializer", "JsonlDataset",
    "LabelledInputs", "PickleSerializer", "RawSerializer", "SampleTooLong", "Serializer", "SimpleDataset",
    "UnsafePickleError", "answered_records", "build_dataset", "convert_data_to_id", "open_record_source",
    "rel_to_bucket", "safe_pickle_loads", "shuffle_dataset",
]
