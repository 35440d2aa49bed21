"""Small helpers shared across the package: atomic file writes, the plain-tensor check of writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or exception leaves ``path`` as it was (old content or absent) and removes the temp file,
    so readers never see a half-written file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    _remove_stale_temps(directory, prefix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    # Held while writing: it marks the temp file as live, so a later writer of the same path removes
    # only the temp files of writers that died (kill -9 skips the cleanup below).
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        os.close(fd)


def _remove_stale_temps(directory: str, prefix: str) -> None:
    for name in os.listdir(directory):
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        stale = os.path.join(directory, name)
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its writer is gone: nobody holds the lock
            os.remove(stale)
        except OSError:
            pass  # locked by a live writer (or already gone)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def non_plain_tensors(state: Mapping[str, object]) -> list[str]:
    """Keys of ``state`` whose values are not plain ``torch.Tensor``/``Parameter`` objects.

    Writers refuse them: a tensor subclass such as a sharded ``DTensor`` holds only this rank's piece,
    and what it is made of is the engine's business (``Engine.state_dict`` returns full tensors), so
    this floor-0 check knows no sharding type, only that the value is not an ordinary tensor.
    """
    return [key for key, value in state.items() if type(value) not in (torch.Tensor, torch.nn.Parameter)]
