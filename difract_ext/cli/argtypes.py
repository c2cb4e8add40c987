"""Argument types of the ``difract`` command: values checked while parsing, with clear messages.

``type=positive_int`` turns ``--d-sae 0`` into ``difract train: error: argument --d-sae: must be
an integer >= 1, got 0`` (exit status 2) before anything runs; the library's dataclasses check the
same ranges again for Python callers.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difract_ext.util.config import ConfigError, check_range

__all__ = [
    "device",
    "fraction",
    "nonnegative_int",
    "nonnegative_number",
    "number_in",
    "output_folder",
    "port",
    "positive_int",
    "positive_number",
    "seed",
]


def _checked(parse: Callable[[str], Any], name: str, **rule: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if parse is int else 'a number'}, got {text!r}"
            ) from None
        try:
            check_range("value", value, integer=parse is int, **rule)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None
        return value

    convert.__name__ = name
    convert.rule = {"integer": parse is int, **rule}  # type: ignore[attr-defined]
    return convert


positive_int = _checked(int, "positive_int", low=1)
nonnegative_int = _checked(int, "nonnegative_int", low=0)
positive_number = _checked(float, "positive_number", low=0, low_open=True)
nonnegative_number = _checked(float, "nonnegative_number", low=0)
#: a number in [0, 1]
fraction = _checked(float, "fraction", low=0, high=1)
port = _checked(int, "port", low=0, high=65535)
#: a generator seed (what ``torch.Generator.manual_seed`` takes without wrapping around)
seed = _checked(int, "seed", low=0, high=2**63 - 1)


def number_in(low: float, high: float, **open_ends: bool) -> Callable[[str], float]:
    """A float in ``[low, high]`` (``low_open`` / ``high_open`` exclude an end)."""
    return _checked(float, "number", low=low, high=high, **open_ends)


def device(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``), checked by torch."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    return text


def output_folder(text: str) -> str:
    """A folder to write into: absent (it will be created), or an existing folder; refused when
    it is an existing file, or when its nearest existing parent is not a writable folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a folder path, got ''")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} exists and is not a folder; give a folder path (it is created if absent)"
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} cannot be created: {parent} is a file, not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"{text} cannot be written: {parent} is not writable; choose a folder you can write to"
        )
    return text
