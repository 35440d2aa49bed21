"""4-bit quantization of CPM-Bee checkpoints.

- :mod:`cpm_live.quant.format`: one weight <-> bitsandbytes' packed layout, settings, metadata.
- :mod:`cpm_live.quant.stream`: streaming safetensors writer.
- :mod:`cpm_live.quant.compress`: ``quantize_state_dict`` (the ``cpm-bee-quantize`` CLI is in ``cli``).
- :mod:`cpm_live.quant.export`: ``export_checkpoint`` (``cpm-bee-export``).

Import the submodules directly: ``Linear4bit`` imports ``format`` while ``compress`` and ``export``
import the model, so importing them here would be circular.
"""
