"""The one place the package reads a ``.pt`` file: ``torch.load(weights_only=True)``, on CPU.

torch's weights-only unpickler builds tensors and plain containers only; a pickle that names any
other class or function is refused before anything in it runs (``allowed`` adds classes to that
list: the qlora-PR reader adds bitsandbytes' ``QuantState``). torch's advice on a refusal, to retry
with ``weights_only=False``, is exactly wrong for a hostile file, so its text never reaches a user:
a refusal becomes :class:`RefusedPickle` naming what was refused, any other failure a
:class:`CheckpointError` saying the file is damaged. Callers add what to do about it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from typing import Any

import torch

from cpm_live.errors import CheckpointError

# torch names the refused class or function "[Uu]nsupported global: GLOBAL x" or "GLOBAL x whose module ...".
_REFUSED = re.compile(r"unsupported GLOBAL:? ?(?:GLOBAL )?(\S+)", re.IGNORECASE)
_ZIP_MAGIC = b"PK\x03\x04"


class RefusedPickle(CheckpointError):
    """The file asks the unpickler for a class or function outside the allowed list; nothing ran."""

    def __init__(self, path: str, refused: str):
        super().__init__(f"{path} holds objects other than tensors ({refused}), which are refused without "
                         f"running any of them")
        self.path, self.refused = path, refused


def is_zip_archive(path: str | os.PathLike) -> bool:
    """True for ``torch.save``'s zip format (the default since torch 1.6), the only one torch can mmap."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    except OSError:
        return False


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = False, allowed: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, memory-mapped with ``mmap`` (zip files only).

    Raises :class:`RefusedPickle` for a pickle naming anything but tensors, plain data and
    ``allowed``; :class:`CheckpointError` for a file that cannot be read (missing, truncated, not a
    ``torch.save`` file).
    """
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = _REFUSED.search(str(e))
        if found is not None:
            raise RefusedPickle(path, found.group(1).strip()) from None
        raise CheckpointError(f"cannot read {path}: it is not a torch.save file, or it is truncated or "
                              f"corrupt") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # torch.load reports damage as RuntimeError, EOFError, KeyError, ...
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__}: "
                              f"{reason})") from None
