"""On-disk format of harvested MLP activations: safetensors shards, a manifest, and a reader.

Layout of a harvest folder::

    harvest_config.json          what was harvested (sites, prompts, seeds, call kwargs, ...)
    manifest.rank{R}.json        journal of process R: the shards it committed (see below)
    manifest.json                summary written when a harvest finishes (all shards, totals)
    shards/c{FIRST:06d}-{LAST:06d}.safetensors

A *chunk* is a fixed group of consecutive work units ``(prompt index, seed)`` run in one pipeline
call; chunk membership depends only on the config, so a resumed harvest recomputes exactly the
same rows. A shard holds one or more whole chunks and is named by its first and last chunk, so
names never collide across processes or resumed runs. A shard file is written to a temporary name
and renamed, *then* the journal of its process is rewritten atomically: a shard is part of the
data only once a journal lists it, and an interrupted write leaves at most an unreferenced file.

Tensors in a shard (``N_s`` rows of stream ``s``; all sites of one stream share row order):

==========================  ===============  =================================================
name                        shape, dtype     meaning
==========================  ===============  =================================================
``{stream}_{layer}.x``      [N_s, D] (cfg)   MLP input (normalised, AdaLN-modulated)
``{stream}_{layer}.y``      [N_s, D] (cfg)   MLP output before the gate
``{stream}.t``              [N_s] float32    the transformer's ``timestep`` for the row
``{stream}.prompt``         [N_s] int32      index into ``harvest_config.json["prompts"]``
``{stream}.seed``           [N_s] int64      generation seed
``{stream}.step``           [N_s] int32      denoising step (0 = first transformer call)
``{stream}.pos``            [N_s] int32      token position (image patch or T5 token)
``{stream}.valid``          [N_s] bool       only with ``text_padding="mask"``: not padding
==========================  ===============  =================================================
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difract_ext.util.atomic import atomic_write_json
from difract_ext.flux.sites import STREAMS, Site

logger = logging.getLogger(__name__)

FORMAT = "difract-harvest"
FORMAT_VERSION = 1
CONFIG_FILE = "harvest_config.json"
SUMMARY_FILE = "manifest.json"
SHARD_DIR = "shards"
ROW_FIELDS: tuple[str, ...] = ("t", "prompt", "seed", "step", "pos")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_KEY_RE = re.compile(r"^(img|txt)_(\d+)$")


class HarvestFormatError(ValueError):
    """A harvest folder is missing, incomplete, or from an incompatible configuration."""


def site_key(site: Site) -> str:
    """``Site(3, "img") -> "img_3"`` (the name used in shards, checkpoints and folders)."""
    return f"{site.stream}_{site.layer}"


def parse_site_key(key: str) -> Site:
    """Inverse of :func:`site_key`; also accepts ``"3:img"``."""
    if ":" in key:
        layer, stream = key.split(":", 1)
        return Site(int(layer), stream)
    m = _KEY_RE.match(key)
    if not m:
        raise HarvestFormatError(f"not a site key: {key!r} (expected e.g. 'img_3' or '3:img')")
    return Site(int(m.group(2)), m.group(1))


def journal_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def shard_name(first_chunk: int, last_chunk: int) -> str:
    return f"{SHARD_DIR}/c{first_chunk:06d}-{last_chunk:06d}.safetensors"


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard (an entry of a journal).

    Attributes:
        file: path relative to the harvest folder.
        chunks: the chunk indices it holds.
        units: the ``(prompt index, seed)`` work units it holds.
        rows: rows per stream (including padding rows kept with ``text_padding="mask"``).
        valid_rows: rows per stream that are not padding.
        timesteps: the distinct t values in the shard.
    """

    file: str
    chunks: tuple[int, ...]
    units: tuple[tuple[int, int], ...]
    rows: dict[str, int]
    valid_rows: dict[str, int]
    timesteps: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "chunks": list(self.chunks),
            "units": [list(u) for u in self.units],
            "rows": dict(self.rows),
            "valid_rows": dict(self.valid_rows),
            "timesteps": list(self.timesteps),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(
            file=str(d["file"]),
            chunks=tuple(int(c) for c in d["chunks"]),
            units=tuple((int(p), int(s)) for p, s in d["units"]),
            rows={k: int(v) for k, v in d["rows"].items()},
            valid_rows={k: int(v) for k, v in d.get("valid_rows", d["rows"]).items()},
            timesteps=tuple(float(t) for t in d.get("timesteps", ())),
        )


def write_shard(root: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` to ``root / name`` through a temporary file and a rename."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_journal(root: Path, rank: int) -> list[ShardInfo]:
    path = root / journal_name(rank)
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [ShardInfo.from_json(s) for s in data["shards"]]


def write_journal(root: Path, rank: int, shards: Sequence[ShardInfo]) -> None:
    atomic_write_json(
        root / journal_name(rank),
        {"format": FORMAT, "version": FORMAT_VERSION, "rank": rank,
         "shards": [s.to_json() for s in shards]},
    )


def read_all_shards(root: Path) -> list[ShardInfo]:
    """Every committed shard of every journal, sorted by first chunk.

    Raises:
        HarvestFormatError: if two journals claim the same chunk.
    """
    shards: list[ShardInfo] = []
    for path in sorted(root.glob("manifest.rank*.json")):
        rank = int(path.name[len("manifest.rank"):-len(".json")])
        shards.extend(read_journal(root, rank))
    shards.sort(key=lambda s: s.chunks[0])
    seen: set[int] = set()
    for s in shards:
        dup = seen.intersection(s.chunks)
        if dup:
            raise HarvestFormatError(f"chunks {sorted(dup)} are listed twice in {root}'s journals")
        seen.update(s.chunks)
    return shards


class HarvestReader:
    """Read a harvest folder (committed shards only).

    Example::

        reader = HarvestReader("acts/train")
        reader.sites                     # [Site(0, 'img'), ...]
        rows = reader.load_shard(0)      # {"img_0.x": [N, D], "img.t": [N], ...}
        x, y, meta = reader.site_rows(Site(0, "img"))   # everything, for small harvests

    Raises:
        HarvestFormatError: if ``root`` has no harvest config.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        cfg_path = self.root / CONFIG_FILE
        if not cfg_path.is_file():
            raise HarvestFormatError(f"{self.root} is not a harvest folder (no {CONFIG_FILE})")
        self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        if self.config.get("format") != FORMAT:
            raise HarvestFormatError(f"{cfg_path} is not a {FORMAT} config")
        self.shards: list[ShardInfo] = read_all_shards(self.root)

    @property
    def sites(self) -> list[Site]:
        return [parse_site_key(k) for k in self.config["sites"]]

    @property
    def streams(self) -> list[str]:
        return [s for s in STREAMS if any(site.stream == s for site in self.sites)]

    @property
    def d_model(self) -> int:
        return int(self.config["d_model"])

    @property
    def prompts(self) -> list[str]:
        return list(self.config["prompts"])

    @property
    def model_name(self) -> str:
        return str(self.config.get("model_name", "unknown"))

    @property
    def timesteps(self) -> list[float]:
        """Sorted distinct t values of all committed shards."""
        return sorted({t for s in self.shards for t in s.timesteps})

    def n_rows(self, stream: str, valid_only: bool = True) -> int:
        return sum((s.valid_rows if valid_only else s.rows).get(stream, 0) for s in self.shards)

    def completed_units(self) -> set[tuple[int, int]]:
        return {u for s in self.shards for u in s.units}

    def load_shard(self, index: int, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of shard ``index`` (all of them, or only ``keys``), on CPU."""
        path = self.root / self.shards[index].file
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys()) if keys is None else list(keys)
            for name in names:
                out[name] = f.get_tensor(name)
        return out

    def stream_rows(
        self, index: int, stream: str, sites: Sequence[Site], valid_only: bool = True
    ) -> dict[str, torch.Tensor]:
        """One shard's rows of ``stream`` for ``sites``, padding rows removed if ``valid_only``.

        Returns:
            ``{"t": [N], "prompt", "seed", "step", "pos": [N], "{key}.x": [N, D], "{key}.y": [N, D]}``.
        """
        keys = [f"{stream}.{f}" for f in ROW_FIELDS]
        for site in sites:
            if site.stream != stream:
                raise ValueError(f"{site} is not in stream {stream!r}")
            keys += [f"{site_key(site)}.x", f"{site_key(site)}.y"]
        has_valid = self.config.get("text_padding") == "mask" and stream == "txt"
        if has_valid:
            keys.append(f"{stream}.valid")
        raw = self.load_shard(index, keys) if self.shards[index].rows.get(stream, 0) else {}
        if not raw:
            return {}
        out = {k[len(stream) + 1:] if k.startswith(stream + ".") else k: v for k, v in raw.items()}
        if has_valid and valid_only:
            keep = out.pop("valid")
            out = {k: v[keep] for k, v in out.items()}
        return out

    def site_rows(
        self, site: Site, valid_only: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """All rows of one site, concatenated: ``(x [N, D], y [N, D], {"t", "prompt", ...: [N]})``.

        Loads everything into memory: meant for small harvests, tests and evaluation.
        """
        parts = [self.stream_rows(i, site.stream, [site], valid_only) for i in range(len(self.shards))]
        parts = [p for p in parts if p]
        if not parts:
            raise HarvestFormatError(f"{self.root} holds no rows of {site_key(site)}")
        key = site_key(site)
        x = torch.cat([p[f"{key}.x"] for p in parts])
        y = torch.cat([p[f"{key}.y"] for p in parts])
        meta = {f: torch.cat([p[f] for p in parts]) for f in ROW_FIELDS}
        return x, y, meta
