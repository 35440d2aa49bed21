"""Checkpoint tools built on the model, the checkpoint loader and LoRA (a floor above them).

- :mod:`cpm_live.convert.compress`: ``quantize_state_dict`` (the ``cpm-bee-quantize`` CLI is in ``cli``).
- :mod:`cpm_live.convert.export`: ``export_checkpoint`` (``cpm-bee-export``).
"""
