"""Checks that an attribution graph means what it says, all of which can fail.

- :func:`source_perturbations`: remove each source node (feature, residue, error, input) from the
  frozen replacement model and measure every row's change; for an affine model it must equal
  minus that adjacency column;
- :func:`conservation`: each row's incoming edges sum to the row's value minus its constant terms
  (the value of the frozen model with every source removed);
- :func:`ablation_spearman`: in the *unfrozen* model, ablate the top nodes and compare the measured
  change of the target with the graph's total effect
  (:func:`~difract_ext.attribution.effects.total_effects`, value-normalised); the full report is
  :mod:`~difract_ext.attribution.faithfulness`.

Node order follows circuit-tracer's layout: ``[selected features (incl. residue), errors
(l * P + p), inputs (P), targets (K)]``; the graph is a
:class:`~difract_ext.attribution.row_graph.RowGraph`, whose rows are those of the expanded
features and the targets (``row_nodes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difract_ext.attribution.effects import total_effects
from difract_ext.attribution.faithfulness import ablation_agreement, agreement, top_nodes
from difract_ext.attribution.graph_meta import RESIDUE_FEATURE
from difract_ext.attribution.partial import UNFROZEN, node_vectors


@dataclass
class SourceLayout:
    """Where each source node of a graph acts in the frozen model."""

    n_feat: int
    n_layers: int
    n_pos: int
    n_targets: int

    @property
    def n_sources(self) -> int:
        return self.n_feat + (self.n_layers + 1) * self.n_pos


def _layout(result: Any) -> SourceLayout:
    g = result.graph
    return SourceLayout(
        len(g.selected_features), result.meta.n_layers, result.meta.n_pos, len(g.logit_targets)
    )


def row_functionals(result: Any, mlp_in: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` value (without constants) of every row of the graph (``row_nodes`` order):
    feature pre-activations (``⟨mlp_in[l, p], encoder vector⟩``) and targets' functionals;
    0 for the row of a residue node (a graph from another source may have one)."""
    g, c = result.graph, result.components
    lay = _layout(result)
    nodes = g.row_nodes.cpu()
    rows = torch.zeros(mlp_in.shape[0], len(nodes), dtype=mlp_in.dtype, device=mlp_in.device)
    is_feat = nodes < lay.n_feat
    idx = torch.nonzero(is_feat, as_tuple=True)[0]
    active = g.selected_features[nodes[idx]]
    real = active < c.n_active
    idx, active = idx[real], active[real]
    if idx.numel():
        feats = g.active_features[active]
        enc = c.encoder_vecs[active.to(c.encoder_vecs.device)].to(mlp_in.device)
        h = mlp_in[:, feats[:, 0], feats[:, 1]]  # [B, n, d]
        rows[:, idx] = (h * enc).sum(-1)
    first_target = g.n_nodes - lay.n_targets
    for r in torch.nonzero(~is_feat, as_tuple=True)[0].tolist():
        k = int(nodes[r]) - first_target
        rows[:, r] = result.targets[k].functional(mlp_in, resid)
    return rows


def _perturbed_sources(
    result: Any, columns: torch.Tensor, clean: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[B, P, d]`` and MLP outputs ``[B, L, P, d]`` with one source removed per row."""
    lay = _layout(result)
    c = result.components
    b = len(columns)
    embed = clean["embed"].expand(b, -1, -1).clone()
    mlp_out = clean["mlp_out"].expand(b, -1, -1, -1).clone()
    loc, dec = node_vectors(result)
    for i, j in enumerate(columns.tolist()):
        if j < lay.n_feat:
            mlp_out[i, loc[j, 0], loc[j, 1]] -= dec[j].to(mlp_out.device)
        elif j < lay.n_feat + lay.n_layers * lay.n_pos:
            layer, pos = divmod(j - lay.n_feat, lay.n_pos)
            mlp_out[i, layer, pos] -= c.error_vectors[layer, pos]
        elif j < lay.n_sources:
            embed[i, j - lay.n_feat - lay.n_layers * lay.n_pos] = 0
        else:
            raise IndexError(f"column {j} is a target, not a source")
    return embed, mlp_out


@torch.no_grad()
def source_perturbations(
    result: Any, columns: torch.Tensor | None = None, batch: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Measured vs predicted change of every row when each source column is removed.

    Returns:
        ``(measured, predicted)``, each ``[n_columns, R]`` (the graph's rows);
        ``predicted = -A[rows, col]``.
    """
    model = result.model
    lay = _layout(result)
    cols = torch.arange(lay.n_sources) if columns is None else columns
    clean = model.clean
    base = row_functionals(result, clean["mlp_in"][None], clean["resid_final"][None])[0]
    measured = []
    for s in range(0, len(cols), batch):
        chunk = cols[s : s + batch]
        embed, mlp_out = _perturbed_sources(result, chunk, clean)
        out = model.frozen.replay(embed, mlp_out)
        measured.append(row_functionals(result, out["mlp_in"], out["resid_final"]) - base)
    predicted = -result.graph.rows[:, cols.to(result.graph.rows.device)].T.cpu()
    return torch.cat(measured).cpu(), predicted.to(base.dtype)


@torch.no_grad()
def conservation(result: Any) -> dict[str, float]:
    """Σ incoming edges vs (row value − value with every source removed), per row.

    Returns ``max_rel_error`` (relative to the sum of the magnitudes of every term compared:
    edges, the row value and its constant), ``max_abs_error`` and the number of rows checked.
    """
    model = result.model
    lay = _layout(result)
    clean = model.clean
    c = result.components
    zero_embed = torch.zeros_like(clean["embed"])[None]
    bias_only = c.bias[None].to(clean["mlp_out"].dtype)  # b_dec where a dictionary writes, else 0
    empty = model.frozen.replay(zero_embed, bias_only)
    full = row_functionals(result, clean["mlp_in"][None], clean["resid_final"][None])[0]
    const = row_functionals(result, empty["mlp_in"], empty["resid_final"])[0]
    g = result.graph
    sums, abs_sums = (t.cpu() for t in g.row_sums(torch.float64))  # the check's own sums
    full, const = full.double().cpu(), const.double().cpu()
    # the floating-point scale of the comparison: every term that was summed
    scale = (abs_sums + full.abs() + const.abs()).clamp(min=1e-12)
    err = (sums - (full - const)).abs()
    nodes = g.row_nodes.cpu()
    real_rows = torch.ones(len(nodes), dtype=torch.bool)
    is_feat = nodes < lay.n_feat
    feats = g.active_features[g.selected_features[nodes[is_feat]]]
    real_rows[is_feat] = feats[:, 2] != RESIDUE_FEATURE  # residue rows are not expanded
    return {
        "max_rel_error": float((err / scale)[real_rows].max()),
        "max_abs_error": float(err[real_rows].max()),
        "rows": int(real_rows.sum()),
    }


@torch.no_grad()
def ablation_spearman(result: Any, top: int = 30, target: int = 0) -> dict[str, Any]:
    """Ablate each of the ``top`` feature/residue/error nodes by |total effect| in the
    **unfrozen** model (the real transformer, everything downstream recomputed) and compare the
    measured change of target ``target`` with the graph's prediction, minus the node's total
    effect (:func:`~difract_ext.attribution.effects.total_effects`).

    Returns ``spearman``, ``pearson``, ``sign_agreement``, ``n`` and the ``measured`` and
    ``predicted`` changes ``[n]``. Output and feature targets alike; the full report (several
    perturbation sizes, which freeze leaks, node selection) is
    :func:`~difract_ext.attribution.faithfulness.faithfulness_report`.
    """
    effects = total_effects(result.graph).effects
    nodes = top_nodes(result, effects[target], top)
    out = ablation_agreement(result, nodes, effects, (1.0,), UNFROZEN)
    m, p = out["measured"][0, :, target], out["predicted"][0, :, target]
    return {**agreement(m, p), "measured": m, "predicted": p}
