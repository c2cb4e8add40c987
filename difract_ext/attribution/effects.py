"""Total effects of every node on every target of a graph, in the graph's own (linear) model.

An entry ``A[j, i]`` of a graph is the contribution of node i's *whole value* to node j's row
(a feature's pre-activation, a target's value). A feature node's value is its activation ``a_j``,
which follows its pre-activation with slope 1, so a change ``δ`` of row j moves every outgoing
edge of j by the factor ``δ / a_j``. The effect of a path therefore divides by each intermediate
node's value:

``x = e_k (I − A D⁻¹)⁻¹`` (``D`` the diagonal of node values, over the expanded features), and the
total effect of node i's whole value on target k is ``(x A)_i``: removing node i changes target k
by ``−(x A)_i``, and removing a fraction ``s`` of it by ``−s (x A)_i``. Checked against exact
perturbations of that model (:class:`~difract_ext.attribution.partial.PartialFlux` with every
freeze on) for every node kind in ``tests/test_total_effects.py``.

The products run over the graph's rows (:class:`~difract_ext.attribution.row_graph.RowGraph`) in
chunks; no square matrix is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difract_ext.attribution.row_graph import CHUNK_BYTES, RowGraph


@dataclass
class TotalEffects:
    """Total effects of a graph's nodes.

    Attributes:
        effects: ``[K, M]`` float64; ``effects[k, i]``: the part of target k's value that node
            i's whole value contributes through every path (0 at the targets themselves).
        weights: ``[K]`` the targets' weights (circuit-tracer's logit probabilities).
    """

    effects: torch.Tensor
    weights: torch.Tensor

    @property
    def influence(self) -> torch.Tensor:
        """``[M]`` the weighted total effect on all targets, ``Σ_k w_k effects[k]`` (signed;
        rank nodes by its magnitude)."""
        return self.weights.to(self.effects.dtype) @ self.effects


def feature_row_values(graph: RowGraph) -> torch.Tensor:
    """``[R]`` the value of each row's node: a feature's activation, 1 for a target (float64).

    Raises:
        ValueError: an expanded feature has activation 0 (its edges could not be normalised).
    """
    nodes = graph.row_nodes.cpu()
    values = torch.ones(len(nodes), dtype=torch.float64)
    is_feat = nodes < graph.n_features
    active = graph.selected_features[nodes[is_feat]]
    values[is_feat] = graph.activation_values[active].double().cpu()
    if bool((values[is_feat] == 0).any()):
        raise ValueError("an expanded feature has activation 0: its edges cannot be normalised")
    return values


def _rows_product(graph: RowGraph, v: torch.Tensor) -> torch.Tensor:
    """``v @ rows`` for ``v [K, R]`` (float64), row chunks; chunks where ``v`` is 0 skipped."""
    rows = graph.rows
    out = torch.zeros(v.shape[0], graph.n_nodes, dtype=torch.float64, device=rows.device)
    step = max(1, CHUNK_BYTES // max(1, 8 * graph.n_nodes))
    v = v.to(rows.device)
    for start in range(0, rows.shape[0], step):
        part = v[:, start : start + step]
        if not bool(part.any()):
            continue
        out += part @ rows[start : start + step].double()
    return out


@torch.no_grad()
def total_effects(graph: RowGraph, max_iter: int = 1000) -> TotalEffects:
    """Every node's total effect on every target (see the module docstring).

    Returns:
        :class:`TotalEffects` with ``effects [K, M]``.

    Raises:
        RuntimeError: the series does not vanish in ``max_iter`` steps (a cycle).
    """
    n_rows, k = len(graph.row_nodes), graph.n_targets
    effects = row_total_effects(graph, torch.arange(n_rows - k, n_rows), max_iter)
    w = graph.logit_probabilities.to(torch.float64)
    return TotalEffects(effects=effects, weights=w.cpu())


@torch.no_grad()
def row_total_effects(graph: RowGraph, rows: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``[len(rows), M]`` every node's total effect on the value of each listed row's node
    (``rows``: indices into ``graph.row_nodes``; an expanded feature's row: its pre-activation
    without constants), float64 on the CPU."""
    n_rows = len(graph.row_nodes)
    values = feature_row_values(graph).to(graph.rows.device)
    nodes = graph.row_nodes.to(graph.rows.device)
    is_feat = nodes < graph.n_features
    x = torch.zeros(len(rows), n_rows, dtype=torch.float64, device=graph.rows.device)
    x[torch.arange(len(rows)), rows.to(x.device)] = 1.0
    total, current = x.clone(), x
    for _ in range(max_iter):
        y = _rows_product(graph, current)  # [K, M]: effect per unit of each row node's value
        current = torch.zeros_like(current)
        current[:, is_feat] = y[:, nodes[is_feat]] / values[is_feat]
        if not bool(current.any()):
            break
        total += current
    else:
        raise RuntimeError(f"total effects did not converge in {max_iter} steps (a cycle?)")
    return _rows_product(graph, total).cpu()
