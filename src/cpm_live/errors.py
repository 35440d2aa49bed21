"""Every error a user can cause, as one family: each ``main`` catches :class:`CPMLiveError` once.

Each class also keeps the built-in base it always had (``ValueError`` for bad files and values,
``RuntimeError`` for a run that cannot go on, ``FileNotFoundError`` for a missing path), so older
``except ValueError`` code still catches it. The message names the file, key or setting and the fix;
anything else escaping a ``main`` is a bug.

Library code names a setting as ```name``` (the field or parameter, e.g. ```max_length```);
:func:`for_cli` shows it as the command's flag (``--max-length``), so one message serves both.
"""

from __future__ import annotations

import argparse
import pickle
import re


class CPMLiveError(Exception):
    """Base of every user-facing error of cpm_live."""


class MissingFileError(CPMLiveError, FileNotFoundError):
    """A file or directory the user named does not exist; the message names it."""


class ConfigError(CPMLiveError, ValueError):
    """A configuration value (or file) is wrong; the message says which and how to fix it."""


class VocabError(CPMLiveError, ValueError):
    """The vocab file is malformed; the message names the file and the line."""


class QuantFormatError(CPMLiveError, ValueError):
    """A 4-bit weight's tensors do not match the expected layout or settings."""


class DataFormatError(CPMLiveError, ValueError):
    """A record cannot be used; the message names the file, the line or byte offset, and the reason."""


class UnsafePickleError(CPMLiveError, pickle.UnpicklingError):
    """A pickled record asks for more than plain data (code, classes, sets, bytes)."""


class SampleTooLong(CPMLiveError, ValueError):
    """A sample has more tokens than the caller's ``max_length`` (``length`` is a lower bound:
    conversion stops as soon as the limit is passed, before the large arrays are built)."""

    def __init__(self, length: int, max_length: int):
        super().__init__(f"the sample has at least {length} tokens, more than the limit of {max_length}")
        self.length, self.max_length = length, max_length


class EngineError(CPMLiveError, RuntimeError):
    """Wrong engine choice, launch environment or call order; the message says what to do."""


class MergeError(CPMLiveError, ValueError):
    """Merging an adapter gave non-finite weights (the adapter is broken)."""


class CheckpointError(CPMLiveError, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file and the fix."""


class PRCheckpointError(CPMLiveError, ValueError):
    """A qlora-PR checkpoint's content is not what its quantize script writes."""


class AdapterError(CPMLiveError, ValueError):
    """An adapter file is missing, malformed or does not fit the model; the message says which part."""


class TrainingError(CPMLiveError, RuntimeError):
    """A run cannot go on (save dir in use, history at risk, non-finite values, unusable data); the
    message names the file or step and what to do."""


class OutputError(CPMLiveError, ValueError):
    """An output path would destroy something the user owns (an input, a directory, an existing file
    without ``force``, a file behind a symlink); the message names the path and the fix."""


class PlotError(CPMLiveError, ValueError):
    """A metrics file cannot be plotted; the message names the file."""


_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


def for_cli(error: BaseException, parser: argparse.ArgumentParser) -> str:
    """``error``'s message on a command line: each setting it names as ```name``` becomes the flag
    ``parser`` declares for it (``--max-length``); a setting without a flag keeps its plain name."""
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    return _SETTING.sub(lambda m: flags.get(m.group(1), m.group(1)), str(error))
