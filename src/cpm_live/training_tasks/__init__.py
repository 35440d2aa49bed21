"""Compatibility re-export: CPM-Bee's ``finetune_cpm_bee.py`` imports ``FinetuneDataset`` from
``cpm_live.training_tasks.bee``. The data path lives in :mod:`cpm_live.data`."""
