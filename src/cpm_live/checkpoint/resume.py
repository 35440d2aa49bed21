"""Resumable training checkpoints.

A checkpoint is a directory ``<save>/checkpoints/step-XXXXXXXX/`` holding

- ``trainable.safetensors``: the trainable weights (LoRA, or the whole model for full fine-tuning),
- ``optimizer.pt``: optimizer and loss-scaler state, from the engine,
- ``trainer.pt``: step, epoch, best eval loss, patience, data position,
- ``rng-rank<R>.pt``: each rank's torch / numpy / python RNG states.

Every rank writes into ``step-X.partial`` first; rank 0 renames it once all ranks are done and then
updates the ``latest`` pointer, so a crash at any moment leaves the previous checkpoint intact.
``.pt`` files hold only tensors and plain containers and are read with ``weights_only=True``.

The history is append-only until a newer complete checkpoint exists: pruning only removes
checkpoints older than the one just completed. ``latest`` is advisory (for people and old tools);
``--resume auto`` takes the newest *complete* ``step-*`` directory, whatever ``latest`` says. One
run at a time owns a save directory (:class:`SaveDirLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cpm_live.checkpoint.safe_load import RefusedPickle, safe_torch_load
from cpm_live.errors import CheckpointError, MissingFileError, OutputError, TrainingError
from cpm_live.outputs import open_no_follow
from cpm_live.utils import atomic_path, atomic_write_text

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"step-(\d+)")
_LEFTOVER = re.compile(r"step-\d+\.(partial|replaced)")
_ELSEWHERE = "resume from another checkpoint (`resume` <save>/checkpoints/step-*)"


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
        os.makedirs(root, exist_ok=True)
        remove_leftovers(root)  # the save dir is locked by this run: any .partial is a crash's
        os.makedirs(partial)
    engine.barrier()
    files = [(f"rng-rank{engine.rank}.pt", torch.save, rng_state())]
    if engine.is_main:
        files += [(TRAINABLE_FILE, save_file, trainable), (OPTIMIZER_FILE, torch.save, optimizer_state),
                  (TRAINER_FILE, torch.save, trainer_state)]
    for name, write, value in files:
        with writing(os.path.join(partial, name), remove=partial if engine.is_main else None):
            write(value, os.path.join(partial, name))
    engine.barrier()
    if engine.is_main:
        if os.path.exists(final):
            # The same step again: the old copy stays complete (renamed aside) until the new one is
            # in place, so a kill in between still leaves a resumable checkpoint of this step.
            aside = final + ".replaced"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(partial, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(partial, final)
        atomic_write_text(os.path.join(root, LATEST_FILE), os.path.basename(final) + "\n")
        _prune(root, keep, step)
    engine.barrier()
    return final


@contextlib.contextmanager
def writing(path: str, remove: str | None = None) -> Iterator[None]:
    """Turn a failed write under ``path`` into one line naming it and the free space left (torch reports a
    full disk as "[enforce fail at inline_container.cc] unexpected pos", safetensors as an I/O error);
    ``remove`` (the half-written directory) is deleted first, so the space it took comes back."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        where = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(where):
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free / 2**20
        raise TrainingError(f"cannot write {path} ({reason}): is the disk full? {free:.0f} MiB free there; free "
                            f"space or `save` elsewhere, then `resume` auto (earlier checkpoints are intact)") from None


def remove_leftovers(root: str) -> None:
    """Delete ``step-*.partial`` / ``.replaced`` dirs a killed save left behind (call with the lock held)."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if _LEFTOVER.fullmatch(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (TRAINABLE_FILE, OPTIMIZER_FILE, TRAINER_FILE,
                                                                "rng-rank0.pt"))


def complete_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete ``step-*`` checkpoint under ``save_dir``, oldest first."""
    root = checkpoint_root(save_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.fullmatch(name)
        if match and _is_complete(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def _prune(root: str, keep: int, newest: int) -> None:
    """Keep the ``keep`` newest checkpoints up to step ``newest``; never touch a later one."""
    if keep <= 0:
        return
    older = [path for step, path in complete_checkpoints(os.path.dirname(root)) if step < newest]
    for path in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(resume: str, save_dir: str | None, warn: Callable[[str], None] = print) -> str | None:
    """Resolve ``--resume``: 'auto' gives the newest complete checkpoint under save_dir (or None).

    ``latest`` is only compared, never followed: a pointer to a deleted, half-written or foreign
    directory (an absolute path, ``../..``) cannot send the run there or back to step 0.
    """
    if resume != "auto":
        if not os.path.isfile(os.path.join(resume, TRAINER_FILE)):
            raise MissingFileError(
                f"`resume` {resume}: not a training checkpoint (no {TRAINER_FILE}); pass a "
                f"<save>/checkpoints/step-* directory or 'auto'"
            )
        return resume
    found = complete_checkpoints(save_dir)
    if not found:
        return None
    newest = found[-1][1]
    pointer = os.path.join(checkpoint_root(save_dir), LATEST_FILE)
    named = None
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8", errors="replace") as f:
            named = f.read(256).strip()
    if named != os.path.basename(newest):
        warn(f"warning: {pointer} names {named!r}, which is not the newest complete checkpoint; "
             f"resuming from {newest}")
    return newest


def check_history(resume_path: str | None, save_dir: str | None, outputs: Sequence[str] = ()) -> None:
    """Refuse to start where this run would destroy or fork an earlier run's checkpoint history, or (a
    run that does not resume) replace ``outputs``, the files it writes under ``save_dir``, of an earlier
    run."""
    if not save_dir:
        return
    found = complete_checkpoints(save_dir)
    earlier = [name for name in outputs if os.path.lexists(os.path.join(save_dir, name))]
    if not found and earlier:
        raise TrainingError(
            f"`save` {save_dir} already holds {os.path.join(save_dir, earlier[0])} of an earlier run (and no "
            f"checkpoint to continue it from), which this run would replace; choose another `save` directory, "
            f"or move that run's files away"
        )
    if not found:
        return
    newest_step, newest = found[-1]
    if resume_path is None:
        raise TrainingError(
            f"`save` {save_dir} already holds checkpoints of an earlier run (newest {newest}); pass "
            f"`resume` auto to continue it, or choose another `save` directory"
        )
    resumed = _read(_load_pt, os.path.join(resume_path, TRAINER_FILE))["step"]
    if resumed < newest_step:
        raise TrainingError(
            f"`resume` {resume_path} is step {resumed} but `save` {save_dir} already holds the later "
            f"{newest}; continuing would mix two histories: pass `resume` auto, or save into another `save`"
        )


def data_fingerprint(path: str) -> str:
    """Size and hash of the first and last MiB of each data file: an edit changes it, so a resume does
    not jump to an old byte offset of new data (whole-file hashes would take minutes on a corpus)."""
    import hashlib

    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))) \
        if os.path.isdir(path) else []
    digest = hashlib.sha256()
    for name in files:
        size = os.path.getsize(name)
        digest.update(f"{os.path.basename(name)}:{size}".encode())
        with open(name, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def compare_run(saved: dict[str, Any] | None, current: dict[str, Any], path: str,
                warn: Callable[[str], None]) -> None:
    """Refuse a resume into other model, LoRA, length or data settings; warn when the batch changes.

    ``saved`` is the ``run`` entry of the checkpoint's trainer state (absent in older checkpoints).
    """
    if not saved:
        return
    old, new = _flat(saved), _flat(current)
    # A setting the checkpoint did not record (an older version wrote it) cannot be compared.
    changed = {k: (old[k], new.get(k)) for k in old if old[k] != new.get(k)}
    if changed:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise TrainingError(f"cannot resume {path} with other settings ({detail}); use the checkpoint's "
                            f"settings and data, or start a new run in another `save` directory")
    if saved.get("batch") != current["batch"]:
        old, new = saved.get("batch") or {}, current["batch"]
        warn(f"warning: resuming {path} with another batch geometry (checkpoint {old}, now {new}): global "
             f"batch {_global(old)} -> {_global(new)} rows per step; the loss curve will not continue exactly")


def _flat(run: dict[str, Any]) -> dict[str, Any]:
    """The run settings by the names a user sets them: config keys as they are (``int4_quant_type``),
    LoRA settings as ``lora_r`` ...; the batch geometry (only warned about) left out."""
    flat: dict[str, Any] = {}
    for key, value in run.items():
        if key in ("model", "lora") and isinstance(value, dict):
            flat.update(value if key == "model" else {f"lora_{k}": v for k, v in value.items()})
        elif key != "batch":
            flat[key] = value
    flat.setdefault("lora", "on" if isinstance(run.get("lora"), dict) else None)
    return flat


def _global(batch: dict[str, int]) -> int | None:
    keys = ("batch_size", "world_size", "accumulation")
    return batch[keys[0]] * batch[keys[1]] * batch[keys[2]] if all(k in batch for k in keys) else None


class SaveDirLock:
    """Exclusive ownership of a save directory by one run (rank 0 holds it).

    An ``flock`` on ``<save>/.lock``: the kernel drops it when the holding process exits or is killed,
    so a crashed run never leaves a stale lock; to take over from a hung run, stop the process the
    message names. The file's text (pid, host, start time) only serves that message.
    """

    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_FILE)
        try:
            fd = open_no_follow(self.path)
        except OutputError as e:
            raise TrainingError(f"`save` {save_dir}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", errors="replace").strip() or "unknown process"
            os.close(fd)
            raise TrainingError(
                f"`save` {save_dir} is in use by another run ({holder}, lock {self.path}); wait for it, stop "
                f"that process, or choose another `save` directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.ctime()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def load_checkpoint(path: str, rank: int) -> dict[str, Any]:
    """Read a checkpoint's files; RNG of this rank (or rank 0's if the world grew)."""
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.exists(rng_file):
        rng_file = os.path.join(path, "rng-rank0.pt")
    return {
        "trainable": _read(load_file, os.path.join(path, TRAINABLE_FILE)),
        "optimizer": _read(_load_pt, os.path.join(path, OPTIMIZER_FILE)),
        "trainer": _read(_load_pt, os.path.join(path, TRAINER_FILE)),
        "rng": _read(_load_pt, rng_file),
    }


def _load_pt(path: str) -> Any:
    return safe_torch_load(path)


def _read(load: Callable[[str], Any], path: str) -> Any:
    """One checkpoint file; any failure (damage, or a pickle asking for code, which is never run) is
    one line naming the file."""
    try:
        return load(path)
    except RefusedPickle as e:
        raise TrainingError(f"cannot read checkpoint file {path}: it holds objects other than tensors and plain "
                            f"data ({e.refused}), which are never unpickled; {_ELSEWHERE}") from None
    except CheckpointError as e:
        raise TrainingError(f"{e}; {_ELSEWHERE}") from None
    except Exception as e:  # safetensors reports damage as several exception types
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise TrainingError(f"cannot read checkpoint file {path}: {reason}; {_ELSEWHERE}") from None


def save_weights_pt(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """A plain ``{key: tensor}`` .pt in the original CPM-Bee layout (loads into the original code)."""
    with writing(path), atomic_path(path) as tmp:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, tmp)
