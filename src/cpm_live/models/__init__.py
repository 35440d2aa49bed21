"""CPM-Bee model and config, at the original import path ``cpm_live.models``."""

from cpm_live.config import ConfigError, CPMBeeConfig
from cpm_live.models.bee import CPMBee, quantized_weight_keys

# CPM-Bee's plain-torch model class (``text_generation.py`` imports it); here the one model is plain torch.
CPMBeeTorch = CPMBee

__all__ = ["CPMBee", "CPMBeeConfig", "CPMBeeTorch", "ConfigError", "quantized_weight_keys"]
