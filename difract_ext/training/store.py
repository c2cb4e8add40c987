"""Find and load trained dictionary folders (written by :func:`train_dictionaries`).

Reading a folder's module is the job of a :class:`~difract_ext.training.dictionary_io.DictionaryIO`
(``io=SAELENS_IO`` from :mod:`difract_ext.adapters.dictionaries` for SAELens folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difract_ext.training.dictionary_io import DictionaryIO
from difract_ext.training.specs import DictionarySpec
from difract_ext.util.files import read_json


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
    return sorted(p for p in found if not _transient(p.relative_to(root).parts))


def _transient(parts: tuple[str, ...]) -> bool:
    """Inside a checkpoint or a hidden folder (an atomic write's temporary, e.g. one left by a
    kill during the final save): never a result."""
    return "checkpoint" in parts or any(part.startswith(".") for part in parts)


def load_dictionary(
    path: str | Path, device: str = "cpu", name: str | None = None, *, io: DictionaryIO
) -> TrainedDictionary:
    """Load one folder (its module through ``io``) plus its ``training.json``."""
    path = Path(path)
    source = path / "training.json"
    training = read_json(source, "training record (training.json)", required=["spec"])
    spec = DictionarySpec.from_json(training["spec"], f"{source}: spec")
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
