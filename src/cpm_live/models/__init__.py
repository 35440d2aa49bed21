"""CPM-Bee model and config, at the original import path ``cpm_live.models``."""

from cpm_live.config import ConfigError, CPMBeeConfig
from cpm_live.models.bee import CPMBee

__all__ = ["CPMBee", "CPMBeeConfig", "ConfigError"]
