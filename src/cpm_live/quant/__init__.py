"""The quantized weight formats: the floor below ``layers`` (see docs/architecture.md).

- :mod:`cpm_live.quant.format`: one weight <-> bitsandbytes' packed 4-bit layout, settings, metadata.
- :mod:`cpm_live.quant.dequant`: 4-bit dequantization and the 4-bit matmul.
- :mod:`cpm_live.quant.int8`: one weight <-> bitsandbytes' int8 layout (``weight``, ``SCB``).

Nothing here imports the model or reads files; checkpoint files are :mod:`cpm_live.checkpoint`, the
tools built on the model (``quantize_state_dict``, ``export_checkpoint`` and their CLIs) :mod:`cpm_live.convert`.
"""
