"""Seeds derived from other seeds: the one place the project mixes integers into a seed.

Every random stream that must be reproducible (data order, subsampling, initialisation,
resampling) is seeded by :func:`derive_seed` from the run's seed and the stream's coordinates,
so a resumed or re-sharded run draws exactly the same numbers. Different stages start from
different ``basis`` values (domain separation): a training and a harvest stream with the same
coordinates never share a seed.

The values are part of the shipped artifacts' recipes (the shapes dictionaries, their harvest,
the shapes model): changing a formula or a basis changes what the reproduction scripts produce.
``tests/test_util_seeds.py`` pins them.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "HARVEST_BASIS",
    "TRAINING_BASIS",
    "derive_seed",
    "shapes_step_seed",
    "text_seed",
]

_FNV_PRIME = 0x100000001B3  # 64-bit FNV prime, 1099511628211
_MODULUS = 1 << 61

#: Basis of training streams (data order, initialisation, resampling): the 64-bit golden ratio.
TRAINING_BASIS = 0x9E3779B97F4A7C15
#: Basis of harvest streams (position subsampling). The digits of the 64-bit FNV offset basis
#: with the last one dropped, as first written; kept because the shipped harvests used it.
HARVEST_BASIS = 1469598103934665603


def derive_seed(*parts: int, basis: int = TRAINING_BASIS) -> int:
    """A seed in ``[0, 2**61)`` mixed from integers (FNV-1a style; stable across runs/platforms).

    Args:
        parts: the stream's coordinates, e.g. ``(run seed, epoch, group, stream index)``.
        basis: the starting value; :data:`TRAINING_BASIS` or :data:`HARVEST_BASIS`.

    Returns:
        an int for ``torch.Generator().manual_seed``.
    """
    h = int(basis)
    for p in parts:
        h = ((h ^ int(p)) * _FNV_PRIME) % _MODULUS
    return h


def text_seed(text: str) -> int:
    """A stable 56-bit integer from a string (the first 7 bytes of its SHA-256, little-endian).

    Used to give each named dictionary its own seed, whatever else is trained with it.
    """
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def shapes_step_seed(seed: int, step: int, salt: int = 0) -> int:
    """Seed of step ``step`` of the shapes model's training (VAE: salt 1, transformer: salt 2).

    A linear formula, ``(seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)``, kept only because
    the shipped ``difract_ext/toy/weights/shapes-flux`` was trained with it
    (``scripts/train_shapes.py`` reproduces it); new code uses :func:`derive_seed`.
    """
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)
