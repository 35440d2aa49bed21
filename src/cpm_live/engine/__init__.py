"""Distributed engines: one interface (:class:`Engine`), a torch FSDP2 back end and a BMTrain one.

bmtrain is imported only by ``cpm_live.engine.bmtrain_engine``, and only when that engine is chosen.
"""

from cpm_live.engine.base import Engine, recompute_activations
from cpm_live.engine.factory import ENGINES, EngineArgs, add_engine_args, engine_from_args, get_engine
from cpm_live.engine.inspect import format_summary, inspect_model, local_parameter_bytes
from cpm_live.errors import EngineError

__all__ = [
    "ENGINES", "Engine", "EngineArgs", "EngineError", "add_engine_args", "engine_from_args", "format_summary",
    "get_engine", "inspect_model", "local_parameter_bytes", "recompute_activations",
]
