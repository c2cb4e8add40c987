"""Streaming per-feature statistics of one site: exact top-k, histogram, profile, tokens, concepts.

Every statistic is a sum, a max/min or a top-k with a total order (activation descending, then
example index ascending), so chunks may be added in any order and states of several processes
merged (:meth:`SiteStats.merge`) with the same result: integer counts and the top-k exactly,
float sums up to float64 rounding (stored as float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from difract_ext.dashboards.store import HIST_EDGES

__all__ = ["SiteStats", "merge_topk"]

_EDGES = torch.tensor(HIST_EDGES[1:-1], dtype=torch.float32)
_BINS = len(HIST_EDGES) - 1


def merge_topk(
    act: torch.Tensor, ex: torch.Tensor, maps: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` best of candidates ``act`` [F, n], ``ex`` [F, n] (-1: empty), ``maps``
    [F, n, P]: activation descending, ties by smaller example index, empty slots last."""
    key = torch.where(ex < 0, torch.iinfo(torch.int64).max, ex.to(torch.int64))
    o1 = torch.sort(key, dim=1, stable=True).indices
    act1 = torch.gather(act, 1, o1)
    act1 = torch.where(torch.gather(ex, 1, o1) < 0, -torch.inf, act1)
    o2 = torch.sort(act1, dim=1, descending=True, stable=True).indices[:, :k]
    order = torch.gather(o1, 1, o2)
    out_ex = torch.gather(ex, 1, order)
    out_act = torch.where(out_ex < 0, -torch.inf, torch.gather(act, 1, order))
    out_maps = torch.gather(maps, 1, order[..., None].expand(-1, -1, maps.shape[2]))
    return out_act, out_ex, out_maps


class SiteStats:
    """The running statistics of one site's ``F`` features (tensors named as in
    :mod:`difract_ext.dashboards.store`, sums kept in float64 until :meth:`site_tensors`).

    Args:
        d_sae: F. steps: S. top_k: k. n_pos: P (positions of the site's stream).
        vocab: V. n_concepts: C (0: no concept counts).
    """

    def __init__(
        self, d_sae: int, steps: int, top_k: int, n_pos: int, vocab: int, n_concepts: int = 0
    ) -> None:
        f, s, k = d_sae, steps, top_k
        self.k = k
        self.t: dict[str, torch.Tensor] = {
            "top_act": torch.full((f, s, k), -torch.inf),
            "top_example": torch.full((f, s, k), -1, dtype=torch.int32),
            "top_map": torch.zeros(f, s, k, n_pos, dtype=torch.float16),
            "act_max": torch.full((f,), -torch.inf),
            "act_min": torch.full((f,), torch.inf),
            "hist": torch.zeros(f, _BINS, dtype=torch.int64),
            "profile_sum": torch.zeros(f, s, dtype=torch.float64),
            "profile_fire": torch.zeros(f, s, dtype=torch.int64),
            "token_sum": torch.zeros(f, vocab, dtype=torch.float64),
            "token_count": torch.zeros(vocab, dtype=torch.int64),
            "concept_tp": torch.zeros(f, s, n_concepts, dtype=torch.int64),
            "concept_count": torch.zeros(s, n_concepts, dtype=torch.int64),
            "scored_fire": torch.zeros(f, s, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> SiteStats:
        f, s, k, p = tensors["top_map"].shape
        stats = cls(f, s, k, p, tensors["token_count"].shape[0], tensors["concept_count"].shape[1])
        for name, value in tensors.items():
            stats.t[name] = value.to(stats.t[name].dtype).clone()
        return stats

    def state(self) -> dict[str, torch.Tensor]:
        """The full state (for checkpoints)."""
        return dict(self.t)

    def add_block(
        self,
        step: int,
        f0: int,
        acts: torch.Tensor,
        examples: torch.Tensor,
        token_ids: torch.Tensor,
        stream: str,
        concepts: torch.Tensor | None = None,
        scored: torch.Tensor | None = None,
    ) -> None:
        """Add the activations ``acts`` [nb, P, Fb] of features ``f0 .. f0+Fb`` at ``step`` for
        examples ``examples`` [nb] (int64).

        Args:
            token_ids: [nb, T] vocabulary ids of the examples' prompt tokens (-1: none).
            stream: ``"txt"``: token sums by the token at each position; ``"img"``: by the
                example's max activation for every distinct token of its prompt.
            concepts: [nb, P, C] bool, concept present at a position; ``scored`` [nb, P] bool,
                positions where concepts are defined. Token and concept *counts* (independent of
                features) are added by :meth:`add_counts`.
        """
        nb, p, fb = acts.shape
        f1 = f0 + fb
        acts = acts.detach().float()
        fire = acts > 0
        ex_max = acts.amax(1)  # [nb, Fb]
        t = self.t
        # top-k of examples at this step
        cand_act = torch.cat([t["top_act"][f0:f1, step], ex_max.T], 1)
        cand_ex = torch.cat(
            [t["top_example"][f0:f1, step], examples.to(torch.int32)[None].expand(fb, nb)], 1
        )
        cand_map = torch.cat([t["top_map"][f0:f1, step], acts.permute(2, 0, 1).half()], 1)
        a, e, m = merge_topk(cand_act, cand_ex, cand_map, self.k)
        t["top_act"][f0:f1, step], t["top_example"][f0:f1, step], t["top_map"][f0:f1, step] = (
            a,
            e,
            m,
        )
        flat = acts.reshape(nb * p, fb)
        t["act_max"][f0:f1] = torch.maximum(t["act_max"][f0:f1], flat.amax(0))
        t["act_min"][f0:f1] = torch.minimum(t["act_min"][f0:f1], flat.amin(0))
        # histogram of positive activations
        rows, cols = torch.nonzero(flat > 0, as_tuple=True)
        if rows.numel():
            bins = torch.bucketize(flat[rows, cols], _EDGES)
            counts = torch.bincount(cols * _BINS + bins, minlength=fb * _BINS)
            t["hist"][f0:f1] += counts.reshape(fb, _BINS)
        t["profile_sum"][f0:f1, step] += flat.sum(0, dtype=torch.float64)
        t["profile_fire"][f0:f1, step] += fire.reshape(nb * p, fb).sum(0)
        # tokens
        if stream == "txt":
            ids = token_ids[:, :p].reshape(-1)
            keep = ids >= 0
            t["token_sum"][f0:f1].index_add_(1, ids[keep], flat[keep].T.double())
        else:
            for b in range(nb):
                ids = torch.unique(token_ids[b][token_ids[b] >= 0])
                t["token_sum"][f0:f1, ids] += ex_max[b].double()[:, None]
        # concepts
        if concepts is not None and scored is not None:
            fire_s = (fire & scored[..., None]).reshape(nb * p, fb)
            t["scored_fire"][f0:f1, step] += fire_s.sum(0)
            t["concept_tp"][f0:f1, step] += (
                (fire_s.T.double() @ concepts.reshape(nb * p, -1).double()).round().to(torch.int64)
            )

    def add_counts(
        self,
        step: int,
        token_ids: torch.Tensor,
        stream: str,
        n_pos: int,
        concepts: torch.Tensor | None = None,
        scored: torch.Tensor | None = None,
    ) -> None:
        """Add the feature-independent counts of ``step`` for examples (``token_ids`` [nb, T]):
        token occurrences (txt: per position; img: per example holding the token) and concept
        occurrences at scored positions."""
        t = self.t
        if stream == "txt":
            ids = token_ids[:, :n_pos].reshape(-1)
            ids = ids[ids >= 0]
            t["token_count"] += torch.bincount(ids, minlength=t["token_count"].shape[0])
        else:
            for b in range(token_ids.shape[0]):
                ids = torch.unique(token_ids[b][token_ids[b] >= 0])
                t["token_count"][ids] += 1
        if concepts is not None and scored is not None:
            t["concept_count"][step] += (
                (concepts & scored[..., None]).reshape(-1, concepts.shape[-1]).sum(0)
            )

    def merge(self, other: SiteStats) -> None:
        """Add another process's (or checkpoint's) state into this one."""
        t, o = self.t, other.t
        for s in range(t["top_act"].shape[1]):
            cand = [
                torch.cat([t[n][:, s], o[n][:, s]], 1)
                for n in ("top_act", "top_example", "top_map")
            ]
            t["top_act"][:, s], t["top_example"][:, s], t["top_map"][:, s] = merge_topk(
                *cand, self.k
            )
        t["act_max"] = torch.maximum(t["act_max"], o["act_max"])
        t["act_min"] = torch.minimum(t["act_min"], o["act_min"])
        for n in (
            "hist",
            "profile_sum",
            "profile_fire",
            "token_sum",
            "token_count",
            "concept_tp",
            "concept_count",
            "scored_fire",
        ):
            t[n] = t[n] + o[n]

    def site_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``{site}.safetensors`` (empty slots: act 0, example -1)."""
        t = self.t
        return {
            "top_act": torch.where(t["top_example"] < 0, 0.0, t["top_act"]).float(),
            "top_example": t["top_example"],
            "top_map": t["top_map"],
            "act_max": torch.where(torch.isfinite(t["act_max"]), t["act_max"], 0.0).float(),
            "act_min": torch.where(torch.isfinite(t["act_min"]), t["act_min"], 0.0).float(),
            "hist": t["hist"],
            "profile_sum": t["profile_sum"].float(),
            "profile_fire": t["profile_fire"],
            "token_sum": t["token_sum"].float(),
            "token_count": t["token_count"],
        }
