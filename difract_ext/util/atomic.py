"""Atomic file and directory writes: a crash or Ctrl-C never leaves a half-written result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator
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


def check_replaceable(path: Path, owned: Collection[str] | None) -> None:
    """Raise unless an existing ``path`` may be replaced: it holds only entries named in ``owned``
    (``None``: the caller owns the whole folder). A missing ``path`` is always fine.

    Raises:
        FileExistsError: ``path`` is not a directory, or holds entries not in ``owned``.
    """
    if not os.path.lexists(path) or owned is None:
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(
            f"{path} exists and is not a folder this tool wrote; it is left untouched. "
            "Choose another output path, or move it away"
        )
    foreign = sorted(p.name for p in path.iterdir() if p.name not in owned or p.is_symlink())
    if foreign:
        raise FileExistsError(
            f"{path} holds files this tool did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); it would replace the folder, so it refuses "
            "and deletes nothing. Choose another output path, or move those files away"
        )


@contextlib.contextmanager
def atomic_directory(path: str | Path, owned: Collection[str] | None = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    An existing ``path`` is swapped out by rename and removed after the new one is in place, but
    only if it holds nothing but entries named in ``owned`` (what the writer writes, e.g.
    ``("cfg.json", "sae_weights.safetensors")``); ``owned=None`` lets the caller replace anything
    (for folders it owns by construction). Never deletes a file the tool did not write.

    Raises:
        FileExistsError: ``path`` holds other entries (checked before and again at the swap).
    """
    path = Path(path)
    check_replaceable(path, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        check_replaceable(path, owned)  # again: something may have appeared meanwhile
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = _tmp_sibling(path)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
