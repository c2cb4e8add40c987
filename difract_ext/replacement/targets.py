"""Attribution targets of one denoising step: linear functionals of the replacement model.

A target is a weighted sum ``Σ ⟨h_layer[p], v_p⟩ + offset`` over tensors of the frozen model:
``layer = L`` means ``unembed.hook_pre`` (the normalised final residual), smaller layers the
MLP inputs ``blocks.{l}.mlp.hook_in``. Attribution injects the vectors ``v_p`` as gradients there.

- :func:`output_target`: the predicted velocity (or clean latent ``x0 = x_t − t·v``) over a
  region of image patches, projected on a direction of the transformer's output channels, e.g.
  "how red is the left object": ``Σ_{p∈R} u · v_p``;
- :func:`feature_target`: a transcoder feature's pre-activation at the listed positions, summed
  (default: every position of the site's stream). DifFRACT roots a graph at one position, the
  feature's argmax (:func:`feature_argmax`); pass ``positions=[p]`` for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from difract_ext.flux.sites import Site
from difract_ext.util.config import check_range


@dataclass
class TargetSpec:
    """One attribution target.

    Attributes:
        label: shown in graphs (e.g. ``"x0·red @ left"``).
        weight: its weight among several targets (circuit-tracer's logit probability).
        injections: ``(layer, positions [k], vectors [k, d])``; ``layer == n_layers`` is the final
            normalised residual.
        offset: constant added to the functional to give the target's value.
        kind: ``"velocity"``, ``"x0"`` or ``"feature"``.
    """

    label: str
    weight: float
    injections: list[tuple[int, torch.Tensor, torch.Tensor]]
    offset: float = 0.0
    kind: str = "velocity"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_range(f"weight of target {self.label!r}", self.weight, low=0.0, low_open=True)

    def functional(self, mlp_in: torch.Tensor, resid_final: torch.Tensor) -> torch.Tensor:
        """The injected functional (without offset) on a batch of states.

        Args:
            mlp_in: ``[B, L, P, d]`` MLP inputs; resid_final: ``[B, P, d]``.

        Returns:
            ``[B]``.
        """
        n_layers = mlp_in.shape[1]
        total = torch.zeros(mlp_in.shape[0], dtype=mlp_in.dtype, device=mlp_in.device)
        for layer, pos, vecs in self.injections:
            h = resid_final if layer == n_layers else mlp_in[:, layer]
            total = total + (h[:, pos] * vecs.to(h.dtype)).sum(dim=(1, 2))
        return total

    def value(self, mlp_in: torch.Tensor, resid_final: torch.Tensor) -> torch.Tensor:
        """``[B]`` target values: the functional plus the offset."""
        return self.functional(mlp_in, resid_final) + self.offset


def patch_positions(patches: Any, grid: tuple[int, int], n_txt: int) -> torch.Tensor:
    """Joint positions of image patches.

    Args:
        patches: ``"all"``, a bool mask ``[rows, cols]``, or an iterable of ``(row, col)``.
        grid: ``(rows, cols)`` of the image patch grid.
        n_txt: text positions come first in the joint order.
    """
    rows, cols = grid
    if isinstance(patches, str):
        if patches != "all":
            raise ValueError(
                f"patches must be 'all', a [rows, cols] mask or (row, col) pairs, got {patches!r}"
            )
        flat = torch.arange(rows * cols)
    elif isinstance(patches, torch.Tensor) and patches.dtype == torch.bool:
        if tuple(patches.shape) != (rows, cols):
            raise ValueError(
                f"patch mask has shape {list(patches.shape)}, expected [{rows}, {cols}]"
            )
        flat = torch.nonzero(patches.reshape(-1), as_tuple=True)[0]
    else:
        pairs = [(int(r), int(c)) for r, c in patches]
        bad = [(r, c) for r, c in pairs if not (0 <= r < rows and 0 <= c < cols)]
        if bad:
            raise ValueError(f"patches {bad} outside the {rows}x{cols} patch grid")
        flat = torch.tensor([r * cols + c for r, c in pairs], dtype=torch.long)
    if flat.numel() == 0:
        raise ValueError("the target region has no patches")
    return flat + n_txt


def output_target(
    frozen: Any,
    patches: Any,
    direction: torch.Tensor,
    kind: str = "velocity",
    label: str | None = None,
    weight: float = 1.0,
) -> TargetSpec:
    """``Σ_{p ∈ patches} u · out_p`` where ``out`` is the velocity or ``x0 = x_t − t·v``.

    Args:
        frozen: the step's :class:`~difract_ext.replacement.frozen.FrozenFlux`.
        patches: see :func:`patch_positions`.
        direction: ``[C_out]`` (one direction for every patch) or ``[n_patches, C_out]``.
        kind: ``"velocity"`` or ``"x0"``.
    """
    if kind not in ("velocity", "x0"):
        raise ValueError(f"kind must be 'velocity' or 'x0', got {kind!r}")
    step = frozen.step_input
    pos = patch_positions(patches, step.grid, frozen.n_txt)
    proj = frozen.flux.proj_out
    c_out = proj.weight.shape[0]
    u = direction.to(proj.weight.dtype)
    if u.ndim == 1:
        u = u.expand(pos.numel(), -1)
    if tuple(u.shape) != (pos.numel(), c_out):
        raise ValueError(
            f"direction has shape {list(direction.shape)}; "
            f"expected [{c_out}] or [{pos.numel()}, {c_out}]"
        )
    scale = 1.0 if kind == "velocity" else -step.t
    vecs = scale * (u @ proj.weight)  # [k, d]: ∂(u·proj(h))/∂h, times -t for x0
    offset = scale * float((u * proj.bias.detach()).sum()) if proj.bias is not None else 0.0
    if kind == "x0":
        x_t = step.hidden_states[0, pos - frozen.n_txt].to(u.dtype)
        offset += float((u * x_t).sum())
    return TargetSpec(
        label=label or f"{kind}·u @ {pos.numel()} patches",
        weight=weight,
        injections=[(frozen.n_layers, pos, vecs.detach())],
        offset=offset,
        kind=kind,
        info={
            "patches": (pos - frozen.n_txt).tolist(),
            "direction": u.detach().clone(),
            "scale": scale,
        },
    )


def feature_target(
    frozen: Any,
    dictionaries: dict[Site, Any],
    site: Site,
    feature: int,
    positions: Sequence[int] | None = None,
    weight: float = 1.0,
    label: str | None = None,
) -> TargetSpec:
    """A transcoder feature's pre-activation at the step's t, summed over ``positions``.

    Args:
        site: the dictionary's ``(layer, stream)``.
        feature: index inside that dictionary.
        positions: joint positions (default: every position of the site's stream, summed; one
            position, e.g. :func:`feature_argmax`, roots the graph there as DifFRACT does).
    """
    dic = dictionaries[site]
    if not 0 <= feature < dic.cfg.d_sae:
        raise ValueError(f"feature {feature} outside 0..{dic.cfg.d_sae - 1} of {site}")
    n_txt, n_pos = frozen.n_txt, frozen.n_txt + frozen.n_img
    lo, hi = (0, n_txt) if site.stream == "txt" else (n_txt, n_pos)
    pos = (
        torch.arange(lo, hi)
        if positions is None
        else torch.tensor(list(positions), dtype=torch.long)
    )
    if pos.numel() == 0 or bool(((pos < lo) | (pos >= hi)).any()):
        raise ValueError(f"positions must be {site.stream} positions in {lo}..{hi - 1}")
    folded = dic.fold(frozen.step_input.t)
    w = folded.W_enc[:, feature].to(frozen.flux.proj_out.weight.dtype)
    return TargetSpec(
        label=label or f"{site.stream} L{site.layer} #{feature} pre",
        weight=weight,
        injections=[(site.layer, pos, w.expand(pos.numel(), -1).clone())],
        offset=float(folded.b_enc[feature]) * pos.numel(),
        kind="feature",
        info={"layer": site.layer, "stream": site.stream, "feature": feature},
    )


def feature_argmax(
    frozen: Any, dictionaries: dict[Site, Any], site: Site, feature: int, mlp_in: torch.Tensor
) -> int:
    """The joint position of the site's stream where the feature's pre-activation is largest.

    Args:
        mlp_in: ``[L, P, d]`` the step's clean MLP inputs (``AttributionStep.clean["mlp_in"]``).
    """
    spec = feature_target(frozen, dictionaries, site, feature)
    (layer, pos, vecs) = spec.injections[0]
    pre = (mlp_in[layer, pos] * vecs.to(mlp_in.device, mlp_in.dtype)).sum(-1)
    return int(pos[int(pre.argmax())])
