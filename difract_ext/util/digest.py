"""Identity digests for resumable work: a model's weights and a data file's content.

A resume must refuse a changed identity (another model, dtype or harvest under the same names).
Hashing every byte of FLUX.1 (24 GB) or of a large harvest on each resume would cost minutes, so
both digests read a fixed, content-spread sample:

- :func:`module_digest`: every parameter and buffer's name, shape and dtype, its sum and sum of
  squares (float64), and up to ``sample`` values taken at evenly spaced flat indices;
- :func:`file_digest`: the size, the first ``head`` bytes (a safetensors header and the start of
  the data) and ``blocks`` blocks of ``block`` bytes at evenly spaced offsets.

Two different models or files agree on such a digest only if they agree on everything sampled,
which for trained weights or harvested activations does not happen by chance.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch

__all__ = ["file_digest", "module_digest"]


def module_digest(module: torch.nn.Module, sample: int = 4096) -> str:
    """SHA-256 hex digest of ``module``'s parameters and buffers (names, shapes, dtypes, sums and
    a strided sample of values; see the module docstring)."""
    h = hashlib.sha256()
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        t = tensor.detach()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        if t.numel() == 0:
            continue
        flat = t.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(sample, flat.numel()), device=flat.device)
        picked = flat[idx.round().long()].to(device="cpu", dtype=torch.float64)
        h.update(picked.numpy().tobytes())
        if t.is_floating_point() or t.is_complex():
            f = flat.to(torch.float64)
            h.update(struct.pack("<dd", float(f.sum()), float((f * f).sum())))
        else:
            h.update(struct.pack("<q", int(flat.to(torch.int64).sum())))
    return h.hexdigest()


def file_digest(
    path: str | Path, head: int = 1 << 16, blocks: int = 32, block: int = 1 << 16
) -> str:
    """SHA-256 hex digest of ``path``'s size and sampled content (see the module docstring)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with p.open("rb") as f:
        h.update(f.read(head))
        last = size - block  # the offset of the last block: blocks run from head to there
        if last > head:
            for i in range(blocks):
                f.seek(head + (last - head) * i // max(blocks - 1, 1))
                h.update(f.read(block))
        else:  # the rest fits in one block
            h.update(f.read())
    return h.hexdigest()
