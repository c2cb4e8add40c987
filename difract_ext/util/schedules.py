"""The learning-rate schedule of every trainer: linear warm-up, then a cosine to a floor.

Neither transformers' ``get_cosine_schedule_with_warmup`` (warm-up from 0, floor 0) nor
torch's ``CosineAnnealingLR`` (recursive, so float values drift) gives the values the shipped
models and dictionaries were trained with; this closed form does, bit for bit.
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(
    step: int, total: int, warmup: int = 0, end_fraction: float = 0.0, peak: float = 1.0
) -> float:
    """Learning rate at ``step`` (0-based).

    ``peak * (step + 1) / warmup`` during the first ``warmup`` steps, then
    ``peak * (end + (1 - end) * (1 + cos(pi * f)) / 2)`` with ``f`` going from 0 at ``warmup`` to 1
    at ``total`` (and staying 1 after it).

    Args:
        step: optimizer step.
        total: steps of the whole schedule, warm-up included.
        warmup: linear warm-up steps (0: none).
        end_fraction: the floor, as a fraction of ``peak``.
        peak: the maximum; 1.0 gives a multiplier for ``torch.optim.lr_scheduler.LambdaLR``.
    """
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (end_fraction + (1 - end_fraction) * 0.5 * (1 + math.cos(math.pi * frac)))
