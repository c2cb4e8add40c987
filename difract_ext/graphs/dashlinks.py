"""Where a graph's feature dashboards are, and what graph nodes say about their features.

Dashboards (:mod:`difract_ext.dashboards`) are found by their scan name: a graph written to
``OUT`` with ``metadata.scan == "shapes"`` uses ``OUT/dashboards/shapes/`` when it exists, else a
shipped dashboard folder whose index names that scan or the graph's model (the shapes model's
dashboards live in ``difract_ext/toy/dictionaries/dashboards/``). Labels come from
``DashboardStore.label``, so nobody parses node labels: feature nodes carry
:func:`feature_fields` under ``"difract"``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.dashboards.shipped import SHIPPED_SCANS, shipped_dashboards_target
from difract_ext.flux.sites import Site

if TYPE_CHECKING:
    from difract_ext.dashboards.store import DashboardStore

logger = logging.getLogger(__name__)

__all__ = [
    "DASHBOARD_INDEX",
    "SHIPPED_DASHBOARDS",
    "dashboard_folders",
    "feature_fields",
    "find_dashboards",
    "open_dashboards",
    "read_dashboard_index",
]

#: The index file of a dashboard folder.
DASHBOARD_INDEX = "index.json"
#: The shapes model's shipped dashboards: transcoders (scan ``shapes``) and SAEs (``saes/``,
#: scan ``shapes-saes``); absent in a checkout that has not built them.
SHIPPED_DASHBOARDS: tuple[Path, ...] = tuple(shipped_dashboards_target(r) for r in SHIPPED_SCANS)


def read_dashboard_index(folder: str | Path) -> dict[str, Any] | None:
    """The parsed ``index.json`` of a dashboard folder, or ``None`` if ``folder`` is not one."""
    path = Path(folder) / DASHBOARD_INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("%s is not readable JSON: ignored as a dashboard folder", path)
        return None
    if not isinstance(index, dict) or not str(index.get("format", "")).startswith(
        "difract-dashboards"
    ):
        return None
    return index


def dashboard_folders(
    data_dir: str | Path | None = None, extra: list[str | Path] | tuple[str | Path, ...] = ()
) -> dict[str, Path]:
    """Scan name → dashboard folder: ``extra`` first, then ``data_dir/dashboards/*``, then the
    shipped folders (the first folder of a scan wins)."""
    candidates: list[Path] = [Path(p) for p in extra]
    if data_dir is not None and (Path(data_dir) / "dashboards").is_dir():
        candidates += sorted(p for p in (Path(data_dir) / "dashboards").iterdir() if p.is_dir())
    candidates += SHIPPED_DASHBOARDS
    found: dict[str, Path] = {}
    for folder in candidates:
        index = read_dashboard_index(folder)
        if index is None:
            if folder in [Path(p) for p in extra]:
                raise FileNotFoundError(
                    f"{folder} is not a dashboard folder (no {DASHBOARD_INDEX} of format "
                    "difract-dashboards); write one with `difract dashboards`"
                )
            continue
        found.setdefault(str(index.get("scan") or folder.name), folder.resolve())
    return found


def find_dashboards(out_dir: str | Path, scan: str, model_name: str | None = None) -> Path | None:
    """The dashboard folder of a graph with ``scan`` (and model) written to ``out_dir``."""
    folders = dashboard_folders(out_dir)
    if scan in folders:
        return folders[scan]
    if model_name:
        for folder in folders.values():
            index = read_dashboard_index(folder) or {}
            if index.get("model") and str(index["model"]) == model_name:
                return folder
    return None


def open_dashboards(source: DashboardStore | str | Path | None) -> DashboardStore | None:
    """A :class:`DashboardStore` from a store, a folder, or ``None``."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        from difract_ext.dashboards.store import DashboardStore

        return DashboardStore.open(source)
    return source


def feature_fields(meta: GraphMeta, layer: int, feature: int, position: int) -> dict[str, Any]:
    """``{"site", "stream", "layer", "feature", "position", "token", "patch"}`` of a feature node.

    ``feature`` is the graph's id (text ids offset by ``meta.d_img``); the result's ``feature``
    is the index inside the site's own dictionary; ``position`` the joint position (text first),
    ``token`` the text token there (``None`` on a patch), ``patch`` ``[row, col]`` (``None`` on a
    token).
    """
    stream = meta.feature_stream(layer, feature)
    kind, a, b = meta.position_kind(position)
    return {
        "site": str(Site(layer, stream)),
        "stream": stream,
        "layer": int(layer),
        "feature": int(meta.stream_feature_index(layer, feature)),
        "position": int(position),
        "token": meta.text_tokens[a] if kind == "txt" else None,
        "patch": [a, b] if kind == "img" else None,
    }


def dashboard_label(store: DashboardStore | None, site: str, feature: int) -> str | None:
    """The store's concept label of ``site``'s ``feature`` with its F1 (``None`` without one, or
    when the feature detects no concept with F1 >= ``LABEL_MIN_F1``)."""
    if store is None:
        return None
    try:
        return store.graph_label(Site.parse(site), feature)
    except ValueError:  # a site the dashboards do not cover, or another dictionary's feature
        return None
