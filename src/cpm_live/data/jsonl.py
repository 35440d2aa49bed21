"""A `.jsonl` file as a record source with the reading interface of `SimpleDataset`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import jsonlines

from cpm_live.errors import DataFormatError, MissingFileError
from cpm_live.utils import JSON_TOO_DEEP

# Longest line read (bytes): far above any real record (a training row holds at most a few thousand
# tokens), far below what would exhaust memory; a longer line (a whole JSON array on one line, a binary
# file) is refused before it is read whole.
MAX_LINE_BYTES = 64 << 20


def read_line(fp: BinaryIO, where: str) -> bytes:
    """The next line of ``fp`` (``b""`` at the end), refused with ``where`` (``file:line``) past
    :data:`MAX_LINE_BYTES`."""
    line = fp.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
        raise DataFormatError(f"{where}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; a .jsonl file holds "
                              f"one JSON object per line (is it a JSON array, or not JSON lines at all?)")
    return line


def count_lines(path: str) -> int:
    """Non-blank lines of ``path``, read in blocks (a huge line is never held whole)."""
    count, blank = 0, True
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            pieces = block.split(b"\n")
            for i, piece in enumerate(pieces):
                blank = blank and not piece.strip()
                if i < len(pieces) - 1:  # the piece ends a line
                    count += not blank
                    blank = True
    return count + (not blank)


class JsonlDataset:
    """One JSON object per line, read in file order; blank lines are skipped.

    Like `SimpleDataset`: `read()` raises EOFError at the end of a pass and `restart()` begins the
    next one. The position (byte offset and line number) is the whole state, so a run resumes exactly.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = os.fspath(path)
        if not os.path.isfile(self._path):
            raise MissingFileError(f"dataset file {self._path} does not exist")
        self._fp = open(self._path, "rb")
        self._lineno = 0
        self._exhausted = False
        self._nlines: int | None = None
        self._location = self._path

    @property
    def location(self) -> str:
        """`path:line` of the last record read, for error messages."""
        return self._location

    def read(self) -> dict[str, Any]:
        if self._exhausted:
            raise EOFError("End of dataset")
        line = b""
        while not line.strip():
            line = read_line(self._fp, f"{self._path}:{self._lineno + 1}")
            if not line:
                self._exhausted = True
                raise EOFError("End of dataset")
            self._lineno += 1
        self._location = f"{self._path}:{self._lineno}"
        try:
            value = jsonlines.Reader([line]).read()
        except jsonlines.InvalidLineError as e:
            raise DataFormatError(f"{self._location}: {e}") from e
        except RecursionError:
            raise DataFormatError(f"{self._location}: {JSON_TOO_DEEP}") from None
        if not isinstance(value, dict):
            raise DataFormatError(f"{self._location}: expected a JSON object, got {type(value).__name__}")
        return value

    def restart(self) -> None:
        self._fp.seek(0)
        self._lineno = 0
        self._exhausted = False

    def close(self) -> None:
        self._fp.close()

    def __len__(self) -> int:
        """Number of non-blank lines (counted once)."""
        if self._nlines is None:
            self._nlines = count_lines(self._path)
        return self._nlines

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self._fp.tell(), "line": self._lineno, "exhausted": self._exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        offset = int(state["offset"])
        if offset > os.path.getsize(self._path):
            raise ValueError(
                f"saved position {offset} is beyond the end of {self._path}; was the file replaced?"
            )
        self._fp.seek(offset)
        self._lineno = int(state["line"])
        self._exhausted = bool(state["exhausted"])


def answered_records(path: str | os.PathLike, answer_key: str = "<ans>") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(file:line, record)`` for each record of a jsonl file; each must hold ``answer_key``."""
    dataset = JsonlDataset(path)
    try:
        while True:
            try:
                record = dataset.read()
            except EOFError:
                return
            if answer_key not in record:
                raise DataFormatError(f'{dataset.location}: the record has no "{answer_key}" key')
            yield dataset.location, record
    finally:
        dataset.close()
