"""Resumable training checkpoints.

A checkpoint is a directory ``<save>/checkpoints/step-XXXXXXXX/`` holding

- ``trainable.safetensors``: the trainable weights (LoRA, or the whole model for full fine-tuning),
- ``optimizer.pt``: optimizer and loss-scaler state, from the engine,
- ``trainer.pt``: step, epoch, best eval loss, patience, data position,
- ``rng-rank<R>.pt``: each rank's torch / numpy / python RNG states.

Every rank writes into ``step-X.partial`` first; rank 0 renames it once all ranks are done and then
updates the ``latest`` pointer, so a crash at any moment leaves the previous checkpoint intact.
``.pt`` files hold only tensors and plain containers and are read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cpm_live.utils import atomic_path, atomic_write_text

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"


def checkpoint_root(save_dir: str) -> str:
    return os.path.join(save_dir, "checkpoints")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(engine, save_dir: str, step: int, trainable: dict[str, torch.Tensor] | None,
                    optimizer_state: dict[str, Any] | None, trainer_state: dict[str, Any],
                    keep: int = 2) -> str:
    """Write checkpoint ``step`` (collective: every rank calls it). Returns its directory."""
    root = checkpoint_root(save_dir)
    final = os.path.join(root, f"step-{step:08d}")
    partial = final + ".partial"
    if engine.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    engine.barrier()
    torch.save(rng_state(), os.path.join(partial, f"rng-rank{engine.rank}.pt"))
    if engine.is_main:
        save_file(trainable, os.path.join(partial, TRAINABLE_FILE))
        torch.save(optimizer_state, os.path.join(partial, OPTIMIZER_FILE))
        torch.save(trainer_state, os.path.join(partial, TRAINER_FILE))
    engine.barrier()
    if engine.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        atomic_write_text(os.path.join(root, LATEST_FILE), os.path.basename(final) + "\n")
        _prune(root, keep)
    engine.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".partial"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def find_checkpoint(resume: str, save_dir: str | None) -> str | None:
    """Resolve ``--resume``: 'auto' gives the latest complete checkpoint under save_dir (or None)."""
    if resume != "auto":
        if not os.path.isfile(os.path.join(resume, TRAINER_FILE)):
            raise FileNotFoundError(
                f"--resume {resume}: not a training checkpoint (no {TRAINER_FILE}); pass a "
                f"<save>/checkpoints/step-* directory or 'auto'"
            )
        return resume
    root = checkpoint_root(save_dir)
    pointer = os.path.join(root, LATEST_FILE)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        path = os.path.join(root, f.read().strip())
    return path if os.path.isfile(os.path.join(path, TRAINER_FILE)) else None


def load_checkpoint(path: str, rank: int) -> dict[str, Any]:
    """Read a checkpoint's files; RNG of this rank (or rank 0's if the world grew)."""
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.exists(rng_file):
        rng_file = os.path.join(path, "rng-rank0.pt")
    return {
        "trainable": load_file(os.path.join(path, TRAINABLE_FILE)),
        "optimizer": torch.load(os.path.join(path, OPTIMIZER_FILE), weights_only=True),
        "trainer": torch.load(os.path.join(path, TRAINER_FILE), weights_only=True),
        "rng": torch.load(rng_file, weights_only=True),
    }


def save_weights_pt(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """A plain ``{key: tensor}`` .pt in the original CPM-Bee layout (loads into the original code)."""
    with atomic_path(path) as tmp:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, tmp)
