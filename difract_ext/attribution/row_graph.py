"""An attribution graph stored by rows: only the nodes that have incoming edges get a row.

Nodes follow circuit-tracer's order (:mod:`difract_ext.attribution.graph_meta`): ``[feature
nodes (S: expanded features, then residue nodes), error nodes (l * P + p), input nodes (P),
targets (K)]``, ``M = S + (L + 1) * P + K`` in all. Error, input and residue nodes never have
incoming edges, so circuit-tracer's square ``[M, M]`` adjacency is all zeros outside the rows of
the expanded features and the targets. :class:`RowGraph` keeps those rows only, ``[R, M]`` with
``R = expanded features + K``: memory grows with ``positions × layers`` (linearly), not with
its square.

Influence, pruning and the replacement / completeness scores are circuit-tracer's
(``circuit_tracer.graph``: ``compute_influence``, ``prune_graph``, ``compute_graph_scores``),
computed on the rows: a product ``v @ A`` only needs ``v`` at the row nodes, and the edge scores
of rows that do not exist are the zeros circuit-tracer would sort (tests compare both on graphs
small enough for the dense form). Products are taken over row chunks and the normalised matrix
is never materialised whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

#: Bytes of float32 one row chunk of a product may take (normalised chunk).
CHUNK_BYTES = 1 << 27
#: Above this size :meth:`RowGraph.dense_adjacency` refuses (the point of rows is not to).
DENSE_LIMIT_BYTES = 4 << 30


class TargetNode(NamedTuple):
    """A target node: circuit-tracer's ``LogitTarget`` fields (``vocab_idx`` is virtual)."""

    token_str: str
    vocab_idx: int


class RowPrune(NamedTuple):
    """circuit-tracer's ``PruneResult`` on rows.

    ``node_mask [M]``, ``edge_mask [R, M]`` (the rows' edges), ``cumulative_scores [M]``, and
    ``zero_edges_kept``: whether the edge threshold came out at 0, in which case circuit-tracer
    also keeps every zero entry of the square matrix (rows that do not exist here).
    """

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative_scores: torch.Tensor
    zero_edges_kept: bool


@dataclass
class RowGraph:
    """An attribution graph as the rows of its expanded nodes.

    Attributes:
        rows: ``[R, M]`` float32; row ``r`` holds the incoming edges (direct effects) of node
            ``row_nodes[r]`` from every node (columns in node order).
        row_nodes: ``[R]`` ascending node index of each row (expanded features, then targets).
        active_features: ``[N', 3]`` (layer, position, feature id) of every active feature and
            residue node (feature id :data:`~difract_ext.attribution.graph_meta.RESIDUE_FEATURE`).
        selected_features: ``[S]`` indices into ``active_features`` of the feature nodes.
        activation_values: ``[N']``.
        logit_targets: one :class:`TargetNode` per target.
        logit_probabilities: ``[K]`` target weights (summing to 1).
        n_pos, n_layers: positions and layers (``cfg.n_layers`` for circuit-tracer).
        input_string: the prompt; ``scan``: the transcoder set's name.
        info: how the graph was built (passes, regime, ...).
    """

    rows: torch.Tensor
    row_nodes: torch.Tensor
    active_features: torch.Tensor
    selected_features: torch.Tensor
    activation_values: torch.Tensor
    logit_targets: list[TargetNode]
    logit_probabilities: torch.Tensor
    n_pos: int
    n_layers: int
    input_string: str = ""
    scan: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rows.shape != (len(self.row_nodes), self.n_nodes):
            raise ValueError(
                f"rows {list(self.rows.shape)} do not match {len(self.row_nodes)} row nodes "
                f"x {self.n_nodes} nodes (S + (L + 1) * P + K)"
            )

    # ---- layout -----------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        """Feature nodes ``S`` (expanded and residue)."""
        return len(self.selected_features)

    @property
    def n_targets(self) -> int:
        return len(self.logit_targets)

    @property
    def error_end(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def token_end(self) -> int:
        return self.error_end + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.token_end + self.n_targets

    @property
    def input_tokens(self) -> torch.Tensor:
        """``[P]`` one pseudo token per position (circuit-tracer's ``input_tokens``)."""
        return torch.arange(self.n_pos)

    def target_row(self, k: int) -> torch.Tensor:
        """``[M]`` the incoming edges of target ``k``."""
        return self.rows[len(self.row_nodes) - self.n_targets + k]

    def logit_weights(self) -> torch.Tensor:
        """``[M]`` circuit-tracer's logit weights: target probabilities on the target nodes."""
        w = torch.zeros(self.n_nodes, device=self.rows.device)
        w[-self.n_targets :] = self.logit_probabilities.to(w.device, w.dtype)
        return w

    def dense_adjacency(self, max_bytes: int = DENSE_LIMIT_BYTES) -> torch.Tensor:
        """circuit-tracer's square ``[M, M]`` adjacency (zeros outside the rows).

        Raises:
            MemoryError: it would exceed ``max_bytes`` (prune or score the rows instead).
        """
        m = self.n_nodes
        if m * m * 4 > max_bytes:
            raise MemoryError(
                f"a dense {m} x {m} adjacency needs {m * m * 4 / 2**30:.1f} GiB (limit "
                f"{max_bytes / 2**30:.1f}); use RowGraph.prune()/scores(), which work on the rows"
            )
        dense = torch.zeros(m, m, dtype=self.rows.dtype, device=self.rows.device)
        dense[self.row_nodes.to(dense.device)] = self.rows
        return dense

    @classmethod
    def from_dense(
        cls, adjacency: torch.Tensor, n_features: int, n_targets: int, **fields: Any
    ) -> RowGraph:
        """The rows of a square adjacency that are not all zero, and every target's row
        (``n_features`` is unused by the layout but checked; ``fields``: the other attributes).
        """
        m = adjacency.shape[0]
        if m - n_targets < n_features:
            raise ValueError(f"{m} nodes cannot hold {n_features} features and {n_targets} targets")
        keep = adjacency.abs().sum(1) > 0
        keep[m - n_targets :] = True
        nodes = torch.nonzero(keep.cpu(), as_tuple=True)[0]
        return cls(rows=adjacency[nodes].float(), row_nodes=nodes, **fields)

    # ---- influence, pruning, scores (circuit-tracer's semantics) -----------------------------
    def node_influence(self) -> torch.Tensor:
        """``[M]`` circuit-tracer's ``compute_node_influence`` (influence on the targets through
        the row-normalised ``|A|``)."""
        return _Normalized(self).influence(self.logit_weights())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> RowPrune:
        """circuit-tracer's ``prune_graph`` on the rows (see :class:`RowPrune`)."""
        if not 0.0 <= node_threshold <= 1.0:
            raise ValueError("node_threshold must be between 0.0 and 1.0")
        if not 0.0 <= edge_threshold <= 1.0:
            raise ValueError("edge_threshold must be between 0.0 and 1.0")
        n_keep_always = self.n_targets + self.n_pos
        lw = self.logit_weights()
        node_influence = _Normalized(self).influence(lw)
        node_mask = node_influence >= find_threshold(node_influence, node_threshold)
        node_mask[-n_keep_always:] = True

        pruned = _Normalized(self, node_mask)
        weight = (pruned.influence(lw) + lw)[self.row_nodes.to(lw.device)]  # [R]
        kept_scores = [s[s > 0] for _, s in pruned.edge_scores(weight)]
        scores = torch.cat([*kept_scores, torch.zeros(1, device=lw.device)])  # + the zeros
        threshold = find_threshold(scores, edge_threshold)
        del kept_scores, scores
        edge_mask = torch.zeros(self.rows.shape, dtype=torch.bool, device=self.rows.device)
        for sl, s in pruned.edge_scores(weight):
            edge_mask[sl] = s >= threshold
        zero_kept = bool(threshold <= 0)
        node_mask = _refine_node_mask(self, node_mask, edge_mask, zero_kept)

        sorted_scores, order = torch.sort(node_influence, descending=True)
        cumulative = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
        final = torch.zeros_like(node_influence)
        final[order] = cumulative
        return RowPrune(node_mask, edge_mask, final, zero_kept)

    def scores(self) -> tuple[float, float]:
        """circuit-tracer's ``compute_graph_scores``: ``(replacement, completeness)``."""
        lw = self.logit_weights()
        norm = _Normalized(self)
        infl = norm.influence(lw)
        token = infl[self.error_end : self.token_end].sum()
        error = infl[self.n_features : self.error_end].sum()
        replacement = token / (token + error)
        non_error = torch.ones(self.n_nodes, device=lw.device)
        for sl, chunk in norm.chunks():
            non_error[self.row_nodes[sl].to(lw.device)] = 1 - chunk[
                :, self.n_features : self.error_end
            ].sum(-1)
        out_infl = infl + lw
        completeness = (non_error * out_infl).sum() / out_infl.sum()
        return float(replacement), float(completeness)

    def vector_product(self, v: torch.Tensor) -> torch.Tensor:
        """``v @ A`` for ``v [M]`` in ``v``'s dtype (row chunks; rows where ``v`` is 0 skipped)."""
        vr = v[self.row_nodes.to(v.device)]
        out = torch.zeros(self.n_nodes, dtype=v.dtype, device=v.device)
        live = torch.nonzero(vr, as_tuple=True)[0]
        step = max(1, CHUNK_BYTES // max(1, 8 * self.n_nodes))
        for start in range(0, len(live), step):
            rows = live[start : start + step]
            out += vr[rows] @ self.rows[rows.to(self.rows.device)].to(v.device, v.dtype)
        return out

    def row_sums(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``([R] Σ_j A[r, j], [R] Σ_j |A[r, j]|)`` in ``dtype`` (row chunks)."""
        sums, abs_sums = [], []
        step = max(1, CHUNK_BYTES // max(1, 8 * self.n_nodes))
        for start in range(0, len(self.row_nodes), step):
            chunk = self.rows[start : start + step].to(dtype)
            sums.append(chunk.sum(-1))
            abs_sums.append(chunk.abs().sum(-1))
        empty = torch.zeros(0, dtype=dtype, device=self.rows.device)
        return torch.cat(sums) if sums else empty, torch.cat(abs_sums) if abs_sums else empty

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and lists (``torch.save`` it; :meth:`from_dict` reads it back)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["logit_targets"] = [tuple(t) for t in self.logit_targets]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RowGraph:
        d = dict(d)
        d["logit_targets"] = [TargetNode(str(a), int(b)) for a, b in d["logit_targets"]]
        return cls(**d)


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """circuit-tracer's ``find_threshold``: the score at which the sorted scores' cumulative
    share reaches ``threshold``."""
    sorted_scores = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    index = int(torch.searchsorted(cumulative, threshold).item())
    return sorted_scores[min(index, len(cumulative) - 1)]


class _Normalized:
    """The row-normalised ``|A|`` of a graph's rows, optionally restricted to the nodes of
    ``node_mask`` (rows and columns of the other nodes zero), computed chunk by chunk."""

    def __init__(self, graph: RowGraph, node_mask: torch.Tensor | None = None) -> None:
        self.rows = graph.rows
        self.row_nodes = graph.row_nodes.to(graph.rows.device)
        self.n_nodes = graph.n_nodes
        self.col_mask = None if node_mask is None else node_mask.to(self.rows.dtype)
        self.row_mask = None if node_mask is None else node_mask[self.row_nodes]
        step = max(1, CHUNK_BYTES // max(1, 4 * self.n_nodes))
        self.slices = [slice(i, i + step) for i in range(0, len(self.row_nodes), step)]
        sums = [self._abs(sl).sum(dim=1) for sl in self.slices]
        self.sums = torch.cat(sums) if sums else torch.zeros(0, device=self.rows.device)

    def _abs(self, sl: slice) -> torch.Tensor:
        a = self.rows[sl].abs()
        if self.col_mask is not None:
            a *= self.col_mask
            a[~self.row_mask[sl]] = 0
        return a

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows slice, normalised chunk [n, M])``, as circuit-tracer's ``normalize_matrix``."""
        for sl in self.slices:
            yield sl, self._abs(sl) / self.sums[sl, None].clamp(min=1e-10)

    def product(self, v: torch.Tensor) -> torch.Tensor:
        """``v @ Â`` for ``v [M]`` (only the rows where ``v`` is non-zero are read)."""
        vr = v[self.row_nodes]
        out = torch.zeros(self.n_nodes, dtype=v.dtype, device=v.device)
        for sl in self.slices:
            live = torch.nonzero(vr[sl], as_tuple=True)[0]
            if len(live) == 0:
                continue
            rows = live + sl.start
            a = self.rows[rows].abs()
            if self.col_mask is not None:
                a *= self.col_mask
                a[~self.row_mask[rows]] = 0
            a /= self.sums[rows, None].clamp(min=1e-10)
            out += vr[rows] @ a
        return out

    def influence(self, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
        """circuit-tracer's ``compute_influence``: ``w Â + w Â² + ...`` until it vanishes."""
        current = self.product(weights)
        influence = current.clone()
        iterations = 0
        while bool(current.any()):
            if iterations >= max_iter:
                raise RuntimeError(
                    f"Influence computation failed to converge after {iterations} iterations"
                )
            current = self.product(current)
            influence += current
            iterations += 1
        return influence

    def edge_scores(self, weight: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows slice, Â[rows] * weight[rows, None])``: circuit-tracer's edge scores."""
        for sl, chunk in self.chunks():
            yield sl, chunk * weight[sl, None]


def _refine_node_mask(
    graph: RowGraph, node_mask: torch.Tensor, edge_mask: torch.Tensor, zero_kept: bool
) -> torch.Tensor:
    """circuit-tracer's iterative removal of feature/error nodes without outgoing edges and
    feature nodes without incoming edges, on the rows (``edge_mask`` is updated in place).

    Rows that do not exist are all-zero rows of the square matrix: they have no kept edge unless
    the threshold came out at 0 (``zero_kept``), in which case every entry of the square matrix
    is kept, every node has edges both ways and nothing is removed.
    """
    if zero_kept:
        return node_mask
    n_src = graph.n_nodes - graph.n_targets - graph.n_pos  # features and errors
    n_feat = graph.n_features
    row_nodes = graph.row_nodes.to(node_mask.device)
    feature_rows = row_nodes < n_feat

    def refine() -> None:
        node_mask[:n_src] &= edge_mask[:, :n_src].any(0)
        incoming = torch.zeros(n_feat, dtype=torch.bool, device=node_mask.device)
        incoming[row_nodes[feature_rows]] = edge_mask[feature_rows].any(1)
        node_mask[:n_feat] &= incoming

    old = node_mask.clone()
    refine()
    while not bool(torch.all(node_mask == old)):
        old[:] = node_mask
        edge_mask[~node_mask[row_nodes]] = False
        edge_mask[:, ~node_mask] = False
        refine()
    return node_mask
