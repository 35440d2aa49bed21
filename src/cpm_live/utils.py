"""Small helpers shared across the package: atomic file writes, JSON files read with errors naming
the line, the plain-tensor check of writers, the key comparison of state-dict loaders."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

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


JSON_TOO_DEEP = "JSON nested deeper than Python's parser goes (about 1000 levels)"


def read_json_file(path: str | os.PathLike) -> Any:
    """The JSON value in file ``path``. Bad JSON raises ValueError starting ``path:line:``; so does
    nesting too deep to parse (a RecursionError otherwise), at the line where it is deepest."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{os.fspath(path)}:{_deepest_line(text)}: {JSON_TOO_DEEP}") from None


def _deepest_line(text: str) -> int:
    """1-based line of ``text`` where JSON brackets nest deepest (brackets inside strings skipped)."""
    depth = deepest = 0
    line = where = 1
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}\n]', text):
        char = token.group()
        if char == "\n":
            line += 1
        elif char in ("[", "{"):
            depth += 1
            if depth > deepest:
                deepest, where = depth, line
        elif char in ("]", "}"):
            depth -= 1
    return where


def non_plain_tensors(state: Mapping[str, object]) -> list[str]:
    """Keys of ``state`` whose values are not plain ``torch.Tensor``/``Parameter`` objects.

    Writers refuse them: a tensor subclass such as a sharded ``DTensor`` holds only this rank's piece,
    and what it is made of is the engine's business (``Engine.state_dict`` returns full tensors), so
    this floor-0 check knows no sharding type, only that the value is not an ordinary tensor.
    """
    return [key for key, value in state.items() if type(value) not in (torch.Tensor, torch.nn.Parameter)]


def key_mismatch(found: Iterable[str], expected: Iterable[str], *, missing_ok: bool = False,
                 found_shapes: Mapping[str, Sequence[int]] | None = None,
                 expected_shapes: Mapping[str, Sequence[int]] | None = None, limit: int = 5) -> list[str]:
    """One line per kind of difference between loaded keys ``found`` and the model's ``expected``.

    Lines: ``missing from the checkpoint (n): ...`` (skipped with ``missing_ok``), ``not in the model
    (n): ...`` and, when both shape mappings are given, ``shape mismatch (n): ...``; at most ``limit``
    keys each, in the order given. Empty when the keys match. Callers add their own header and fix.
    """
    found, expected = list(found), list(expected)
    found_set, expected_set = set(found), set(expected)
    shapes = found_shapes is not None and expected_shapes is not None

    def model_shape(key: str) -> str:
        return f" (model: {list(expected_shapes[key])})" if shapes else ""

    def stored_shape(key: str) -> str:
        return f" (checkpoint: {list(found_shapes[key])})" if shapes else ""

    groups = [
        ("missing from the checkpoint", [] if missing_ok else [k for k in expected if k not in found_set],
         lambda k: k + model_shape(k)),
        ("not in the model", [k for k in found if k not in expected_set], lambda k: k + stored_shape(k)),
        ("shape mismatch",
         [k for k in expected if shapes and k in found_set and tuple(found_shapes[k]) != tuple(expected_shapes[k])],
         lambda k: f"{k}: checkpoint {list(found_shapes[k])} vs {list(expected_shapes[k])}"),
    ]
    lines = []
    for title, keys, show in groups:
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            lines.append(f"{title} ({len(keys)}): " + "; ".join(show(k) for k in keys[:limit]) + more)
    return lines


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any entry point changed it
_USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_cpu_threads(preferred: int | None = None) -> int:
    """Give torch a CPU thread count that does not oversubscribe the cores; returns the count in use.

    A count the user chose stands: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in the environment, or a
    ``torch.set_num_threads`` call made after this package was imported. Otherwise: ``preferred``
    (a tiny model's choice; capped at the cores), else the cores this process may run on divided
    among the processes torchrun starts on this node (``LOCAL_WORLD_SIZE``), so N ranks never run
    N x cores threads.
    """
    if any(os.environ.get(name) for name in _USER_THREAD_VARIABLES) or \
            torch.get_num_threads() != _TORCH_DEFAULT_THREADS:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = max(1, min(preferred, cores) if preferred else cores // local_ranks)
    torch.set_num_threads(threads)
    return threads
