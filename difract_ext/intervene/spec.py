"""Intervention specs: which dictionary feature, where, when and how, built from graph nodes.

A :class:`FeatureEdit` names one feature of one site's dictionary (``Site`` + feature id inside
that dictionary), the stream positions it acts on (text token indices for ``txt`` sites, patch
indices ``row * cols + col`` for ``img`` sites; ``None``: all), the denoising steps (``None``:
all), the batch rows (``None``: all) and the operation. Every operation moves the feature's
activation ``z`` towards a goal ``z*`` by ``strength`` (``z' = z + s·(z* − z)``; ``s = 1`` assigns
``z*`` exactly):

- ``"scale"``: ``z* = value · z``;
- ``"set"``: ``z* = value``;
- ``"ablate"``: ``z* = 0``;
- ``"add"``: ``z* = z + value`` — adds ``value`` times the decoder direction to the MLP output.

The model receives the edit as a delta on the true MLP output, ``(z' − z) · W_dec`` (the
dictionary's error term is kept), see ``FluxModel.apply_intervention``. An :class:`Intervention`
is a tuple of edits applied in order (a later edit of the same entry sees the earlier result)
on the dictionaries of one ``role``: transcoders (encoding the MLP input) or SAEs (encoding the
MLP output).

Builders read graphs without parsing labels: :func:`edits_from_row_graph` takes an in-memory
``RowGraph`` + ``GraphMeta`` and feature-node indices, :func:`edits_from_graph_json` a graph
JSON's node ids (their ``"difract"`` fields). Groups of nodes (supernodes) are lists of nodes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from difract_ext.attribution.graph_meta import RESIDUE_FEATURE, GraphMeta
from difract_ext.attribution.row_graph import RowGraph
from difract_ext.flux.sites import Site, as_site

EditOp = Literal["scale", "set", "ablate", "add"]
Role = Literal["transcoder", "sae"]
OPS: tuple[str, ...] = ("scale", "set", "ablate", "add")
ROLES: tuple[str, ...] = ("transcoder", "sae")


class InterventionError(ValueError):
    """An intervention that cannot be applied (bad field, or it does not fit the run)."""


def _index_tuple(name: str, values: Iterable[int] | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InterventionError(f"{name} must be a list of ints or None (all), got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int,)) and not hasattr(v, "__index__"):
            raise InterventionError(f"{name} must hold ints, got {v!r}")
        out.append(int(v))
    if not out:
        raise InterventionError(f"{name} is empty; use None for all")
    if min(out) < 0:
        raise InterventionError(f"{name} must be >= 0, got {min(out)}")
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class FeatureEdit:
    """One feature edit (see the module docstring).

    Attributes:
        site: the dictionary's site (``Site``, ``"img_1"`` or ``(1, "img")``).
        feature: index inside that site's dictionary (``0 .. d_sae - 1``).
        op: ``"scale"``, ``"set"``, ``"ablate"`` or ``"add"``.
        value: the op's argument (ignored by ``"ablate"``, which stores 0).
        positions: stream positions (text tokens or patches ``row * cols + col``); None: all.
        steps: denoising steps (0-based); None: all.
        rows: batch rows (images of the run); None: all.
        strength: ``z' = z + strength · (z* − z)``.
    """

    site: Site
    feature: int
    op: EditOp
    value: float = 0.0
    positions: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", as_site(self.site))
        if isinstance(self.feature, bool) or not hasattr(self.feature, "__index__"):
            raise InterventionError(f"feature must be an int, got {self.feature!r}")
        object.__setattr__(self, "feature", int(self.feature))
        if self.feature < 0:
            raise InterventionError(
                f"feature must be >= 0, got {self.feature} (residue nodes are not features)"
            )
        if self.op not in OPS:
            raise InterventionError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        for name in ("value", "strength"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InterventionError(f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.op == "ablate":
            object.__setattr__(self, "value", 0.0)
        for name in ("positions", "steps", "rows"):
            object.__setattr__(self, name, _index_tuple(name, getattr(self, name)))

    def active_at(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def goal(self, z: torch.Tensor) -> torch.Tensor:
        """``z*`` for current activations ``z`` (any shape)."""
        if self.op == "scale":
            return z * self.value
        if self.op == "add":
            return z + self.value
        return torch.full_like(z, self.value)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["site"] = str(self.site)
        for k in ("positions", "steps", "rows"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureEdit:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InterventionError(f"unknown edit field(s) {sorted(unknown)}")
        return cls(**{**d, "site": Site.parse(str(d["site"]))})


@dataclass(frozen=True)
class Intervention:
    """Edits applied in order on the dictionaries of one ``role`` (``"transcoder"``: the
    features of transcoders attached to the traced model; ``"sae"``: SAEs over MLP outputs)."""

    edits: tuple[FeatureEdit, ...]
    role: Role = "transcoder"
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        edits = tuple(self.edits)
        if not all(isinstance(e, FeatureEdit) for e in edits):
            raise InterventionError("Intervention.edits must hold FeatureEdit objects")
        object.__setattr__(self, "edits", edits)
        if self.role not in ROLES:
            raise InterventionError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")

    @property
    def sites(self) -> list[Site]:
        return sorted({e.site for e in self.edits})

    def at_step(self, step: int) -> dict[Site, list[FeatureEdit]]:
        """``{site: edits}`` acting at ``step``, sites in execution order (layer, img, txt)."""
        out: dict[Site, list[FeatureEdit]] = {}
        for e in self.edits:
            if e.active_at(step):
                out.setdefault(e.site, []).append(e)
        return {s: out[s] for s in sorted(out, key=lambda s: (s.layer, s.stream != "img"))}

    def with_strength(self, strength: float) -> Intervention:
        """The same edits at another strength (e.g. for a sweep)."""
        return replace(self, edits=tuple(replace(e, strength=strength) for e in self.edits))

    def on_rows(self, rows: Sequence[int]) -> Intervention:
        """The same edits restricted to batch ``rows`` (to batch several interventions)."""
        return replace(self, edits=tuple(replace(e, rows=tuple(rows)) for e in self.edits))

    def __add__(self, other: Intervention) -> Intervention:
        if not isinstance(other, Intervention):
            return NotImplemented
        if other.role != self.role:
            raise InterventionError(f"cannot combine a {self.role} and a {other.role} intervention")
        return Intervention(self.edits + other.edits, self.role, self.label or other.label)

    def check(
        self,
        dictionaries: Mapping[Site, Any],
        n_steps: int | None = None,
        n_rows: int | None = None,
        n_positions: Mapping[str, int] | None = None,
    ) -> None:
        """Raise :class:`InterventionError` naming the first edit that does not fit: a site with
        no dictionary, a feature beyond ``d_sae``, a step, row or position out of range."""
        for e in self.edits:
            if e.site not in dictionaries:
                have = ", ".join(str(s) for s in sorted(dictionaries)) or "none"
                raise InterventionError(
                    f"edit of {e.site} #{e.feature}: no {self.role} at {e.site} (have: {have}); "
                    "attach or pass one for that site"
                )
            dic = dictionaries[e.site]
            d_sae = int(getattr(dic, "dictionary", dic).cfg.d_sae)  # a TranscoderSite or itself
            if e.feature >= d_sae:
                raise InterventionError(
                    f"edit of {e.site} #{e.feature}: the dictionary has {d_sae} features"
                )
            limits = {"steps": n_steps, "rows": n_rows}
            if n_positions is not None:
                limits["positions"] = n_positions.get(e.site.stream)
            for name, limit in limits.items():
                vals = getattr(e, name)
                if limit is not None and vals is not None and max(vals) >= limit:
                    raise InterventionError(
                        f"edit of {e.site} #{e.feature}: {name} {max(vals)} out of range "
                        f"(this run has {limit})"
                    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "label": self.label,
            "info": self.info,
            "edits": [e.to_dict() for e in self.edits],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Intervention:
        return cls(
            tuple(FeatureEdit.from_dict(e) for e in d["edits"]),
            role=d.get("role", "transcoder"),
            label=d.get("label", ""),
            info=dict(d.get("info", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _index(values: tuple[int, ...] | None, device: torch.device) -> Any:
    return slice(None) if values is None else torch.tensor(values, device=device)


def edit_features(z: torch.Tensor, edits: Sequence[FeatureEdit]) -> torch.Tensor:
    """Apply ``edits`` in order to activations ``z [B, S, d_sae]``; returns a new tensor.

    Raises:
        InterventionError: a row, position or feature outside ``z``.
    """
    if z.ndim != 3:
        raise InterventionError(f"expected activations [B, S, d_sae], got shape {list(z.shape)}")
    out = z.clone()
    b, s, d = z.shape
    for e in edits:
        for name, vals, limit in (("rows", e.rows, b), ("positions", e.positions, s)):
            if vals is not None and max(vals) >= limit:
                raise InterventionError(
                    f"edit of {e.site} #{e.feature}: {name} {max(vals)} out of range ({limit})"
                )
        if e.feature >= d:
            raise InterventionError(f"edit of {e.site} #{e.feature}: only {d} features")
        r, p = _index(e.rows, z.device), _index(e.positions, z.device)
        if isinstance(r, torch.Tensor) and isinstance(p, torch.Tensor):
            r = r[:, None]
        cur = out[r, p, e.feature]
        goal = e.goal(cur)
        out[r, p, e.feature] = goal if e.strength == 1.0 else cur + e.strength * (goal - cur)
    return out


# ---- from graphs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRef:
    """A feature node read from a graph: its site, feature id in that dictionary, stream
    position, the graph's step, its activation and (when known) its influence."""

    site: Site
    feature: int
    position: int
    step: int
    activation: float
    influence: float = float("nan")


def row_graph_nodes(
    graph: RowGraph,
    meta: GraphMeta,
    nodes: Iterable[int] | None = None,
    influence: torch.Tensor | None = None,
) -> list[NodeRef]:
    """Feature nodes of an in-memory graph as :class:`NodeRef` (residue nodes skipped).

    Args:
        nodes: feature-node indices ``0 .. graph.n_features - 1`` (the graph's node order);
            None: every feature node.
        influence: ``[M]`` node influences (default: ``graph.node_influence()``).
    """
    if influence is None:
        influence = graph.node_influence()
    idx = range(graph.n_features) if nodes is None else nodes
    out = []
    for i in idx:
        i = int(i)
        if not 0 <= i < graph.n_features:
            raise InterventionError(
                f"node {i} is not a feature node (feature nodes are 0..{graph.n_features - 1})"
            )
        a = int(graph.selected_features[i])
        layer, pos, fid = (int(v) for v in graph.active_features[a].tolist())
        if fid == RESIDUE_FEATURE:
            continue
        stream = meta.feature_stream(layer, fid)
        kind, _, _ = meta.position_kind(pos)
        if kind != stream:
            raise InterventionError(f"node {i}: a {stream} feature at a {kind} position {pos}")
        local = pos if stream == "txt" else pos - meta.n_txt
        out.append(
            NodeRef(
                Site(layer, stream),
                meta.stream_feature_index(layer, fid),
                local,
                meta.step,
                float(graph.activation_values[a]),
                float(influence[i]),
            )
        )
    return out


def top_feature_nodes(
    graph: RowGraph, meta: GraphMeta, k: int, sites: Iterable[Site] | None = None
) -> list[NodeRef]:
    """The ``k`` feature nodes of largest influence on the graph's targets (residue skipped),
    optionally only at ``sites``."""
    if k < 1:
        raise InterventionError(f"k must be >= 1, got {k}")
    refs = row_graph_nodes(graph, meta)
    if sites is not None:
        keep = {as_site(s) for s in sites}
        refs = [r for r in refs if r.site in keep]
    refs.sort(key=lambda r: -r.influence)
    return refs[:k]


def json_graph_nodes(graph: Mapping[str, Any], node_ids: Iterable[str]) -> list[NodeRef]:
    """Feature nodes of a graph JSON (``graphs.files`` format) by ``node_id``, read from their
    ``"difract"`` fields and the graph's ``metadata.step`` / ``metadata.grid``.

    Raises:
        InterventionError: an unknown node id or a node without ``"difract"`` (not a feature).
    """
    meta = graph.get("metadata", {})
    if "step" not in meta or "grid" not in meta:
        raise InterventionError("the graph JSON has no metadata.step / metadata.grid")
    cols = int(meta["grid"][1])
    by_id = {n["node_id"]: n for n in graph.get("nodes", [])}
    out = []
    for nid in node_ids:
        node = by_id.get(nid)
        if node is None:
            raise InterventionError(f"no node {nid!r} in this graph")
        f = node.get("difract")
        if f is None:
            raise InterventionError(f"node {nid!r} is not a feature node (no 'difract' fields)")
        site = Site.parse(f["site"])
        local = int(f["position"]) if f["patch"] is None else f["patch"][0] * cols + f["patch"][1]
        out.append(
            NodeRef(
                site,
                int(f["feature"]),
                local,
                int(meta["step"]),
                float(node.get("activation") or 0.0),
                float("nan") if node.get("influence") is None else float(node["influence"]),
            )
        )
    return out


def edits_from_nodes(
    nodes: Iterable[NodeRef | Sequence[NodeRef]],
    op: EditOp | Literal["activation"],
    value: float = 0.0,
    *,
    steps: Sequence[int] | Literal["graph"] | None = "graph",
    positions: Literal["node", "all"] = "node",
    rows: Sequence[int] | None = None,
    strength: float = 1.0,
) -> list[FeatureEdit]:
    """Edits for graph nodes (or groups of them, flattened).

    Args:
        op: an edit op, or ``"activation"``: set each feature to its activation in the graph.
        steps: ``"graph"`` (the node's graph step), explicit steps, or None (all steps).
        positions: ``"node"`` (the node's own position) or ``"all"``.
    """
    flat: list[NodeRef] = []
    for n in nodes:
        flat.extend([n] if isinstance(n, NodeRef) else list(n))
    edits = []
    for n in flat:
        st = (n.step,) if steps == "graph" else None if steps is None else tuple(steps)
        edits.append(
            FeatureEdit(
                n.site,
                n.feature,
                "set" if op == "activation" else op,
                n.activation if op == "activation" else value,
                positions=(n.position,) if positions == "node" else None,
                steps=st,
                rows=rows,
                strength=strength,
            )
        )
    return edits


def edits_from_row_graph(
    graph: RowGraph,
    meta: GraphMeta,
    nodes: Iterable[int | Sequence[int]],
    op: EditOp | Literal["activation"],
    value: float = 0.0,
    **kwargs: Any,
) -> list[FeatureEdit]:
    """:func:`edits_from_nodes` for feature-node indices (or groups of them) of a ``RowGraph``."""
    flat = [i for n in nodes for i in ([n] if hasattr(n, "__index__") else n)]
    return edits_from_nodes(row_graph_nodes(graph, meta, flat), op, value, **kwargs)


def edits_from_graph_json(
    graph: Mapping[str, Any],
    node_ids: Iterable[str | Sequence[str]],
    op: EditOp | Literal["activation"],
    value: float = 0.0,
    **kwargs: Any,
) -> list[FeatureEdit]:
    """:func:`edits_from_nodes` for node ids (or groups of them) of a graph JSON."""
    flat = [i for n in node_ids for i in ([n] if isinstance(n, str) else n)]
    return edits_from_nodes(json_graph_nodes(graph, flat), op, value, **kwargs)
