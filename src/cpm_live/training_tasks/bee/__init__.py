"""Compatibility re-export of CPM-Bee's ``cpm_live.training_tasks.bee`` (its ``finetune_cpm_bee.py``
imports ``FinetuneDataset`` here): encoding is :mod:`cpm_live.data.encode`, packing :mod:`cpm_live.data.pack`."""

from cpm_live.data.encode import ExtTableStates, convert_data_to_id, rel_to_bucket
from cpm_live.data.pack import BatchPacker, CPMBeeBatch, FinetuneDataset, open_record_source
from cpm_live.errors import SampleTooLong

__all__ = [
    "BatchPacker", "CPMBeeBatch", "ExtTableStates", "FinetuneDataset", "SampleTooLong", "convert_data_to_id",
    "open_record_source", "rel_to_bucket",
]
