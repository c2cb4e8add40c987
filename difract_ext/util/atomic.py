"""Atomic file and directory writes: a crash or Ctrl-C never leaves a half-written result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path, keep_suffix: bool = False) -> Path:
    """A hidden, unique sibling; ``keep_suffix``: it ends like ``path``."""
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(
        f".{path.stem}.{tag}{path.suffix}" if keep_suffix else f".{path.name}.{tag}"
    )


def atomic_write_with(
    path: str | Path, write: Callable[[Path], object], keep_suffix: bool = False
) -> Path:
    """Let ``write(tmp)`` create a temporary sibling of ``path``, then move it into place.

    For writers that want a file name (``torch.save``, ``safetensors.torch.save_file``,
    ``numpy.savez``): the temporary file is flushed to disk and replaces ``path`` with
    ``os.replace`` only if ``write`` returns; otherwise it is removed. Its name is hidden and does
    not end like ``path`` (a crash never leaves a file that globs like a result), unless
    ``keep_suffix`` (for writers that append a suffix otherwise, like ``numpy.savez``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, keep_suffix)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace``."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    An existing ``path`` is swapped out by rename and removed after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = _tmp_sibling(path)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
