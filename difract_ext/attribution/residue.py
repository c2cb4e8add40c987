"""Residue nodes: what the features left unexpanded under a node budget still carry.

An attribution run with a feature budget expands only some active features; the columns of the
others would simply vanish, and rows would no longer sum to their values. For every (layer,
position) with unexpanded features, a *residue* pseudo-feature (id
:data:`~difract_ext.attribution.graph_meta.RESIDUE_FEATURE`) receives, in each row, the row's
direct effect of *all* active features there (:class:`~difract_ext.attribution.edges.RowTotals`)
minus that of the expanded ones: conservation stays exact. Residue rows are not expanded (zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difract_ext.attribution.edges import RowTotals
from difract_ext.attribution.graph_meta import RESIDUE_FEATURE


@dataclass
class ResidueGraph:
    """A graph's tensors with residue nodes inserted after the selected features.

    ``adjacency [M + R, M + R]``, ``active_features [N + R, 3]`` (residue rows
    ``(layer, pos, RESIDUE_FEATURE)``), ``selected [S + R]`` (residue ids ``N .. N + R - 1``),
    ``activation_values [N + R]`` (a residue's value: the sum of its features' activations).
    """

    adjacency: torch.Tensor
    active_features: torch.Tensor
    selected: torch.Tensor
    activation_values: torch.Tensor
    n_residue: int


def add_residue(
    adjacency: torch.Tensor,
    active_features: torch.Tensor,
    selected: torch.Tensor,
    activation_values: torch.Tensor,
    n_targets: int,
    totals: RowTotals,
    n_pos: int,
) -> ResidueGraph:
    """Insert one residue node per (layer, position) with unexpanded features.

    Args:
        adjacency: ``[M, M]`` in circuit-tracer's layout (selected features, errors, inputs,
            ``n_targets`` targets last); rows are targets, columns sources.
        active_features: ``[N, 3]`` (layer, position, feature id) of every active feature.
        selected: ``[S]`` the expanded features (indices into ``active_features``).
        activation_values: ``[N]``.
        totals: the row totals of every selected feature and every target.
        n_pos: positions per layer.

    Returns:
        the new tensors; unchanged ones (and ``n_residue == 0``) when every feature was expanded.
    """
    n_active = len(active_features)
    unselected = torch.ones(n_active, dtype=torch.bool)
    unselected[selected.cpu()] = False
    if not bool(unselected.any()):
        return ResidueGraph(adjacency, active_features, selected, activation_values, 0)
    # circuit-tracer keeps the adjacency on the CPU: everything else joins it there
    feats, selected, values = active_features.cpu(), selected.cpu(), activation_values.cpu()
    cells = torch.unique(feats[unselected, 0] * n_pos + feats[unselected, 1])
    n_sel, n_res, k = len(selected), len(cells), n_targets
    m = adjacency.shape[0]
    new = torch.zeros(m + n_res, m + n_res, dtype=adjacency.dtype, device=adjacency.device)
    keep = torch.cat([torch.arange(n_sel), torch.arange(n_sel, m) + n_res])
    new[keep[:, None], keep[None, :]] = adjacency
    # rows of the graph: selected features, then targets (last k)
    row_ids = torch.cat([torch.arange(n_sel), torch.arange(m + n_res - k, m + n_res)])
    sel_cells = feats[selected, 0] * n_pos + feats[selected, 1]
    # [R, L * P] direct effect of all features per cell, in the adjacency's precision
    flat = totals.stack(selected, k).flatten(1).to(new.device, new.dtype)
    explored = torch.zeros_like(flat).index_add_(1, sel_cells, new[row_ids, :n_sel])
    new[row_ids[:, None], torch.arange(n_sel, n_sel + n_res)[None, :]] = (flat - explored)[:, cells]
    res_feats = torch.stack(
        [cells // n_pos, cells % n_pos, torch.full_like(cells, RESIDUE_FEATURE)], dim=1
    )
    acts = torch.zeros(n_res, dtype=values.dtype).index_add_(
        0,
        torch.searchsorted(cells, feats[unselected, 0] * n_pos + feats[unselected, 1]),
        values[unselected],
    )
    return ResidueGraph(
        adjacency=new,
        active_features=torch.cat([feats, res_feats.to(feats.dtype)]),
        selected=torch.cat([selected, n_active + torch.arange(n_res)]),
        activation_values=torch.cat([values, acts]),
        n_residue=n_res,
    )
