"""Ground-truth concept labels on the shapes world: which known factor a feature detects.

Concepts per position (:class:`ShapesConcepts`):

- **image patches** (patch ``(r, c)`` covers pixels ``[r·h, (r+1)·h) × [c·w, (c+1)·w)``, ``h =
  H / rows``): the scene is the prompt's (:func:`~difract_ext.toy.world.parse_prompt`) at the
  canonical placement (:func:`~difract_ext.toy.world.object_box` without jitter, filled with
  :func:`~difract_ext.toy.world.shape_mask`). A patch at least half covered by one object holds
  ``object`` and that object's ``colour=…``, ``shape=…`` and ``position=…``; a patch with no
  object pixel holds ``background``; other patches (object edges) are not scored.
- **text tokens**: ``word=…``, the prompt word the token's character span (the tokenizer's
  offsets) falls in; every text position is scored (padding holds no word).

The rule: a feature **fires** at a position when its activation there is > 0. Over all scored
positions of all examples and steps, ``tp`` = positions where it fires and the concept is present,
``precision = tp / fired``, ``recall = tp / present``, ``F1 = 2·tp / (fired + present)``. A
feature's label is the concept with the highest F1 (ties: the first in :meth:`ShapesConcepts.names`
order), stored with its F1 whatever it is; none for a feature that never fired where a concept is
present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from difract_ext.dashboards.stats import SiteStats
from difract_ext.toy.world import COLORS, POSITIONS, SHAPES, object_box, parse_prompt, shape_mask

__all__ = [
    "ShapesConcepts",
    "f1_table",
    "labels_from_counts",
    "scores_from_counts",
    "scores_from_counts_steps",
]


class ShapesConcepts:
    """The shapes world's concepts (see the module docstring); a
    :class:`~difract_ext.dashboards.scan.ConceptSource`."""

    def __init__(self, words: Sequence[str] | None = None) -> None:
        if words is None:
            from difract_ext.toy.pipeline import shapes_vocabulary

            words = shapes_vocabulary()
        self.words = tuple(words)

    def names(self, stream: str) -> list[str]:
        if stream == "img":
            return (
                ["background", "object"]
                + [f"colour={c}" for c in COLORS]
                + [f"shape={s}" for s in SHAPES]
                + [f"position={p}" for p in POSITIONS]
            )
        return [f"word={w}" for w in self.words]

    def masks(
        self, prompt: str, seed: int, stream: str, layout: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(present [P, C] bool, scored [P] bool) for one example."""
        if stream == "img":
            return _image_masks(prompt, int(layout["height"]), tuple(layout["grid"]))
        names = self.names("txt")
        offsets = layout["offsets"]
        present = np.zeros((len(offsets), len(names)), dtype=bool)
        spans, pos = [], 0
        for word in prompt.split(" "):
            spans.append((pos, pos + len(word), word))
            pos += len(word) + 1
        where = {n: i for i, n in enumerate(names)}
        for p, (a, b) in enumerate(offsets):
            if b <= a:
                continue
            for lo, hi, word in spans:
                if lo <= a < hi and f"word={word}" in where:
                    present[p, where[f"word={word}"]] = True
        return present, np.ones(len(offsets), dtype=bool)


@lru_cache(maxsize=4096)
def _image_masks(prompt: str, size: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    scene = parse_prompt(prompt)
    rows, cols = grid
    ph, pw = size // rows, size // cols
    names = ShapesConcepts(()).names("img")
    where = {n: i for i, n in enumerate(names)}
    cover = np.zeros((len(scene.objects), size, size), dtype=bool)
    for o, obj in enumerate(scene.objects):
        r0, c0, d = object_box(obj.position, size)
        cover[o, r0 : r0 + d, c0 : c0 + d] = shape_mask(obj.shape, d, d)
    frac = cover.reshape(len(scene.objects), rows, ph, cols, pw).mean((2, 4))  # [O, rows, cols]
    present = np.zeros((rows * cols, len(names)), dtype=bool)
    scored = np.zeros(rows * cols, dtype=bool)
    for r in range(rows):
        for c in range(cols):
            p = r * cols + c
            if frac[:, r, c].max() == 0:
                present[p, where["background"]] = scored[p] = True
                continue
            o = int(frac[:, r, c].argmax())
            if frac[o, r, c] >= 0.5:
                obj = scene.objects[o]
                for n in (
                    "object",
                    f"colour={obj.color}",
                    f"shape={obj.shape}",
                    f"position={obj.position}",
                ):
                    present[p, where[n]] = True
                scored[p] = True
    present.setflags(write=False)
    scored.setflags(write=False)
    return present, scored


def scores_from_counts(
    tp: torch.Tensor, fired: torch.Tensor, present: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Precision, recall and F1 [F, C] from ``tp`` [F, C], ``fired`` [F], ``present`` [C]
    (0 where undefined)."""
    tp, fired, present = tp.double(), fired.double()[:, None], present.double()[None, :]
    precision = torch.where(fired > 0, tp / fired.clamp_min(1), 0.0)
    recall = torch.where(present > 0, tp / present.clamp_min(1), 0.0)
    f1 = torch.where(fired + present > 0, 2 * tp / (fired + present).clamp_min(1), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def _pooled(stats: SiteStats) -> dict[str, torch.Tensor]:
    t = stats.t
    return scores_from_counts(
        t["concept_tp"].sum(1), t["scored_fire"].sum(1), t["concept_count"].sum(0)
    )


def labels_from_counts(stats: SiteStats, names: Sequence[str]) -> dict[int, dict[str, Any]]:
    """``{feature: {"label", "f1", "precision", "recall"}}`` from a scan's concept counts,
    pooled over all steps."""
    if not names:
        return {}
    sc = _pooled(stats)
    tp = stats.t["concept_tp"].sum(1)
    best = torch.argmax(sc["f1"], dim=1)  # first maximum
    out: dict[int, dict[str, Any]] = {}
    for f in range(sc["f1"].shape[0]):
        c = int(best[f])
        if int(tp[f, c]) == 0:
            continue
        out[f] = {
            "label": names[c],
            "f1": round(float(sc["f1"][f, c]), 6),
            "precision": round(float(sc["precision"][f, c]), 6),
            "recall": round(float(sc["recall"][f, c]), 6),
        }
    return out


def f1_table(stats: SiteStats, names: Sequence[str]) -> dict[str, Any]:
    """Per dictionary: how many features' best concept has F1 ≥ 0.9 (pooled over steps), per
    concept the best feature's pooled F1 (``best``), and per concept the best F1 of any feature at
    any single step (``best_step``: the same counts restricted to one step)."""
    t = stats.t
    if not names:
        return {"n_features_f1_ge_0.9": 0, "best": {}, "best_step": {}}
    f1 = _pooled(stats)["f1"]
    best_f, arg = f1.max(dim=0)
    per_step = scores_from_counts_steps(t["concept_tp"], t["scored_fire"], t["concept_count"])
    n_f, n_s, n_c = per_step.shape
    flat = per_step.permute(2, 0, 1).reshape(n_c, -1)
    step_best, step_arg = flat.max(dim=1)
    return {
        "n_features_f1_ge_0.9": int((f1.max(dim=1).values >= 0.9).sum()),
        "best": {
            n: {"f1": round(float(best_f[c]), 4), "feature": int(arg[c])}
            for c, n in enumerate(names)
        },
        "best_step": {
            n: {
                "f1": round(float(step_best[c]), 4),
                "feature": int(step_arg[c]) // n_s,
                "step": int(step_arg[c]) % n_s,
            }
            for c, n in enumerate(names)
        },
    }


def scores_from_counts_steps(
    tp: torch.Tensor, fired: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """F1 [F, S, C] per step from ``tp`` [F, S, C], ``fired`` [F, S], ``present`` [S, C]."""
    tp, fired, present = tp.double(), fired.double()[..., None], present.double()[None]
    return torch.where(fired + present > 0, 2 * tp / (fired + present).clamp_min(1), 0.0)
