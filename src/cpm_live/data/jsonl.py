"""A `.jsonl` file as a record source with the reading interface of `SimpleDataset`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import jsonlines

from cpm_live.errors import DataFormatError, MissingFileError
from cpm_live.utils import JSON_TOO_DEEP


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
            line = self._fp.readline()
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
            with open(self._path, "rb") as f:
                self._nlines = sum(1 for line in f if line.strip())
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
