"""Sparse activation functions of a dictionary: ReLU (DifFRACT), TopK (TIDE) and JumpReLU.

All take pre-activations ``[..., d_sae]`` and return activations of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ActivationKind = Literal["relu", "topk", "jumprelu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "topk", "jumprelu")


@dataclass(frozen=True)
class ActivationSpec:
    """Which nonlinearity a dictionary uses.

    Attributes:
        kind: ``"relu"``, ``"topk"`` (keep the ``k`` largest pre-activations per row, then ReLU)
            or ``"jumprelu"`` (``pre * (pre > threshold)``, one learned threshold per feature).
        k: number of active features per row for ``"topk"``; must be None otherwise.
    """

    kind: str = "relu"
    k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.kind!r}; choose one of {ACTIVATIONS}")
        if self.kind == "topk":
            if self.k is None or self.k < 1:
                raise ValueError(f"activation 'topk' needs k >= 1, got k={self.k}")
        elif self.k is not None:
            raise ValueError(
                f"k={self.k} is only meaningful for activation 'topk', not {self.kind!r}"
            )


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of each row (last dim), ReLU them, zero the rest."""
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``pre * (pre > threshold)`` with ``threshold [d_sae]`` broadcast over rows."""
    return pre * (pre > threshold).to(pre.dtype)


def activate(
    pre: torch.Tensor, spec: ActivationSpec, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the activation described by ``spec`` to pre-activations ``[..., d_sae]``."""
    if spec.kind == "relu":
        return pre.relu()
    if spec.kind == "topk":
        assert spec.k is not None
        return topk_relu(pre, spec.k)
    if threshold is None:
        raise ValueError("a 'jumprelu' dictionary needs its threshold parameter")
    return jumprelu(pre, threshold)
