"""Finding NaN and ±inf in large tensors without a full-size mask."""

from __future__ import annotations

import torch

__all__ = ["nonfinite"]

_BLOCK = 1 << 24  # elements per block: a 16 M-entry bool mask at most


def nonfinite(t: torch.Tensor) -> tuple[int, tuple[int, ...] | None]:
    """``(count, index of the first)`` of the NaN / ±inf entries of ``t`` (``(0, None)`` if none).

    Works in blocks of leading-dimension slices (views, also of memory-mapped or transposed
    tensors), so a 1 GB weight needs no 1 GB mask. Integer and bool tensors are always finite.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0, None
    if t.ndim == 0:
        return (0, None) if bool(torch.isfinite(t)) else (1, ())
    per_row = max(1, t[0].numel())
    step = max(1, _BLOCK // per_row)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    count, first = 0, None
    for lo in range(0, t.shape[0], step):
        block = t[lo : lo + step]
        # fast path (~memory speed): a sum is finite iff every entry is, barring overflow, which
        # only sends a block to the exact check below
        if bool(torch.isfinite(block.sum(dtype=acc))):
            continue
        bad = ~torch.isfinite(block)
        count += int(bad.sum())
        if first is None:
            idx = bad.nonzero()[0].tolist()
            first = (lo + idx[0], *idx[1:])
    return count, first
