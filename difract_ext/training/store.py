"""Find and load trained dictionary folders (written by :func:`train_dictionaries`).

Reading a folder's module is the job of a :class:`~difract_ext.training.dictionary_io.DictionaryIO`
(``io=SAELENS_IO`` from :mod:`difract_ext.adapters.dictionaries` for SAELens folders).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difract_ext.training.dictionary_io import DictionaryIO
from difract_ext.training.specs import DictionarySpec


@dataclass
class TrainedDictionary:
    """A dictionary folder: its name (path relative to the run folder), spec, and loaded module."""

    name: str
    path: Path
    spec: DictionarySpec
    module: Any
    training: dict[str, Any]


def find_dictionaries(root: str | Path) -> list[Path]:
    """Folders under ``root`` (``root`` itself included) holding ``cfg.json`` +
    ``training.json``.
    """
    root = Path(root)
    found = [p.parent for p in root.rglob("training.json") if (p.parent / "cfg.json").is_file()]
    return sorted(p for p in found if "checkpoint" not in p.relative_to(root).parts)


def load_dictionary(
    path: str | Path, device: str = "cpu", name: str | None = None, *, io: DictionaryIO
) -> TrainedDictionary:
    """Load one folder (its module through ``io``) plus its ``training.json``."""
    path = Path(path)
    training = json.loads((path / "training.json").read_text())
    spec = DictionarySpec.from_json(training["spec"])
    module = io.load(path, device)
    module.eval()
    return TrainedDictionary(name or spec.resolved_name, path, spec, module, training)


def load_dictionaries(
    root: str | Path, device: str = "cpu", *, io: DictionaryIO
) -> list[TrainedDictionary]:
    """Every trained dictionary under ``root``, named by its path relative to ``root``."""
    root = Path(root)
    out = []
    for p in find_dictionaries(root):
        rel = p.relative_to(root).as_posix()
        out.append(load_dictionary(p, device, name=rel if rel != "." else None, io=io))
    if not out:
        raise FileNotFoundError(f"no trained dictionaries (cfg.json + training.json) under {root}")
    return out
