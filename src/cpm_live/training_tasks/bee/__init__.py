"""CPM-Bee data tasks: JSON sample -> ids (`convert_data_to_id`) and batch packing (`FinetuneDataset`)."""

from .finetune import BatchPacker, CPMBeeBatch, FinetuneDataset, open_record_source
from .pretrain import ExtTableStates, SampleTooLong, convert_data_to_id, rel_to_bucket

__all__ = [
    "BatchPacker",
    "CPMBeeBatch",
    "ExtTableStates",
    "FinetuneDataset",
    "SampleTooLong",
    "convert_data_to_id",
    "open_record_source",
    "rel_to_bucket",
]
