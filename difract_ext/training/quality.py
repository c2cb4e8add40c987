"""When a trained dictionary is unusable: the checks ``difract train`` and ``difract eval`` apply.

A dictionary *fails* when

* its explained variance is below ``MIN_EXPLAINED_VARIANCE`` (0.5; NaN fails too): it does not
  reconstruct the MLP (output) it stands for; or
* more than ``MAX_OVERACTIVE_FRACTION`` (50 %) of its features are *over-active*, i.e. fire on
  more than ``OVERACTIVE_RATE`` (30 %) of the rows: it is not sparse.

Why 30 % and not the usual 10 % "dense" rate (``dense_fraction`` in the reports): narrow
dictionaries legitimately have many features above 10 %. The shipped shapes dictionaries (96-256
features, L0 13-22 % of the width, EV >= 0.9) have up to 84 % (transcoders) and 97 % (SAEs) of
their features above 10 % on held-out rows, but at most 38 % above 30 %; the README recipe run at
small scale (EV -3 to -10) had 58-93 % above 30 %.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

MIN_EXPLAINED_VARIANCE = 0.5
OVERACTIVE_RATE = 0.3
MAX_OVERACTIVE_FRACTION = 0.5
#: What to do about a failing dictionary (appended to warnings).
ADVICE = (
    "it is not a usable stand-in for the MLP: train with the recipe for this model (--recipe), "
    "longer (--epochs) or on a larger harvest, and check it with `difract eval` on held-out prompts"
)

logger = logging.getLogger(__name__)


def quality_problems(metrics: Mapping[str, float]) -> list[str]:
    """Why a dictionary fails (empty when it passes).

    Args:
        metrics: ``explained_variance`` and ``overactive_fraction`` (as in the evaluation's and
            the trainer's last-window metrics); a missing ``overactive_fraction`` is not checked.
    """
    problems = []
    ev = metrics.get("explained_variance")
    if ev is None or not math.isfinite(float(ev)) or float(ev) < MIN_EXPLAINED_VARIANCE:
        problems.append(
            f"explained variance {float('nan') if ev is None else float(ev):.3f} "
            f"< {MIN_EXPLAINED_VARIANCE:g}"
        )
    over = metrics.get("overactive_fraction")
    if over is not None and float(over) > MAX_OVERACTIVE_FRACTION:
        problems.append(
            f"{float(over):.0%} of features fire on > {OVERACTIVE_RATE:.0%} of rows "
            f"(limit {MAX_OVERACTIVE_FRACTION:.0%}): not sparse"
        )
    return problems


__all__ = [
    "ADVICE",
    "MAX_OVERACTIVE_FRACTION",
    "MIN_EXPLAINED_VARIANCE",
    "OVERACTIVE_RATE",
    "quality_problems",
    "warn_failures",
]


def warn_failures(metrics: Mapping[str, Mapping[str, Any]]) -> None:
    """Warn for every dictionary whose last-window metrics fail :func:`quality_problems`."""
    for name, m in metrics.items():
        problems = quality_problems(m["last_window"])
        if problems:
            logger.warning(
                "%s FAILS the quality checks on its last %d training steps: %s; %s",
                name,
                int(m["last_window"]["steps"]),
                "; ".join(problems),
                ADVICE,
            )
