"""The 4-bit checkpoint format: the floor below ``layers`` (see docs/architecture.md).

- :mod:`cpm_live.quant.format`: one weight <-> bitsandbytes' packed layout, settings, metadata.
- :mod:`cpm_live.quant.stream`: streaming safetensors writer.

Nothing here imports the model; the tools built on the model (``quantize_state_dict``,
``export_checkpoint`` and their CLIs) are in :mod:`cpm_live.convert`.
"""
