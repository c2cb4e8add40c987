"""Deterministic, resumable iteration over harvested rows for training.

An epoch visits the shards in a seeded random order, ``mix_shards`` at a time (a *group*); a
group's rows are concatenated per stream and shuffled with a seed of ``(seed, epoch, group,
stream)``. Batch ``b`` of a stream is rows ``perm[b·B : (b+1)·B]`` (the remainder is dropped);
with ``W`` processes, rank ``r`` takes the ``r``-th of ``W`` equal slices of it. Everything depends
only on the seed and the manifest, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from difract_ext.capture.format import HarvestReader
from difract_ext.flux.sites import STREAMS, Site
from difract_ext.util.seeds import derive_seed


@dataclass(frozen=True)
class Group:
    """Shards trained on together: ``epoch``, ``index`` within the epoch, shard indices."""

    epoch: int
    index: int
    shards: tuple[int, ...]


def plan_groups(n_shards: int, epochs: int, mix_shards: int, seed: int) -> list[Group]:
    """All groups of all epochs, in training order."""
    groups = []
    for epoch in range(epochs):
        order = torch.randperm(
            n_shards, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))
        )
        for gi, start in enumerate(range(0, n_shards, mix_shards)):
            groups.append(
                Group(epoch, gi, tuple(int(i) for i in order[start : start + mix_shards]))
            )
    return groups


def group_rows(
    reader: HarvestReader, group: Group, stream: str, include_padding: bool = True
) -> int:
    """Training rows of ``stream`` in ``group`` (tagged padding counted if ``include_padding``)."""
    return sum(
        (s.rows if include_padding else s.valid_rows).get(stream, 0)
        for s in (reader.shards[i] for i in group.shards)
    )


def steps_per_stream(
    reader: HarvestReader,
    groups: Sequence[Group],
    streams: Sequence[str],
    batch_size: int,
    include_padding: bool = True,
) -> dict[str, int]:
    """Optimizer steps each stream's dictionaries will take over ``groups``."""
    return {
        s: sum(group_rows(reader, g, s, include_padding) // batch_size for g in groups)
        for s in streams
    }


class GroupData:
    """One group's shuffled rows for the streams and sites being trained (tagged T5 padding rows
    included if ``include_padding``).

    ``batch(stream, key, b, rank, world)`` -> ``(x [B/W, D], y [B/W, D], t [B/W])`` float32.
    """

    def __init__(
        self,
        reader: HarvestReader,
        group: Group,
        sites: Sequence[Site],
        seed: int,
        batch_size: int,
        include_padding: bool = True,
    ):
        self.batch_size = batch_size
        self.data: dict[str, dict[str, torch.Tensor]] = {}
        self.n_batches: dict[str, int] = {}
        for stream in sorted({s.stream for s in sites}):
            stream_sites = [s for s in sites if s.stream == stream]
            parts = [
                reader.stream_rows(i, stream, stream_sites, valid_only=not include_padding)
                for i in group.shards
            ]
            parts = [p for p in parts if p]
            if not parts:
                self.n_batches[stream] = 0
                continue
            cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            n = int(cat["t"].shape[0])
            gen = torch.Generator().manual_seed(
                derive_seed(seed, group.epoch, group.index, STREAMS.index(stream))
            )
            perm = torch.randperm(n, generator=gen)
            self.data[stream] = {k: v[perm] for k, v in cat.items()}
            self.n_batches[stream] = n // batch_size

    def batch(
        self, site: Site, b: int, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.data[site.stream]
        local = self.batch_size // world
        lo = b * self.batch_size + rank * local
        key = str(site)
        sl = slice(lo, lo + local)
        return (
            d[f"{key}.x"][sl].to(device=device, dtype=torch.float32),
            d[f"{key}.y"][sl].to(device=device, dtype=torch.float32),
            d["t"][sl].to(device=device, dtype=torch.float32),
        )
