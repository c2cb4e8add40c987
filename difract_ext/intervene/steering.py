"""Two ways to choose an intervention for an edit, with one API (:class:`~.spec.Intervention`).

- **Circuit-guided** (:func:`circuit_steering`): from attribution graphs of the edit's targets
  (e.g. ``x0·red @ left`` on the source prompt and ``x0·blue @ left`` on the concept prompt, one
  graph per denoising step), take the ``k`` feature nodes of largest influence; ablate the
  source's at their position and step, and set the concept's to their activation in the concept
  graph, at their position and step only. ``strength`` interpolates (``z + s·(z* − z)``).
- **Mean-difference steering** (:func:`mean_difference_steering`, the usual SAE steering): the
  ``k`` features per site whose mean activation (over prompts, seeds, positions and steps) grows
  most from contrast prompts to concept prompts; each adds its mean difference times its
  decoder direction at every position and step, times ``strength``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.attribution.row_graph import RowGraph
from difract_ext.flux.sites import Site, as_site
from difract_ext.intervene.spec import (
    FeatureEdit,
    Intervention,
    InterventionError,
    Role,
    edits_from_nodes,
    top_feature_nodes,
)

GraphPair = tuple[RowGraph, GraphMeta]


def circuit_steering(
    source: Sequence[GraphPair],
    concept: Sequence[GraphPair],
    k: int = 8,
    strength: float = 1.0,
    label: str = "",
) -> Intervention:
    """Circuit-guided intervention (see the module docstring).

    Args:
        source: graphs of the source prompt's target (what to remove), one per step (or none).
        concept: graphs of the concept prompt's target (what to put), one per step (or none).
        k: feature nodes taken from each graph.
    """
    if not source and not concept:
        raise InterventionError("circuit_steering needs at least one graph")
    edits: list[FeatureEdit] = []
    chosen: list[dict[str, object]] = []
    for graphs, op in ((source, "ablate"), (concept, "activation")):
        for graph, meta in graphs:
            nodes = top_feature_nodes(graph, meta, k)
            edits += edits_from_nodes(nodes, op, strength=strength)  # type: ignore[arg-type]
            chosen += [
                {"site": str(n.site), "feature": n.feature, "position": n.position,
                 "step": n.step, "influence": n.influence, "op": op}
                for n in nodes
            ]  # fmt: skip
    return Intervention(tuple(edits), "transcoder", label, info={"nodes": chosen})


def mean_difference_steering(
    concept_means: Mapping[Site, torch.Tensor],
    contrast_means: Mapping[Site, torch.Tensor],
    k: int = 8,
    strength: float = 1.0,
    role: Role = "sae",
    label: str = "",
) -> Intervention:
    """Add the ``k`` features per site of largest positive mean difference (concept − contrast),
    each by its difference, at all positions and steps.

    Args:
        concept_means, contrast_means: ``{site: [d_sae]}`` mean activations.
    """
    if k < 1:
        raise InterventionError(f"k must be >= 1, got {k}")
    edits: list[FeatureEdit] = []
    for key in sorted(concept_means, key=as_site):
        site = as_site(key)
        if key not in contrast_means:
            raise InterventionError(f"no contrast means for {site}")
        diff = concept_means[key].double() - contrast_means[key].double()
        vals, idx = torch.sort(diff, descending=True)
        for v, i in zip(vals[:k].tolist(), idx[:k].tolist()):
            if v > 0:
                edits.append(FeatureEdit(site, i, "add", v, strength=strength))
    return Intervention(tuple(edits), role, label)
