"""Record payload serializers of the binary dataset.

New datasets store UTF-8 JSON. Original CPM-Bee datasets store pickles; those are read with a
restricted unpickler that builds plain data only, because `pickle.loads` on a downloaded dataset
would run whatever code the file names. `AutoSerializer` (the reading default) tells the two apart.
"""

from __future__ import annotations

import io
import json
import pickle
from typing import Any

from cpm_live.errors import UnsafePickleError
from cpm_live.utils import JSON_TOO_DEEP

_PLAIN_SCALARS = (str, int, float, bool, type(None))


class Serializer:
    """Turns one record into bytes and back."""

    def serialize(self, obj: Any) -> bytes:
        raise NotImplementedError

    def deserialize(self, data: bytes) -> Any:
        raise NotImplementedError


class JsonSerializer(Serializer):
    def serialize(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")

    def deserialize(self, data: bytes) -> Any:
        try:
            return json.loads(data.decode("utf-8"))
        except RecursionError:
            raise ValueError(JSON_TOO_DEEP) from None


class RawSerializer(Serializer):
    """Bytes in, bytes out: used to move records without decoding them (shuffling)."""

    def serialize(self, obj: bytes) -> bytes:
        return obj

    def deserialize(self, data: bytes) -> bytes:
        return data


class _PlainDataUnpickler(pickle.Unpickler):
    # Every way a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, REDUCE on a
    # looked-up class) goes through find_class, so refusing it here leaves only the opcodes that
    # build containers and scalars.
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name}: dataset records may only hold plain data "
            "(dict, list, tuple, str, int, float, bool, None)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids: records must be plain data")


# A pickle can share one container many times (memo references, 2 bytes each), so a few hundred
# bytes can stand for 2**60 values ("billion laughs"), or a list can contain itself. Walking the
# record as the tree that JSON and the tokenizer will see is bounded by this many values per byte.
_VALUES_PER_BYTE = 4
_MIN_VALUE_BUDGET = 4096


def _check_plain(obj: Any, budget: int | None = None) -> None:
    """Raise UnsafePickleError unless ``obj`` is a finite tree of plain data of at most ``budget`` values.

    Iterative (no recursion limit); a container that contains itself, or more than ``budget`` values
    once shared references are expanded, is refused before anything else walks it.
    """
    on_path: set[int] = set()  # containers between the root and the current node
    stack: list[tuple[Any, bool]] = [(obj, False)]
    seen = 0
    while stack:
        x, leaving = stack.pop()
        if leaving:
            on_path.discard(id(x))
            continue
        seen += 1
        if budget is not None and seen > budget:
            raise UnsafePickleError(
                f"record expands to more than {budget} values (shared references repeated over and over); "
                "dataset records must be plain trees of data"
            )
        if isinstance(x, (dict, list, tuple)):
            if id(x) in on_path:
                raise UnsafePickleError(f"record contains itself (a {type(x).__name__} inside itself); dataset "
                                        "records must be plain trees of data")
            on_path.add(id(x))
            stack.append((x, True))
            children = [v for kv in x.items() for v in kv] if isinstance(x, dict) else x
            stack.extend((c, False) for c in children)
        elif not isinstance(x, _PLAIN_SCALARS):
            raise UnsafePickleError(
                f"refusing pickled {type(x).__name__}: dataset records may only hold plain data "
                "(dict, list, tuple, str, int, float, bool, None)"
            )


def safe_pickle_loads(data: bytes) -> Any:
    """Unpickle plain data only; anything that would import or call code raises UnsafePickleError."""
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # a truncated pickle raises EOFError, which must not look like end of data
        raise pickle.UnpicklingError(f"corrupt pickle record ({type(e).__name__}: {e})") from e
    _check_plain(obj, budget=max(_MIN_VALUE_BUDGET, _VALUES_PER_BYTE * len(data)))
    return obj


class PickleSerializer(Serializer):
    """Legacy CPM-Bee payloads. Writing uses `pickle.dumps`; reading is restricted to plain data."""

    def serialize(self, obj: Any) -> bytes:
        _check_plain(obj)
        return pickle.dumps(obj)

    def deserialize(self, data: bytes) -> Any:
        return safe_pickle_loads(data)


class AutoSerializer(Serializer):
    """Reads JSON or legacy pickle payloads (pickle protocol >= 2 starts with 0x80, JSON never does);
    writes JSON."""

    def serialize(self, obj: Any) -> bytes:
        return JsonSerializer().serialize(obj)

    def deserialize(self, data: bytes) -> Any:
        if data[:1] == b"\x80":
            return safe_pickle_loads(data)
        try:
            return json.loads(data.decode("utf-8"))
        except RecursionError:
            raise ValueError(JSON_TOO_DEEP) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as json_error:
            try:
                return safe_pickle_loads(data)  # protocol 0/1 pickles start with an ASCII opcode
            except UnsafePickleError:
                raise
            except pickle.UnpicklingError:
                raise ValueError(f"record is neither JSON nor a pickle ({json_error})") from json_error
