"""Attribution graphs whose memory grows with what is expanded: the driver.

circuit-tracer's ``attribute()`` keeps every computed row ``N`` active features wide and then
builds a square ``[M, M]`` matrix over every node; both are out of reach at FLUX.1 scale (``N`` ~
10⁶, ``M`` ~ 10⁵). :func:`build_graph` keeps its protocol and its ranking (targets first, then
features in the order of their influence through the rows so far, re-ranked every
``update_interval`` batches of ``batch_size``), but drives the loop itself:

1. **selection pass**: rows go to :class:`~difract_ext.attribution.ranking.RankingRows` (whole
   when they fit :data:`~difract_ext.attribution.ranking.RANK_BYTES`, else each row's largest
   feature entries and its exact ``|A|`` sum), and the ranking runs on them;
2. **exact pass** (only when the rows were truncated): the rows of the chosen features and the
   targets are recomputed with their feature columns narrowed to the chosen features
   (:meth:`~difract_ext.attribution.edges.StepEdges.set_columns`, same forward graph);
3. **assembly**: a :class:`~difract_ext.attribution.row_graph.RowGraph` of ``expanded + K`` rows
   over every node, with one residue node per (layer, position) whose active features were not
   all expanded: each row's total effect of all features there minus the expanded ones', so
   every row still sums to its value (conservation stays exact).

Memory: the forward's constants, one row buffer ``[N + (L + 1) P, B]``, the ranking rows
(bounded) and the graph ``(F + K) × (F + R + (L + 1) P + K)`` (linear in positions and layers
for a fixed budget ``F``); :mod:`~difract_ext.attribution.memory` predicts it.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field

import torch

from difract_ext.attribution.edges import StepEdges
from difract_ext.attribution.graph_meta import RESIDUE_FEATURE
from difract_ext.attribution.ranking import RANK_BYTES, RankingRows, plan_ranking
from difract_ext.attribution.row_graph import RowGraph, TargetNode
from difract_ext.attribution.step import AttributionStep

logger = logging.getLogger(__name__)

#: Rows assembled at a time from whole ranking rows (bounds the temporaries).
_ASSEMBLY_ROWS = 256
#: Activation tensors ``[B, P, d]`` of at least this many bytes make a CPU build ask glibc to
#: serve allocations above :data:`MMAP_THRESHOLD` from fresh pages (:func:`return_freed_memory`):
#: below it, freed chunks are few and small, and the page faults would cost more than they save
#: (the shapes model at 32 px, 1.3 MB tensors: 2x slower with fresh pages).
LARGE_ACTIVATION_BYTES = 2 << 20
#: Allocations of at least this many bytes get fresh pages in large CPU builds.
MMAP_THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes and more with ``mmap`` (process-wide).

    A backward pass frees dozens of ``[B, P, d]`` tensors of 1-32 MB; glibc keeps such freed
    chunks in its heaps (its mmap threshold adapts upwards to 32 MB), so a CPU attribution's RSS
    grew to 2-3x its live memory (measured: 2.26 vs 1.11 GiB peak, FLUX.1 depth at 512 px).
    With a fixed threshold the pages go back to the system when a tensor is freed, at the
    price of page faults on the next allocation. Returns False where glibc is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@dataclass
class BuildStats:
    """What a build did: passes, sizes and times (also stored in ``RowGraph.info``)."""

    n_active: int = 0
    n_expanded: int = 0
    n_residue: int = 0
    rank_entries: int = 0
    one_pass: bool = True
    backward_passes: int = 0
    exact_passes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def build_graph(
    step: AttributionStep,
    *,
    max_feature_nodes: int | None = None,
    batch_size: int = 128,
    backward_batch: int = 32,
    update_interval: int = 4,
    rank_entries: int | None = None,
    rank_bytes: int = RANK_BYTES,
    scan: str | None = None,
) -> RowGraph:
    """The attribution graph of ``step``'s targets as a :class:`RowGraph`.

    Args:
        step: a step with its targets set (:meth:`AttributionStep.set_targets`); run inside
            :func:`~difract_ext.replacement.frozen.frozen_parameters` with gradients enabled.
        max_feature_nodes: expand at most this many features (None: all).
        batch_size: rows per ranking batch (circuit-tracer's ``batch_size``).
        backward_batch: rows per backward pass (the forward is built at
            ``min(batch_size, backward_batch)`` copies).
        update_interval: ranking batches between re-rankings (circuit-tracer's).
        rank_entries: feature entries each selection row keeps (None: all when they fit
            ``rank_bytes``, else as many as fit); see :func:`plan_ranking`.
        scan: the transcoder set's name, kept on the graph.

    Raises:
        ValueError: no targets, or batch sizes below 1.
    """
    if not step.targets:
        raise ValueError("set the step's targets first (AttributionStep.set_targets)")
    if min(batch_size, backward_batch, update_interval) < 1:
        raise ValueError(
            f"batch_size ({batch_size}), backward_batch ({backward_batch}) and update_interval "
            f"({update_interval}) must be >= 1"
        )
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    edges = step.edges()
    c = step.components
    n_active, n_layers, n_pos, n_targets = (
        c.n_active,
        edges.n_layers,
        edges.n_pos,
        len(step.targets),
    )
    budget = min(max_feature_nodes if max_feature_nodes is not None else n_active, n_active)
    n_tail, n_cells = (n_layers + 1) * n_pos, n_layers * n_pos
    plan = plan_ranking(n_active, budget + n_targets, n_tail, n_cells, rank_entries, rank_bytes)
    stats = BuildStats(n_active=n_active, rank_entries=plan.entries, one_pass=plan.one_pass)

    frozen = step.frozen
    d_bytes = c.error_vectors.shape[-1] * c.error_vectors.element_size()
    big = min(batch_size, backward_batch) * n_pos * d_bytes >= LARGE_ACTIVATION_BYTES
    if edges.device.type == "cpu" and big:
        return_freed_memory()
    release = not any(p.requires_grad for p in frozen.flux.parameters())
    with frozen.hooks(fwd_hooks=edges.forward_hooks(), bwd_hooks=edges.backward_hooks()):
        if release:
            edges.release_forward_values(during_forward=True)
        frozen.linear_forward(batch=min(batch_size, backward_batch))
    if release:
        edges.release_forward_values()
    times["forward"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    store = RankingRows(budget + n_targets, n_active, plan, n_tail, n_cells, edges.device)
    weights = torch.tensor([t.weight for t in step.targets], dtype=torch.float32)
    probs = weights / weights.sum()
    for i in range(0, n_targets, batch_size):
        index = torch.arange(i, min(i + batch_size, n_targets))
        stats.backward_passes += _keep(edges, store, index, targets=True)
    visited = torch.zeros(n_active, dtype=torch.bool)
    n_visited = 0
    while n_visited < budget:
        if budget == n_active:
            pending = torch.arange(n_active)
        else:
            influences = store.partial_influences(probs)
            rank = torch.argsort(influences, descending=True).cpu()
            queue = min(update_interval * batch_size, budget - n_visited)
            pending = rank[~visited[rank]][:queue]
        for start in range(0, len(pending), batch_size):
            index = pending[start : start + batch_size]
            stats.backward_passes += _keep(edges, store, index, targets=False)
            visited[index] = True
            n_visited += len(index)
        logger.debug("expanded %d of %d features", n_visited, budget)
    times["selection"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    selected = torch.nonzero(visited, as_tuple=True)[0]
    graph = _assemble(step, edges, store, selected, probs, stats)
    edges.resid = [None] * (n_layers + 1)  # frees the forward graph
    times["assembly"] = time.perf_counter() - t2
    stats.seconds = times
    stats.n_expanded = len(selected)
    graph.scan = scan
    graph.info.update({k: v for k, v in vars(stats).items() if k != "seconds"}, seconds=dict(times))
    return graph


def _keep(edges: StepEdges, store: RankingRows, index: torch.Tensor, *, targets: bool) -> int:
    """Rows of ``index`` into ``store``; returns the number of backward passes."""
    passes = 0
    offset = edges.n_features if targets else 0
    for sel, rows, totals in edges.row_chunks(index, targets=targets):
        store.add(index[sel] + offset, rows, totals)
        passes += 1
    return passes


def _assemble(
    step: AttributionStep,
    edges: StepEdges,
    store: RankingRows,
    selected: torch.Tensor,
    probs: torch.Tensor,
    stats: BuildStats,
) -> RowGraph:
    """The graph's rows over every node, with residue nodes (see the module docstring)."""
    c = step.components
    n_active, n_layers, n_pos = c.n_active, edges.n_layers, edges.n_pos
    n_targets, n_sel = len(step.targets), len(selected)
    device = edges.device
    feats = c.features.cpu()
    cell_of = feats[:, 0] * n_pos + feats[:, 1]  # [N]
    unselected = torch.ones(n_active, dtype=torch.bool)
    unselected[selected] = False
    cells = torch.unique(cell_of[unselected])  # residue nodes, ascending (layer, position)
    n_res = len(cells)
    n_tail = (n_layers + 1) * n_pos
    m = n_sel + n_res + n_tail + n_targets
    rows = torch.zeros(n_sel + n_targets, m, dtype=torch.float32, device=device)
    sel_cells = cell_of[selected].to(device)
    res_cols = slice(n_sel, n_sel + n_res)
    tail_cols = slice(n_sel + n_res, n_sel + n_res + n_tail)
    cells_dev = cells.to(device)

    def put(
        dest: torch.Tensor, feature_part: torch.Tensor, tail: torch.Tensor, totals: torch.Tensor
    ):
        explored = torch.zeros(len(dest), n_layers * n_pos, dtype=torch.float32, device=device)
        explored.index_add_(1, sel_cells, feature_part)
        dest = dest.to(device)
        rows[dest, :n_sel] = feature_part
        rows[dest, res_cols] = (totals.flatten(1) - explored)[:, cells_dev]
        rows[dest, tail_cols] = tail

    if store.plan.one_pass:  # every row kept whole: read the graph's columns out of them
        assert store.tails is not None and store.totals is not None and store.index is None
        n = store.n
        nodes = store.nodes[:n].cpu()
        is_target = nodes >= n_active
        dest = torch.where(
            is_target,
            n_sel + nodes - n_active,
            torch.searchsorted(selected, nodes.clamp(max=n_active - 1)),
        )
        sel_dev = selected.to(device)
        for start in range(0, n, _ASSEMBLY_ROWS):  # bounded temporaries
            sl = slice(start, start + _ASSEMBLY_ROWS)
            put(dest[sl], store.values[sl, sel_dev], store.tails[sl], store.totals[sl])
    else:
        stats.exact_passes = 0
        edges.set_columns(selected)
        for index, targets, base in (
            (selected, False, None),
            (torch.arange(n_targets), True, n_sel),
        ):
            for sel, chunk, totals in edges.row_chunks(index, targets=targets):
                dest = (base + sel) if base is not None else sel
                put(dest, chunk[:, :n_sel], chunk[:, n_sel:], totals)
                stats.exact_passes += 1
        edges.set_columns(None)
    stats.backward_passes += stats.exact_passes
    stats.n_residue = n_res

    res_feats = torch.stack(
        [cells // n_pos, cells % n_pos, torch.full_like(cells, RESIDUE_FEATURE)], dim=1
    )
    values = c.activation_matrix.values().cpu()
    res_acts = torch.zeros(n_res, dtype=values.dtype).index_add_(
        0, torch.searchsorted(cells, cell_of[unselected]), values[unselected]
    )
    row_nodes = torch.cat([torch.arange(n_sel), torch.arange(m - n_targets, m)])
    return RowGraph(
        rows=rows,
        row_nodes=row_nodes,
        active_features=torch.cat([feats, res_feats.to(feats.dtype)]),
        selected_features=torch.cat([selected, n_active + torch.arange(n_res)]),
        activation_values=torch.cat([values, res_acts]),
        logit_targets=[TargetNode(t.label, n_pos + k) for k, t in enumerate(step.targets)],
        logit_probabilities=probs,
        n_pos=n_pos,
        n_layers=n_layers,
        input_string=step.meta.prompt,
        info={},
    )
