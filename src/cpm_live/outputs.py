"""The one rule of every file a command writes: it never destroys what the user owns.

A command never writes over, deletes or truncates a file it did not create in this run, unless that
exact path is its declared output and ``--force`` says so; an output is never one of the run's inputs
(compared by resolved path and by inode, so a hard link or a file inside an input directory counts);
an existing directory is never an output file. Every writer checks its outputs here, before the slow
work, so a mistake costs one ``error:`` line and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator

from cpm_live.errors import OutputError

# How many files of an input directory are fingerprinted (a model directory holds a few dozen).
_MAX_DIR_FILES = 10_000


class Inputs:
    """What a run reads: files and directories (and every file inside those directories), by resolved
    path and by ``(device, inode)``."""

    def __init__(self, paths: Iterable[str | os.PathLike | None]):
        self.paths: list[str] = []
        self.dirs: list[str] = []
        self.inodes: dict[tuple[int, int], str] = {}
        for path in paths:
            if path is None or not os.path.exists(path):
                continue
            path = os.fspath(path)
            self.paths.append(os.path.realpath(path))
            if os.path.isdir(path):
                self.dirs.append(os.path.realpath(path))
                for name in _files_under(path):
                    self._add(name)
            else:
                self._add(path)

    def _add(self, path: str) -> None:
        identity = _identity(path)
        if identity is not None:
            self.inodes.setdefault(identity, path)

    def which(self, path: str) -> str | None:
        """How ``path`` (an existing file) is an input (``is this run's input X``, by name, link or
        inode, or ``is inside this run's input directory X``); None if it is none of them."""
        real = os.path.realpath(path)
        for directory in self.dirs:
            if _inside(real, directory):
                return f"is inside this run's input directory {directory}"
        source = real if real in self.paths else self.inodes.get(_identity(path))
        return None if source is None else f"is this run's input {source}"

    def inside(self, directory: str) -> str | None:
        """An input that lies in ``directory`` (or is it), or None."""
        real = os.path.realpath(directory)
        for path in self.paths:
            if _inside(path, real):
                return path
        for name in _files_under(directory):
            found = self.inodes.get(_identity(name))
            if found is not None:
                return found
        return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _nearest_existing(path: str) -> str:
    """``path``'s nearest ancestor that exists (where a new file there would be created)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def _files_under(directory: str) -> list[str]:
    found: list[str] = []
    for root, _, names in os.walk(directory):
        found += [os.path.join(root, n) for n in names]
        if len(found) >= _MAX_DIR_FILES:
            break
    return found[:_MAX_DIR_FILES]


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, force: bool,
                      setting: str = "output", suffixes: tuple[str, ...] | None = None) -> str:
    """Refuse ``path`` as the file this run writes unless it is safe to (see the module docstring);
    ``setting`` names it in the message (``output_path`` reads ``--output-path`` on a command line)."""
    path = os.fspath(path)
    flag = f"`{setting}` {path}"
    if os.path.isdir(path):
        raise OutputError(f"{flag} is a directory; name a file (e.g. {os.path.join(path, 'out')})")
    if suffixes is not None and not path.endswith(suffixes):
        raise OutputError(f"{flag} must end in {' or '.join(suffixes)}")
    parent = _nearest_existing(path)
    if not os.path.isdir(parent):
        raise OutputError(f"{flag}: {parent} is a file, not a directory; choose another path")
    if os.path.lexists(path):
        if os.path.exists(path):
            clash = Inputs(inputs).which(path)
            if clash is not None:
                raise OutputError(f"{flag} {clash}; write to another path")
        if not force:
            raise OutputError(f"{flag} already exists; pass `force` to replace it, or choose another path")
    return path


def check_output_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, force: bool,
                     own: Callable[[str], bool], setting: str = "output") -> str:
    """Refuse ``path`` as the directory this run builds (and renames into place) unless safe: an existing
    one is replaced only with ``force``, only if it holds no input, and only if every file in it is one
    this command writes (``own(name)``), i.e. an earlier output of the same command."""
    path = os.fspath(path)
    flag = f"`{setting}` {path}"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} exists and is not a directory; choose another path")
    source = Inputs(inputs).inside(path) if os.path.isdir(path) else None
    if source is not None:
        raise OutputError(f"{flag} holds this run's input {source}; write to another directory")
    if os.path.isdir(path):
        if not force:
            raise OutputError(f"{flag} already exists; pass `force` to replace it, or choose another path")
        foreign = sorted(n for n in os.listdir(path) if not own(n))
        if foreign:
            raise OutputError(f"{flag} holds {os.path.join(path, foreign[0])}, which this command does not "
                              f"write; `force` only replaces an earlier output: choose another path")
    return path


def open_no_follow(path: str, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink at ``path`` (a lock or temp file must never write through one
    to a file elsewhere) or anything but a regular file; errors are one line naming the path."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link; this file is never written through a link: "
                              f"remove it") from None
        raise OutputError(f"cannot open {path} ({e.strerror}): make it writable or remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path} is not a regular file; remove it")
    return fd


def free_mib(path: str) -> float:
    """Free space, in MiB, of the file system that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_nearest_existing(path)).free / 2**20  # statvfs: a file there will do


@contextlib.contextmanager
def reported_write(path: str) -> Iterator[None]:
    """Turn a failed write of ``path`` (a full disk, a quota, a file-size limit) into one line naming it
    and the free space. The writer's own cleanup (``atomic_path``) has already removed the partial file
    when this runs, so nothing half-written is left."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0][:200] or type(e).__name__
        raise OutputError(f"cannot write {path} ({reason}): is the disk full? {free_mib(path):.0f} MiB free "
                          f"there; free space or write elsewhere (nothing was left behind)") from None
    except RuntimeError as e:
        if "inline_container" not in str(e):  # torch.save reports a failed write this way
            raise
        raise OutputError(f"cannot write {path}: is the disk full? {free_mib(path):.0f} MiB free there; free "
                          f"space or write elsewhere (nothing was left behind)") from None
