"""Where the shapes model's shipped dashboards are.

``difract_ext/toy/dictionaries/dashboards/`` holds the transcoders' dashboards (scan ``shapes``)
and its ``saes/`` subfolder the SAEs' (scan ``shapes-saes``); ``scripts/build_shapes_dashboards.py``
writes both.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["SHIPPED_SCANS", "shipped_dashboards_path", "shipped_dashboards_target"]

#: role -> scan name of the shipped dashboards
SHIPPED_SCANS: dict[str, str] = {"transcoder": "shapes", "sae": "shapes-saes"}


def shipped_dashboards_target(role: str = "transcoder") -> Path:
    """Where the shipped dashboards of ``role`` live (whether built or not)."""
    if role not in SHIPPED_SCANS:
        raise ValueError(f"role must be 'transcoder' or 'sae', got {role!r}")
    # the toy package's folder, found without importing toy.pipeline (that loads diffusers)
    base = Path(str(files("difract_ext.toy"))) / "dictionaries" / "dashboards"
    return base if role == "transcoder" else base / "saes"


def shipped_dashboards_path(role: str = "transcoder") -> Path | None:
    """The shipped dashboards of ``role``, or None when this checkout has not built them."""
    path = shipped_dashboards_target(role)
    return path if (path / "index.json").is_file() else None
