"""The rows computed while choosing which features to expand, kept compactly, and their ranking.

circuit-tracer expands features in the order of their influence on the targets through the rows
computed so far (``compute_partial_influences``: power iteration on the row-normalised ``|A|``),
re-ranked every few batches. It keeps every row whole, ``N`` active features wide: at FLUX.1 scale
(``N`` ~ 10⁶) that alone is tens of GB. :class:`RankingRows` keeps, per row, its ``|A|`` sum over
*all* columns (so the normalisation is exact) and either every feature entry (``dense``, when
that fits :data:`RANK_BYTES`: the ranking is circuit-tracer's exactly) or the ``k`` largest in
magnitude (the others' share of the row stays in the sum, so an influence through them is
dropped, never inflated). :func:`plan_ranking` picks which, from sizes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Memory the ranking rows may take by default (bytes).
RANK_BYTES = 1 << 30
#: Fewest feature entries a truncated ranking row keeps.
MIN_RANK_ENTRIES = 256
#: Bytes of float32 one chunk of a dense ranking product may take.
_CHUNK_BYTES = 1 << 27


@dataclass(frozen=True)
class RankingPlan:
    """How the rows of the selection pass are kept.

    ``entries``: feature entries per row (``N``: all of them); ``one_pass``: rows are kept whole
    (features, error and input columns, cell totals), so the graph is assembled from them with
    no second pass; otherwise the expanded rows are recomputed, narrowed to the chosen features.
    """

    entries: int
    one_pass: bool

    def row_bytes(self, n_features: int, n_tail: int, n_cells: int) -> int:
        """Bytes one kept row takes."""
        if self.one_pass:
            return 4 * (n_features + n_tail + n_cells) + 12
        per_entry = 4 if self.entries >= n_features else 12  # value (+ int64 index)
        return per_entry * self.entries + 12


def plan_ranking(
    n_features: int,
    n_rows: int,
    n_tail: int,
    n_cells: int,
    rank_entries: int | None = None,
    rank_bytes: int = RANK_BYTES,
) -> RankingPlan:
    """Choose the ranking rows' form from sizes.

    Args:
        n_features: active features ``N``.
        n_rows: rows of the selection pass (feature budget + targets).
        n_tail: error and input columns of a row, ``(L + 1) * P``.
        n_cells: ``L * P`` (a row's per-cell totals).
        rank_entries: feature entries per row (None: as many as ``rank_bytes`` allows).
        rank_bytes: memory budget of the kept rows.
    """
    whole = n_rows * (4 * (n_features + n_tail + n_cells) + 12)
    if rank_entries is None:
        if whole <= rank_bytes:
            return RankingPlan(n_features, True)
        k = max(MIN_RANK_ENTRIES, rank_bytes // max(1, 12 * n_rows))
        return RankingPlan(min(k, n_features), False)
    if rank_entries < 1:
        raise ValueError(f"rank_entries must be >= 1, got {rank_entries}")
    k = min(rank_entries, n_features)
    return RankingPlan(k, k >= n_features and whole <= rank_bytes)


class RankingRows:
    """Rows of the selection pass (targets first, then features in expansion order).

    Args:
        capacity: rows to hold (feature budget + targets).
        n_features: active features ``N``; nodes ``0..N-1`` are features, ``N + k`` target ``k``.
        plan: see :class:`RankingPlan`.
        n_tail, n_cells: ``(L + 1) * P`` and ``L * P`` (kept for ``one_pass`` plans).
        device: where the rows live.
    """

    def __init__(
        self,
        capacity: int,
        n_features: int,
        plan: RankingPlan,
        n_tail: int,
        n_cells: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_features = n_features
        self.plan = plan
        self.k = min(plan.entries, n_features)
        self.dense = self.k >= n_features
        kw = {"dtype": torch.float32, "device": device}
        self.nodes = torch.empty(capacity, dtype=torch.long, device=device)
        self.sums = torch.empty(capacity, **kw)  # type: ignore[arg-type]
        self.values = torch.empty(capacity, self.k, **kw)  # type: ignore[arg-type]
        self.index = (
            None if self.dense else torch.empty(capacity, self.k, dtype=torch.long, device=device)
        )
        self.tails = self.totals = None
        if plan.one_pass:
            self.tails = torch.empty(capacity, n_tail, **kw)  # type: ignore[arg-type]
            self.totals = torch.empty(capacity, n_cells, **kw)  # type: ignore[arg-type]
        self.n = 0

    def add(self, nodes: torch.Tensor, rows: torch.Tensor, totals: torch.Tensor) -> None:
        """Keep rows ``[n, N + (L + 1) P]`` of ``nodes [n]`` and their ``totals [n, L, P]``."""
        n, nf = len(nodes), self.n_features
        if self.n + n > len(self.nodes):
            raise ValueError(f"RankingRows holds {len(self.nodes)} rows; {self.n + n} were added")
        sl = slice(self.n, self.n + n)
        self.nodes[sl] = nodes.to(self.nodes.device)
        self.sums[sl] = rows.abs().sum(dim=1)
        features = rows[:, :nf]
        if self.index is None:
            self.values[sl] = features
        else:
            top = features.abs().topk(self.k, dim=1, sorted=False).indices
            self.index[sl] = top
            self.values[sl] = features.gather(1, top)
        if self.tails is not None and self.totals is not None:
            self.tails[sl] = rows[:, nf:]
            self.totals[sl] = totals.flatten(1)
        self.n += n

    def partial_influences(self, weights: torch.Tensor, max_iter: int = 128) -> torch.Tensor:
        """``[N]`` circuit-tracer's ``compute_partial_influences`` on the kept rows.

        Args:
            weights: ``[K]`` target weights (the targets' logit probabilities).

        Raises:
            RuntimeError: no convergence in ``max_iter`` steps.
        """
        nf, n = self.n_features, self.n
        device = self.values.device
        prod = torch.zeros(nf + len(weights), device=device)
        prod[nf:] = weights.to(device, torch.float32)
        influences = torch.zeros_like(prod)
        sums = self.sums[:n].clamp(min=1e-8)
        nodes = self.nodes[:n]
        step = max(1, _CHUNK_BYTES // max(1, 4 * self.k))
        for _ in range(max_iter):
            w = prod[nodes]
            prod = torch.zeros_like(prod)
            for start in range(0, n, step):
                live = torch.nonzero(w[start : start + step], as_tuple=True)[0] + start
                if len(live) == 0:
                    continue
                normed = self.values[live].abs() / sums[live, None]
                if self.index is None:
                    prod[:nf] += w[live] @ normed
                else:
                    contrib = (w[live, None] * normed).flatten()
                    prod.index_add_(0, self.index[live].flatten(), contrib)
            if not bool(prod.any()):
                break
            influences += prod
        else:
            raise RuntimeError("Failed to converge")
        return influences[:nf]
