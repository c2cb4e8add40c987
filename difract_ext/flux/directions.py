"""Directions in FLUX's packed latent space, for output targets ("how red is the left object").

FLUX's transformer predicts velocities over *packed* latents: each image patch is a vector of
``4 * latent_channels`` numbers (2×2 latent pixels × channels), normalised as the pipeline does
(``(z − shift_factor) · scaling_factor``). A colour's direction is the mean packed latent of an
image filled with that colour minus the mean over a palette, measured through the pipeline's own
VAE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


@torch.no_grad()
def packed_latents(pipeline: Any, images: torch.Tensor) -> torch.Tensor:
    """``images [B, 3, H, W]`` in [0, 1] -> normalised packed latents ``[B, n_patches, 4 C]``."""
    vae = pipeline.vae
    x = (images * 2 - 1).to(vae.dtype)
    z = vae.encode(x).latent_dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = z.shape
    return pipeline._pack_latents(z, b, c, h, w)


@torch.no_grad()
def colour_directions(
    pipeline: Any, palette: Mapping[str, Sequence[int]], size: int = 32
) -> dict[str, torch.Tensor]:
    """Unit directions ``[4 C]`` of each palette colour, relative to the palette mean.

    Args:
        pipeline: a ``FluxPipeline`` (its VAE defines the latent space).
        palette: colour name -> RGB in 0..255.
        size: image side used for the solid-colour probes (a multiple of 16).
    """
    if not palette:
        raise ValueError("palette is empty")
    names = list(palette)
    rgb = torch.tensor([list(palette[n]) for n in names], dtype=torch.float32) / 255.0
    images = rgb[:, :, None, None].expand(-1, -1, size, size).contiguous()
    means = packed_latents(pipeline, images).mean(dim=1)  # [n_colours, 4C]
    centred = means - means.mean(dim=0, keepdim=True)
    return {n: centred[i] / centred[i].norm().clamp(min=1e-12) for i, n in enumerate(names)}


def region_patches(region: str, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Patches of a named region: ``all``, ``left``, ``right``, ``top``, ``bottom``."""
    rows, cols = grid
    every = [(r, c) for r in range(rows) for c in range(cols)]
    select = {
        "all": lambda r, c: True,
        "left": lambda r, c: c < cols // 2,
        "right": lambda r, c: c >= cols - cols // 2,
        "top": lambda r, c: r < rows // 2,
        "bottom": lambda r, c: r >= rows - rows // 2,
    }
    if region not in select:
        raise ValueError(f"unknown region {region!r}; choose one of {sorted(select)}")
    return [(r, c) for r, c in every if select[region](r, c)]
