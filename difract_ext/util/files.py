"""Reading files a user hands us: regular files only, bounded sizes, every error naming the file.

:func:`read_json` is the one way we read a JSON file (configs, manifests, journals, metadata): it
refuses what is not a regular file (a FIFO, ``/dev/zero`` behind a symlink), anything larger than
``max_bytes`` (read with a bound even when the size the file system reports is wrong), bytes that
are not UTF-8, malformed or too deeply nested JSON, a top level of the wrong kind and missing
keys, always with the file's path, what is wrong and the fix.

:func:`read_safetensors_header` reads and checks a safetensors header (8-byte length, JSON table
of ``name -> dtype, shape, data_offsets``) without reading or allocating any tensor, so callers can
compare declared shapes and dtypes with what a config says before loading a byte of data.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_JSON_BYTES",
    "BadFileError",
    "TensorHeader",
    "check_regular_file",
    "read_json",
    "read_safetensors_header",
]

#: the default bound of :func:`read_json` (our largest JSON files, harvest configs with long
#: prompt lists and graph files, are far smaller)
MAX_JSON_BYTES = 256 << 20
#: the bound of a safetensors header (the format's own reference reader uses 100 MB)
MAX_SAFETENSORS_HEADER = 100_000_000

#: safetensors dtype names and their sizes in bytes
SAFETENSORS_DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
#: floating-point safetensors dtypes (weights and activations must be one of these)
SAFETENSORS_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class BadFileError(ValueError):
    """A file that is not a regular file, too large, or malformed; the message names it."""


def check_regular_file(path: str | Path, what: str = "file", max_bytes: int | None = None) -> int:
    """The size of ``path`` in bytes, after checking that it is a regular file (symlinks followed).

    Raises:
        FileNotFoundError: no such file.
        BadFileError: a directory, device, FIFO or socket; or larger than ``max_bytes``.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise BadFileError(
            f"{path}: {kind} (a {what} must be a regular file); point at the real file"
        )
    if max_bytes is not None and st.st_size > max_bytes:
        raise BadFileError(
            f"{path}: {st.st_size:,} bytes, more than a {what} can be ({max_bytes:,}); "
            "it is not the file you meant, or it is corrupt"
        )
    return int(st.st_size)


def read_json(
    path: str | Path,
    what: str = "JSON file",
    *,
    max_bytes: int = MAX_JSON_BYTES,
    required: Sequence[str] = (),
    kind: type | None = dict,
) -> Any:
    """Parse a JSON file, bounded and checked.

    Args:
        path: the file.
        what: what it is, for messages (``"harvest config"``).
        max_bytes: refuse larger files.
        required: keys the top-level object must have.
        kind: the type the top level must have (``dict``, ``list``), or None for any.

    Raises:
        FileNotFoundError: no such file.
        BadFileError: not a regular file, too large, not UTF-8, not JSON, too deeply nested, the
            wrong top-level type, or missing keys; the message names the file.
    """
    path = Path(path)
    check_regular_file(path, what, max_bytes)
    with open(path, "rb") as f:  # the size can lie (/proc, a file growing): read with a bound
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise BadFileError(f"{path}: more than {max_bytes:,} bytes; not a {what}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadFileError(
            f"{path}: not a {what} (byte {e.start} is not UTF-8 text); write it again or delete it"
        ) from None
    except json.JSONDecodeError as e:
        raise BadFileError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            f"fix the {what} or delete it and write it again"
        ) from None
    except RecursionError:
        raise BadFileError(f"{path}: JSON nested too deeply to be a {what}") from None
    if kind is not None and not isinstance(data, kind):
        raise BadFileError(
            f"{path}: a {what} must hold a JSON {_json_kind(kind)}, found {_json_kind(type(data))}"
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise BadFileError(
            f"{path}: missing key(s) {missing} of a {what}; the file is incomplete or not a {what}"
        )
    return data


def _json_kind(tp: type) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if tp in names:
        return names[tp]
    return "number" if tp in (int, float) else tp.__name__


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header declares it: dtype name (``"F32"``), shape, byte span."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in SAFETENSORS_FLOAT_DTYPES


def read_safetensors_header(
    path: str | Path, what: str = "safetensors file"
) -> tuple[dict[str, TensorHeader], dict[str, str]]:
    """The tensors a safetensors file declares, and its ``__metadata__``, without reading data.

    Checks that the header fits the file, that every dtype is known, every shape is a list of
    non-negative integers whose byte size equals its ``data_offsets`` span, and that every span
    lies inside the file.

    Raises:
        FileNotFoundError: no such file.
        BadFileError: anything else, naming the file and the tensor.
    """
    path = Path(path)
    size = check_regular_file(path, what)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BadFileError(f"{path}: {size} bytes, too short to be a {what}")
        n = int.from_bytes(prefix, "little")
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise BadFileError(
                f"{path}: its header claims {n:,} bytes but the file has {size:,}; "
                f"not a {what}, or truncated"
            )
        raw = f.read(n)
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadFileError(f"{path}: corrupt {what} header ({e})") from None
    if not isinstance(table, dict):
        raise BadFileError(f"{path}: corrupt {what} header (not a JSON object)")
    meta = table.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadFileError(f"{path}: corrupt {what} header (__metadata__ must map str to str)")
    data_bytes = size - 8 - n
    out: dict[str, TensorHeader] = {}
    for name, entry in table.items():
        out[name] = _tensor_header(path, name, entry, data_bytes)
    return out, meta


def _tensor_header(path: Path, name: str, entry: Any, data_bytes: int) -> TensorHeader:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise BadFileError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise BadFileError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadFileError(f"{where}: shape must be a list of non-negative integers, got {shape}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise BadFileError(f"{where}: data_offsets must be two integers, got {offsets}")
    start, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if not 0 <= start <= end <= data_bytes or end - start != nbytes:
        raise BadFileError(
            f"{where}: declares {dtype} {shape} ({nbytes:,} bytes) at bytes [{start}, {end}) of "
            f"{data_bytes:,} data bytes; the file is corrupt or truncated"
        )
    return TensorHeader(dtype, tuple(shape), start, end)
