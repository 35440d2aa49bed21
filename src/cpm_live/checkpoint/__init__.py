"""Every file format a run reads or writes, and the loader that puts weights into a model.

- :mod:`~cpm_live.checkpoint.safe_load`: ``safe_torch_load``, the one ``torch.load`` of the package.
- :mod:`~cpm_live.checkpoint.readers`: ``open_checkpoint`` for ``.pt``, safetensors (dense or
  compressed), the qlora PR's files (:mod:`~cpm_live.checkpoint.qlora_pr`) and Hugging Face model
  directories (:mod:`~cpm_live.checkpoint.hf_dir`, which also resolves a run's model config).
- :mod:`~cpm_live.checkpoint.writer`: the streaming safetensors writer and ``save_state_dict``.
- :mod:`~cpm_live.checkpoint.load`: ``check_checkpoint``, ``load_model_weights``, ``build_model``.
- :mod:`~cpm_live.checkpoint.adapters`: LoRA adapter files (peft's format, CPM-Bee's deltas).
- :mod:`~cpm_live.checkpoint.resume`: a training run's resume directories.
"""

from cpm_live.checkpoint.load import build_model, check_checkpoint, check_finite, check_keys, load_model_weights
from cpm_live.checkpoint.readers import (
    CheckpointReader,
    ModelDirReader,
    is_safetensors,
    open_checkpoint,
    read_metadata,
    read_state_dict,
)
from cpm_live.checkpoint.safe_load import RefusedPickle, safe_torch_load
from cpm_live.checkpoint.writer import SafetensorsWriter, save_state_dict
from cpm_live.errors import CheckpointError

__all__ = [
    "CheckpointError", "CheckpointReader", "ModelDirReader", "RefusedPickle", "SafetensorsWriter", "build_model",
    "check_checkpoint", "check_finite", "check_keys", "is_safetensors", "load_model_weights", "open_checkpoint",
    "read_metadata", "read_state_dict", "safe_torch_load", "save_state_dict",
]
