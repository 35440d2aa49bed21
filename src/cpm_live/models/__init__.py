"""CPM-Bee model and config, at the original import path ``cpm_live.models``."""

from cpm_live.models.bee import CPMBee
from cpm_live.models.config import ConfigError, CPMBeeConfig

__all__ = ["CPMBee", "CPMBeeConfig", "ConfigError"]
