"""Does a graph say what the real model does? The faithfulness report of one graph.

For each target of the graph (output or feature, single position or summed):

1. **ablation agreement**: the top nodes by total effect (features, residue and error nodes) are
   each ablated by a fraction ``s`` of their value (1 % ... full ablation) in the *real*
   transformer; the measured change of the target is compared with the graph's prediction
   ``−s · effect`` (:func:`~difract_ext.attribution.effects.total_effects`): Spearman, Pearson and
   the share of nodes whose signs agree;
2. **breakdown**: the same ablations with one freeze of the replacement model lifted at a time
   (attention patterns, LayerNorm denominators, transcoders recomputed, real MLPs;
   :mod:`~difract_ext.attribution.partial`): the freeze whose lifting loses most agreement is the
   main leak. ``frozen`` is the affine graph's own model, where agreement is exact (a check:
   ``frozen_max_rel_error``). A graph built with freezes lifted (``live``, first-order edges) is
   checked against its own model instead, where agreement holds to first order
   (``own_model_rel_error`` at the smallest size);
3. **selection**: the change of the target when the top ``k`` features by graph effect are
   ablated together in the real model, vs the top ``k`` by activation × decoder norm and ``k``
   random active features (features that can reach the target: earlier layers for a feature
   target).

``pairwise`` is DifFRACT's own protocol (:func:`pairwise_agreement`: feature → feature, unsigned),
so that our numbers can be set beside its published ones. ``summary`` is a flat
``{name: number}`` of the first target (and the pairwise check), shown by the graph page.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from difract_ext.attribution.effects import row_total_effects, total_effects
from difract_ext.attribution.graph_meta import RESIDUE_FEATURE
from difract_ext.attribution.partial import (
    FROZEN,
    UNFROZEN,
    Edit,
    Freeze,
    PartialFlux,
    features_edit,
    node_edit,
    node_vectors,
)
from difract_ext.util.config import check_range

#: The breakdown's models: one freeze lifted at a time, then all.
BREAKDOWN: dict[str, Freeze] = {
    "frozen": FROZEN,
    "attention live": Freeze(attention=False),
    "layernorm live": Freeze(layernorm=False),
    "transcoders live": Freeze(mlp="transcoder"),
    "real mlp": Freeze(mlp="real"),
}


@dataclass
class FaithfulnessConfig:
    """What the report measures.

    Attributes:
        top: nodes ablated one at a time (by |total effect| on the target).
        sizes: fractions of a node's value removed (1.0: full ablation).
        breakdown: also measure with one freeze lifted at a time (:data:`BREAKDOWN`).
        select: features ablated together in the selection check (0: skip it).
        random_draws: random feature sets drawn for its baseline.
        seed: of the random sets.
        batch: interventions per forward pass.
        features_only: rank and ablate feature nodes only (no residue or error nodes), as a
            feature-ablation protocol does.
        pairwise: also run DifFRACT's pairwise check (:func:`pairwise_agreement`).
    """

    top: int = 30
    sizes: tuple[float, ...] = (0.01, 1.0)
    breakdown: bool = True
    select: int = 10
    random_draws: int = 5
    seed: int = 0
    batch: int = 32
    features_only: bool = False
    pairwise: bool = True

    def __post_init__(self) -> None:
        self.sizes = tuple(float(s) for s in self.sizes)
        check_range("top", self.top, integer=True, low=2)
        check_range("select", self.select, integer=True, low=0)
        check_range("random_draws", self.random_draws, integer=True, low=1)
        check_range("batch", self.batch, integer=True, low=1)
        if not self.sizes or any(not 0.0 < s <= 1.0 for s in self.sizes):
            raise ValueError(f"sizes must be fractions in (0, 1], got {self.sizes}")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None


def agreement(measured: torch.Tensor, predicted: torch.Tensor) -> dict[str, Any]:
    """Spearman and Pearson correlation (None for a constant vector) and the share of equal
    signs of two ``[n]`` vectors."""
    signs = torch.sign(measured) == torch.sign(predicted)
    return {
        "spearman": _corr(_ranks(measured), _ranks(predicted)),
        "pearson": _corr(measured, predicted),
        "sign_agreement": float(signs.double().mean()),
        "n": len(measured),
    }


def top_nodes(
    result: Any, effects: torch.Tensor, top: int, features_only: bool = False
) -> torch.Tensor:
    """``[≤ top]`` feature, residue and error nodes (``features_only``: expanded features) with
    the largest ``|effects|`` (non-zero)."""
    g = result.graph
    mag = effects[: g.error_end].abs().clone()
    if features_only:
        feats = g.active_features[g.selected_features]
        mag[g.n_features :] = 0
        mag[: g.n_features][feats[:, 2] == RESIDUE_FEATURE] = 0
    order = mag.argsort(descending=True)[:top]
    return order[mag[order] > 0]


def ablation_agreement(
    result: Any,
    nodes: torch.Tensor,
    effects: torch.Tensor,
    sizes: tuple[float, ...],
    freeze: Freeze,
    batch: int = 32,
    vectors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Each node ablated by each size in the model ``freeze``: per size, :func:`agreement` of
    the measured changes ``[n, K]`` of every target with ``−size · effects[k, nodes]``.

    Args:
        effects: ``[K, M]`` total effects.

    Returns:
        ``{"measured": [len(sizes), n, K], "predicted": same}``.
    """
    vectors = vectors if vectors is not None else node_vectors(result)
    edits = [node_edit(result, int(j), s, vectors) for s in sizes for j in nodes]
    measured = PartialFlux(result, freeze).target_changes(edits, batch=batch)
    n = len(nodes)
    measured = measured.reshape(len(sizes), n, -1)
    scale = torch.tensor(sizes, dtype=torch.float64)[:, None, None]
    predicted = -scale * effects[:, nodes].T[None]
    return {"measured": measured, "predicted": predicted}


def own_model(live: frozenset[str] | set[str] | list[str]) -> Freeze:
    """The model whose first-order effects a graph built with ``live`` edges holds
    (:data:`~difract_ext.attribution.partial.FROZEN` for circuit-tracer's affine graph)."""
    return Freeze(attention="attention" not in live, layernorm="layernorm" not in live)


def _feature_pool(result: Any, k: int) -> torch.Tensor:
    """Active features that can reach target ``k`` (indices into the components)."""
    c, spec = result.components, result.targets[k]
    n = c.n_active
    if spec.kind != "feature":
        return torch.arange(n)
    layers = c.decoder_locations[0].cpu()
    return torch.nonzero(layers < spec.info["layer"], as_tuple=True)[0]


def selection_check(
    result: Any, k: int, effects: torch.Tensor, cfg: FaithfulnessConfig
) -> dict[str, Any] | None:
    """Target ``k``'s change when ``cfg.select`` features are ablated together in the real
    model: the graph's top by |effect|, the top by activation × decoder norm, random ones."""
    g, c = result.graph, result.components
    pool = _feature_pool(result, k)
    n_sel = min(cfg.select, len(pool))
    if n_sel == 0:
        return None
    real = torch.nonzero(g.selected_features < c.n_active, as_tuple=True)[0]
    in_pool = torch.zeros(c.n_active, dtype=torch.bool)
    in_pool[pool] = True
    real = real[in_pool[g.selected_features[real]]]
    by_graph = g.selected_features[real[effects[k, real].abs().argsort(descending=True)[:n_sel]]]
    norms = c.decoder_vecs.norm(dim=1).cpu()[pool]
    by_norm = pool[norms.argsort(descending=True)[:n_sel]]
    gen = torch.Generator().manual_seed(cfg.seed)
    draws = [
        pool[torch.randperm(len(pool), generator=gen)[:n_sel]] for _ in range(cfg.random_draws)
    ]
    sets = [by_graph, by_norm, *draws]
    edits = [features_edit(result, s.tolist()) for s in sets]
    change = PartialFlux(result, UNFROZEN).target_changes(edits, batch=cfg.batch)[:, k].abs()
    rand = change[2:]
    return {
        "k": n_sel,
        "graph_features": by_graph.tolist(),
        "graph": float(change[0]),
        "activation_x_decoder": float(change[1]),
        "random_mean": float(rand.mean()),
        "random_max": float(rand.max()),
    }


@torch.no_grad()
def pairwise_agreement(result: Any, top: int = 30, batch: int = 32) -> dict[str, Any] | None:
    """DifFRACT's perturbation check (its ``PerturbationValidator``) with value-normalised
    effects: the ``top`` expanded features by |influence| on the targets are each ablated in the
    real transformer, and the measured ``|Δ pre-activation|`` of every other one is compared
    with the graph's ``|total effect|`` between them, over the pairs the graph connects
    (predicted ≠ 0): Spearman, Pearson (unsigned) and the number of pairs. None with < 2 pairs.
    """
    g, c = result.graph, result.components
    infl = total_effects(g).influence.abs()
    feats = g.active_features[g.selected_features]
    n_feat = g.n_features
    expanded = torch.zeros(n_feat, dtype=torch.bool)
    row_nodes = g.row_nodes.cpu()
    expanded[row_nodes[row_nodes < n_feat]] = True
    cand = torch.nonzero(expanded & (infl[:n_feat] > 0), as_tuple=True)[0]
    nodes = cand[infl[cand].argsort(descending=True)[:top]]
    if len(nodes) < 2:
        return None
    rows = torch.searchsorted(row_nodes, nodes)
    predicted = row_total_effects(g, rows)[:, nodes].abs()  # [j, i]: effect of i on j
    layers, positions = feats[nodes, 0], feats[nodes, 1]
    enc = c.encoder_vecs[g.selected_features[nodes].to(c.encoder_vecs.device)]
    vectors = node_vectors(result)
    model = PartialFlux(result, UNFROZEN)
    edits = [node_edit(result, int(i), 1.0, vectors) for i in nodes]
    measured = []
    for s in range(0, len(edits), batch):
        cap = model.run([Edit(), *edits[s : s + batch]], layers.unique().tolist())
        pre = torch.stack(
            [
                (cap["mlp_in"][int(lay)][:, int(pos)].double() * enc[j].double()).sum(-1)
                for j, (lay, pos) in enumerate(zip(layers, positions, strict=True))
            ],
            dim=1,
        )  # [B, n]
        measured.append((pre[1:] - pre[:1]).abs().cpu())
    meas = torch.cat(measured).T  # [j, i]
    pairs = predicted > 0
    pairs.fill_diagonal_(False)
    if int(pairs.sum()) < 2:
        return None
    agree = agreement(meas[pairs], predicted[pairs])
    del agree["sign_agreement"]  # both unsigned
    return {**agree, "features": len(nodes)}


def _per_size(out: dict[str, Any], k: int, sizes: tuple[float, ...]) -> dict[str, Any]:
    return {
        _size_name(s): agreement(out["measured"][i, :, k], out["predicted"][i, :, k])
        for i, s in enumerate(sizes)
    }


def _size_name(s: float) -> str:
    return f"{100 * s:g}%"


def faithfulness_report(result: Any, cfg: FaithfulnessConfig | None = None) -> dict[str, Any]:
    """The faithfulness report of an attribution result (see the module docstring).

    Returns ``{"seconds", "config", "targets": [per target], "summary": {name: number}}``.
    """
    cfg = cfg or FaithfulnessConfig()
    start = time.perf_counter()
    eff = total_effects(result.graph).effects
    vectors = node_vectors(result)
    models = {"unfrozen": UNFROZEN, **(BREAKDOWN if cfg.breakdown else {})}
    live = frozenset(result.meta.live)
    own = own_model(live)
    targets = []
    for k, spec in enumerate(result.targets):
        nodes = top_nodes(result, eff[k], cfg.top, cfg.features_only)
        entry: dict[str, Any] = {"label": spec.label, "kind": spec.kind, "nodes": len(nodes)}
        if len(nodes) >= 2:
            if live:  # first-order edges: their own model agrees at the smallest size
                out = ablation_agreement(result, nodes, eff, cfg.sizes[:1], own, cfg.batch, vectors)
                err = (out["measured"][..., k] - out["predicted"][..., k]).abs().max()
                scale = out["predicted"][..., k].abs().max().clamp(min=1e-30)
                entry["own_model_rel_error"] = float(err / scale)
            for name, freeze in models.items():
                out = ablation_agreement(result, nodes, eff, cfg.sizes, freeze, cfg.batch, vectors)
                per = _per_size(out, k, cfg.sizes)
                if name == "unfrozen":
                    entry["ablation"] = per
                else:
                    entry.setdefault("breakdown", {})[name] = per
                if name == "frozen" and not live:  # the graph's own model: exact
                    err = (out["measured"][..., k] - out["predicted"][..., k]).abs().max()
                    scale = out["predicted"][..., k].abs().max().clamp(min=1e-30)
                    entry["frozen_max_rel_error"] = float(err / scale)
        if cfg.select:
            entry["selection"] = selection_check(result, k, eff, cfg)
        targets.append(entry)
    pairwise = pairwise_agreement(result, cfg.top, cfg.batch) if cfg.pairwise else None
    seconds = time.perf_counter() - start
    summary = summarise(targets[0], seconds) if targets else {}
    if pairwise is not None:
        for key in ("spearman", "pearson"):
            if pairwise[key] is not None:
                summary[f"DifFRACT pairwise check: {key.capitalize()}"] = pairwise[key]
    return {
        "seconds": seconds,
        "config": asdict(cfg),
        "targets": targets,
        "pairwise": pairwise,
        "summary": summary,
    }


def summarise(entry: dict[str, Any], seconds: float) -> dict[str, float]:
    """A flat ``{name: number}`` of one target's entry (what the graph page shows)."""
    out: dict[str, float | None] = {}
    for size, a in entry.get("ablation", {}).items():
        out[f"Spearman @{size}"] = a["spearman"]
        out[f"Pearson @{size}"] = a["pearson"]
        out[f"signs agree @{size}"] = a["sign_agreement"]
    for name, per in entry.get("breakdown", {}).items():
        if name == "frozen":
            continue
        for size, a in per.items():
            out[f"Spearman @{size}, {name}"] = a["spearman"]
    sel = entry.get("selection")
    if sel:
        rand = sel["random_mean"]
        out[f"top-{sel['k']} by graph / by activation×decoder"] = _ratio(
            sel["graph"], sel["activation_x_decoder"]
        )
        out[f"top-{sel['k']} by graph / random"] = _ratio(sel["graph"], rand)
    out["seconds"] = seconds
    # JSON for a browser: no NaN or infinity (an undefined number is left out)
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None
