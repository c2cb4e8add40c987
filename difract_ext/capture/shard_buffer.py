"""The rows of finished harvest chunks that are not yet in a full shard, and their commits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from difract_ext.capture.format import (
    FORMAT,
    HarvestFormatError,
    ShardInfo,
    is_partial,
    shard_name,
    write_journal,
    write_shard,
)

logger = logging.getLogger(__name__)


def stream_of(name: str) -> str:
    """``"img.t"`` / ``"img_3.x"`` -> ``"img"``."""
    return name.split(".", 1)[0].split("_", 1)[0]


class ShardBuffer:
    """Rows of finished chunks not yet in a full shard, and the commits that save them.

    Every name (``"img.t"``, ``"img_0.x"``, ...) holds one tensor per chunk (or per partial shard
    read back), in chunk order. ``commit()`` writes them all as one full shard and drops the
    partial shards it replaces; ``commit(partial=True)`` writes only the chunks not yet saved.
    """

    def __init__(
        self,
        root: Path,
        rank: int,
        streams: Sequence[str],
        batch_size: int,
        journal: list[ShardInfo],
        units: list[tuple[int, int]],
    ) -> None:
        self.root, self.rank, self.journal, self.units = root, rank, journal, units
        self.streams, self.batch_size = tuple(streams), batch_size
        self.parts: dict[str, dict[str, list[torch.Tensor]]] = {s: {} for s in self.streams}
        self.chunks: list[int] = []
        self.entries = 0  # tensors per name
        # this rank's partial shards (always the last journal entries) are read back, so that the
        # next full shard is the one an uninterrupted run writes
        self.partials = [s for s in journal if is_partial(s)]
        for info in self.partials:
            try:
                rows = load_file(str(root / info.file))
            except (SafetensorError, OSError) as e:
                raise HarvestFormatError(
                    f"{root / info.file}: unreadable partial shard ({e}); harvest again into a "
                    "new folder"
                ) from None
            self.add_rows(
                info.chunks,
                {s: {k: v for k, v in rows.items() if stream_of(k) == s} for s in self.streams},
            )
        self.saved_entries, self.saved_chunks = self.entries, len(self.chunks)

    def add(self, chunk: int, rows: dict[str, dict[str, torch.Tensor]]) -> None:
        self.add_rows((chunk,), rows)

    def add_rows(self, chunks: Sequence[int], rows: dict[str, dict[str, torch.Tensor]]) -> None:
        for stream, d in rows.items():
            for name, value in d.items():
                self.parts[stream].setdefault(name, []).append(value)
        self.chunks.extend(chunks)
        self.entries += 1

    def rows(self) -> int:
        """Rows of the fullest stream."""
        return max(
            (sum(len(v) for v in d.get(f"{s}.t", [])) for s, d in self.parts.items()), default=0
        )

    def commit(self, partial: bool = False) -> None:
        first = self.saved_chunks if partial else 0
        chunks = self.chunks[first:]
        if not chunks:
            return
        lo = self.saved_entries if partial else 0
        tensors = {
            name: torch.cat(pieces[lo:]) for d in self.parts.values() for name, pieces in d.items()
        }
        info = self._write(shard_name(chunks[0], chunks[-1], partial=partial), chunks, tensors)
        if partial:
            write_journal(self.root, self.rank, [*self.journal, info])
            self.journal.append(info)
            self.partials.append(info)
            self.saved_entries, self.saved_chunks = self.entries, len(self.chunks)
            logger.info(
                "committed chunks %d..%d as a partial shard (%s)", chunks[0], chunks[-1], info.file
            )
            return
        replaced = {p.file for p in self.partials}
        journal = [s for s in self.journal if s.file not in replaced] + [info]
        write_journal(
            self.root, self.rank, journal
        )  # the commit point: partial shards -> one full shard
        self.journal[:] = journal
        for d in self.parts.values():
            d.clear()
        self.chunks, self.entries, self.saved_entries, self.saved_chunks = [], 0, 0, 0
        for file in sorted(replaced):
            (self.root / file).unlink(
                missing_ok=True
            )  # left over if killed here: removed on resume
        self.partials = []

    def _write(self, name: str, chunks: list[int], tensors: dict[str, torch.Tensor]) -> ShardInfo:
        rows, valid_rows, tvals = {}, {}, set()
        for stream in self.parts:
            n = int(tensors[f"{stream}.t"].shape[0]) if f"{stream}.t" in tensors else 0
            rows[stream] = n
            valid = tensors.get(f"{stream}.valid")
            valid_rows[stream] = int(valid.sum()) if valid is not None else n
            if n:
                tvals.update(float(v) for v in torch.unique(tensors[f"{stream}.t"]))
        write_shard(
            self.root, name, tensors, {"format": FORMAT, "chunks": ",".join(map(str, chunks))}
        )
        size = self.batch_size
        chunk_units = tuple(u for c in chunks for u in self.units[c * size : (c + 1) * size])
        return ShardInfo(name, tuple(chunks), chunk_units, rows, valid_rows, tuple(sorted(tvals)))
