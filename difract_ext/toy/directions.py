"""Directions of the shapes world's shapes in a FLUX pipeline's latent space (``x0:circle@left``).

A colour target projects every patch of a region on one colour direction
(:func:`~difract_ext.flux.directions.colour_directions`). A shape is a spatial pattern, so its
direction is one ``[4 C]`` vector *per patch* of the region: a linear probe. Single objects of
every shape and palette colour are drawn in the region (:func:`~difract_ext.toy.world.render`, at
:data:`PLACEMENTS` jittered boxes, as the training images are) and encoded by the pipeline's VAE;
ridge regression from the region's packed latents to the centred one-hot shape (``2/3`` for the
drawn shape, ``−1/3`` for the others) gives one direction per shape, without a bias. On a clean
latent the projection is about ``2/3`` for the object's shape and ``−1/3`` for the others, the
directions sum to zero, and ``x0 · direction`` grows as the object looks more like that shape
and less like the others, whatever its colour.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from difract_ext.flux.directions import packed_latents, region_patches
from difract_ext.toy.world import COLORS, POSITIONS, SHAPES, Scene, ShapeObject, render

#: Jittered placements per shape and colour (render seeds ``0..PLACEMENTS-1``) the probe fits.
PLACEMENTS = 96
#: Ridge penalty, relative to the mean eigenvalue of the latents' Gram matrix.
RIDGE = 1e-3
#: Fitted probes per VAE (a weak key: dropped with the pipeline), by (position, grid).
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def shape_directions(
    pipeline: Any, position: str, grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """``{shape: [n_patches, 4 C]}`` probe directions over the patches of ``position``.

    Args:
        pipeline: a ``FluxPipeline`` (its VAE defines the latent space).
        position: a region of the shapes world (``left``, ``right``, ``top``, ``bottom``).
        grid: the step's patch grid ``(rows, cols)``, square (the shapes world's images are);
            the patches are :func:`~difract_ext.flux.directions.region_patches` of ``position``
            (row-major), and the image side is ``rows × 2 × pipeline.vae_scale_factor`` pixels.

    Raises:
        ValueError: an unknown position, or a grid that is not square.
    """
    fitted = _FITTED.setdefault(pipeline.vae, {})
    key = (position, tuple(grid))
    if key not in fitted:
        fitted[key] = _fit(pipeline, position, (int(grid[0]), int(grid[1])))
    return {s: d.clone() for s, d in fitted[key].items()}


def _fit(pipeline: Any, position: str, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; shapes need one of {POSITIONS}")
    if grid[0] != grid[1]:
        raise ValueError(f"shape directions need a square image; the patch grid is {grid}")
    size = grid[0] * 2 * int(pipeline.vae_scale_factor)
    scenes = [Scene((ShapeObject(c, s, position),)) for s in SHAPES for c in COLORS]
    images = torch.from_numpy(
        np.stack([render(sc, size, seed=j) for sc in scenes for j in range(PLACEMENTS)])
    )
    latents = torch.cat(
        [
            packed_latents(pipeline, chunk.permute(0, 3, 1, 2).float() / 255.0)
            for chunk in images.split(96)
        ]
    )
    idx = torch.tensor([r * grid[1] + c for r, c in region_patches(position, grid)])
    x = latents[:, idx].double().flatten(1)  # [N, n * 4C]
    shape_of = torch.arange(len(SHAPES)).repeat_interleave(len(COLORS) * PLACEMENTS)
    y = torch.nn.functional.one_hot(shape_of, len(SHAPES)).double() - 1.0 / len(SHAPES)
    gram = x.T @ x
    ridge = RIDGE * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), x.T @ y)
    n, c = len(idx), latents.shape[-1]
    return {s: w[:, i].reshape(n, c).float() for i, s in enumerate(SHAPES)}
