"""Timestep handling for conditioned dictionaries: the sinusoidal embedding and t broadcasting.

A conditioned dictionary sees the timestep ``t`` exactly as the diffusion transformer receives
it (for FLUX the ``timestep`` keyword, in ``[0, 1]``; schnell's 4 steps give
``{1.0, 0.75390625, 0.5, 0.25}``). ``timestep_scale`` multiplies ``t`` before the embedding, for
backbones whose transformer receives ``[0, 1000]``.

The embedding is diffusers' :func:`~diffusers.models.embeddings.get_timestep_embedding`; the
DifFRACT convention is its default: sin half first, ``f_k = 10000^(-k / (half - 1))``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers.models.embeddings import get_timestep_embedding

TimestepLike = float | int | torch.Tensor


class TimestepError(ValueError):
    """A timestep is missing or does not fit the activations it conditions."""


@dataclass(frozen=True)
class TimestepEmbeddingSpec:
    """How ``t`` becomes the ``[N, dim]`` input of the time MLP.

    Attributes:
        dim: embedding width (DifFRACT: 256).
        max_period: base of the geometric frequency ladder.
        downscale_freq_shift: ``f_k = max_period^(-k / (dim/2 - shift))`` (DifFRACT: 1).
        flip_sin_to_cos: ``[cos, sin]`` instead of ``[sin, cos]`` (DifFRACT: False).
        scale: multiplies the arguments ``t * f_k``.
        timestep_scale: multiplies ``t`` before anything else (FLUX: 1.0; a backbone whose
            transformer receives ``[0, 1000]`` would use 0.001).
    """

    dim: int = 256
    max_period: float = 10000.0
    downscale_freq_shift: float = 1.0
    flip_sin_to_cos: bool = False
    scale: float = 1.0
    timestep_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.dim < 2 or self.dim % 2:
            raise ValueError(f"timestep embedding dim must be even and >= 2, got {self.dim}")
        if not self.max_period > 1 or not math.isfinite(self.max_period):  # NaN fails too
            raise ValueError(f"max_period must be > 1, got {self.max_period}")
        if not self.dim // 2 - self.downscale_freq_shift > 0:
            raise ValueError(
                f"downscale_freq_shift={self.downscale_freq_shift} leaves no frequencies for "
                f"dim={self.dim}; use a shift < dim/2"
            )
        if not math.isfinite(self.timestep_scale) or self.timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be a positive number, got {self.timestep_scale}")

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps.

        Args:
            t: ``[N]`` timesteps (any float dtype; computed in float32).

        Returns:
            ``[N, dim]`` float32 embedding.
        """
        t = t.reshape(-1).to(torch.float32)
        if self.timestep_scale != 1.0:
            t = t * self.timestep_scale
        # diffusers types max_period as int; an integral float is passed as int so the
        # log is taken of exactly the same number either way.
        period: Any = (
            int(self.max_period) if float(self.max_period).is_integer() else self.max_period
        )
        return get_timestep_embedding(
            t,
            self.dim,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
            max_period=period,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_timestep_tensor(
    t: TimestepLike, device: torch.device | str | None = None, high: float = 1.0
) -> torch.Tensor:
    """Turn a float, int or tensor into a float32 tensor of timesteps (shape kept, 0-d allowed).

    ``high``: the largest t accepted (1 for FLUX; ``1 / timestep_scale`` for a dictionary whose
    backbone's transformer receives ``[0, 1000]``).

    Raises:
        TimestepError: not a real number, NaN/inf, or outside [0, high] (FLUX's transformer
            receives the scheduler's timestep / 1000; a value like 750 is the scheduler's scale).
    """
    if isinstance(t, bool):
        raise TimestepError(f"timestep must be a number or a tensor, got {t!r}")
    if isinstance(t, (float, int)):
        t = torch.tensor(float(t), dtype=torch.float32)
    if not isinstance(t, torch.Tensor):
        raise TimestepError(
            f"timestep must be a float or a tensor of floats, got {type(t).__name__}"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise TimestepError(f"timestep must be real-valued, got dtype {t.dtype}")
    t = t.to(device=device if device is not None else t.device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise TimestepError("timestep contains NaN or inf")
    if t.numel() and not bool(((t >= 0) & (t <= high)).all()):
        bad = float(t[(t < 0) | (t > high)].flatten()[0])
        hint = f"; divide by 1000 (t = {bad / 1000:g})" if high == 1 < bad <= 1000 else ""
        raise TimestepError(
            f"timestep {bad:g} is outside [0, {high:g}]: dictionaries take the t that FLUX's "
            f"transformer "
            f"receives (the scheduler's timestep / 1000, e.g. 1.0, 0.75390625, 0.5, 0.25 for "
            f"schnell){hint}"
        )
    return t


def broadcast_shape_for(t: torch.Tensor, x: torch.Tensor) -> tuple[int, ...]:
    """Shape that per-``t`` rows ``[*t.shape, d]`` take so they broadcast against ``x``.

    ``t`` is a scalar (one t for everything) or matches a prefix of ``x``'s leading dims:
    ``[N]`` for ``x [N, d]``, ``[B]`` or ``[B, S]`` for ``x [B, S, d]``.

    Raises:
        TimestepError: if ``t`` does not match a prefix of ``x``'s leading dims.
    """
    lead = tuple(x.shape[:-1])
    tshape = tuple(t.shape)
    if len(tshape) > len(lead) or lead[: len(tshape)] != tshape:
        raise TimestepError(
            f"timestep of shape {list(tshape)} does not fit activations of shape "
            f"{list(x.shape)}: pass one t (a float or 0-d tensor), or a tensor matching the "
            f"leading dims of x (e.g. [{lead[0] if lead else 'N'}] for one t per batch row)"
        )
    return tshape + (1,) * (len(lead) - len(tshape))
