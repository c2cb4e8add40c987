"""The frontend's vocabulary: node types, file names and safe file stems.

Shared by :mod:`~difract_ext.graphs.files` (graph JSON) and :mod:`~difract_ext.graphs.features`
(feature JSON), which both write what circuit-tracer's frontend reads; keeping it here lets
``files`` use ``features`` without a cycle.
"""

from __future__ import annotations

import re

__all__ = [
    "ERROR_FEATURE_TYPE",
    "FEATURE_TYPE",
    "GRAPH_METADATA_FILE",
    "RESIDUE_FEATURE_TYPE",
    "TARGET_COLUMN_LABEL",
    "validate_slug",
]

#: ``feature_type`` of unexplored-feature residue nodes (the patched UI draws them as ▲).
RESIDUE_FEATURE_TYPE = "unexplored feature residue"
#: ``feature_type`` circuit-tracer uses for transcoder features.
FEATURE_TYPE = "cross layer transcoder"
#: ``feature_type`` circuit-tracer uses for error nodes.
ERROR_FEATURE_TYPE = "mlp reconstruction error"
#: Label of the extra column that holds the target nodes.
TARGET_COLUMN_LABEL = "targets"
#: Name of the index file the frontend reads first.
GRAPH_METADATA_FILE = "graph-metadata.json"

_SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_slug(slug: str) -> str:
    """Return ``slug`` if it is a safe file stem (letters, digits, ``._-``), else raise."""
    if not _SLUG_RE.match(slug) or ".." in slug:
        raise ValueError(
            f"slug {slug!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "start with a letter or digit and not contain '..'"
        )
    return slug
