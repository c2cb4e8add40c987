"""On-disk format of harvested MLP activations: safetensors shards, a manifest, and a reader.

Layout of a harvest folder::

    harvest_config.json          what was harvested (sites, prompts, seeds, call kwargs, ...)
    manifest.rank{R}.json        journal of process R: the shards it committed (see below)
    manifest.json                summary written when a harvest finishes (all shards, totals)
    shards/c{FIRST:06d}-{LAST:06d}.safetensors
    shards/p{FIRST:06d}-{LAST:06d}.safetensors   partial shard (see below)

A *chunk* is a fixed group of consecutive work units ``(prompt index, seed)`` run in one pipeline
call; chunk membership depends only on the config, so a resumed harvest recomputes exactly the
same rows. A shard holds one or more whole chunks and is named by its first and last chunk, so
names never collide across processes or resumed runs. A shard file is written to a temporary name
and renamed, *then* the journal of its process is rewritten atomically: a shard is part of the
data only once a journal lists it, and an interrupted write leaves at most an unreferenced file.

A *partial* shard (``p...``) commits the finished chunks of a shard that is not full yet (every
``commit_seconds``, and on an interruption), so that an interrupted harvest keeps them. It is
ordinary data for readers. The harvest that fills the shard (or its resumed run, which reads the
partial shards back) replaces them by the full ``c...`` shard in one journal update, so the final
layout does not depend on when commits happened.

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
``{stream}.valid``          [N_s] bool       only with ``text_padding="tag"``: not padding
==========================  ===============  =================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from difract_ext.flux.sites import STREAMS, Site, SiteError
from difract_ext.util.atomic import atomic_write_json, atomic_write_with
from difract_ext.util.config import ConfigError, config_from_dict, config_to_dict
from difract_ext.util.files import BadFileError, check_regular_file, read_json
from difract_ext.util.finite import nonfinite

logger = logging.getLogger(__name__)

FORMAT = "difract-harvest"
FORMAT_VERSION = 1
CONFIG_FILE = "harvest_config.json"
SUMMARY_FILE = "manifest.json"
SHARD_DIR = "shards"
ROW_FIELDS: tuple[str, ...] = ("t", "prompt", "seed", "step", "pos")
#: ``text_padding`` values whose harvests hold padding rows tagged by ``txt.valid``
TAGGED_PADDING = ("tag", "mask")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class HarvestFormatError(ValueError):
    """A harvest folder is missing, incomplete, or from an incompatible configuration."""


def journal_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def shard_name(first_chunk: int, last_chunk: int, partial: bool = False) -> str:
    prefix = "p" if partial else "c"
    return f"{SHARD_DIR}/{prefix}{first_chunk:06d}-{last_chunk:06d}.safetensors"


def is_partial(info: ShardInfo) -> bool:
    """Whether a journal entry is a partial shard (to be merged into a full one)."""
    return Path(info.file).name.startswith("p")


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard (an entry of a journal).

    Attributes:
        file: path relative to the harvest folder.
        chunks: the chunk indices it holds.
        units: the ``(prompt index, seed)`` work units it holds.
        rows: rows per stream (including padding rows kept with ``text_padding="tag"``).
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
        return config_to_dict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "journal") -> ShardInfo:
        """Inverse of :meth:`to_json`; an entry without ``valid_rows`` uses ``rows``.

        Raises:
            HarvestFormatError: a malformed entry, naming ``source``.
        """
        if not isinstance(d, dict):
            raise HarvestFormatError(
                f"{source}: a shard entry must be a JSON object, got {d!r:.80}"
            )
        try:
            info = config_from_dict(cls, {"valid_rows": d.get("rows"), **d}, source)
        except ConfigError as e:
            raise HarvestFormatError(str(e)) from e
        parts = PurePosixPath(info.file).parts
        if len(parts) != 2 or parts[0] != SHARD_DIR or parts[1] in (".", "..") or "\\" in info.file:
            raise HarvestFormatError(
                f"{source}: shard file {info.file!r} is not a file of the harvest's {SHARD_DIR}/ "
                "folder; the journal was edited or corrupted: restore it, or harvest again"
            )
        if not info.chunks or not info.units:
            raise HarvestFormatError(f"{source}: shard {info.file!r} lists no chunks or units")
        return info


def write_shard(
    root: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write ``tensors`` to ``root / name`` atomically (a temporary file and a rename)."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write_with(
        root / name, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata)
    )


def read_journal(root: Path, rank: int) -> list[ShardInfo]:
    path = root / journal_name(rank)
    if not os.path.lexists(path):
        return []
    try:
        data = read_json(path, "harvest journal", required=["shards"])
    except BadFileError as e:
        raise HarvestFormatError(str(e)) from None
    if not isinstance(data["shards"], list):
        raise HarvestFormatError(f"{path}: 'shards' must be a list")
    return [ShardInfo.from_json(s, f"{path}: shards[{i}]") for i, s in enumerate(data["shards"])]


def write_journal(root: Path, rank: int, shards: Sequence[ShardInfo]) -> None:
    atomic_write_json(
        root / journal_name(rank),
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "rank": rank,
            "shards": [s.to_json() for s in shards],
        },
    )


def read_all_shards(root: Path) -> list[ShardInfo]:
    """Every committed shard of every journal, sorted by first chunk.

    Raises:
        HarvestFormatError: if two journals claim the same chunk.
    """
    shards: list[ShardInfo] = []
    for path in sorted(root.glob("manifest.rank*.json")):
        rank = int(path.name[len("manifest.rank") : -len(".json")])
        shards.extend(read_journal(root, rank))
    shards.sort(key=lambda s: s.chunks[0])
    seen: set[int] = set()
    files: set[str] = set()
    units: set[tuple[int, int]] = set()
    for s in shards:
        dup = seen.intersection(s.chunks)
        if dup:
            raise HarvestFormatError(f"chunks {sorted(dup)} are listed twice in {root}'s journals")
        twice = units.intersection(map(tuple, s.units))
        if s.file in files or twice:
            what = f"shard {s.file!r}" if s.file in files else f"units {sorted(twice)[:3]}"
            raise HarvestFormatError(
                f"{what} listed twice in {root}'s journals (its rows would be read twice); "
                "restore the journals, or harvest again"
            )
        seen.update(s.chunks)
        files.add(s.file)
        units.update(map(tuple, s.units))
    return shards


def _check_config_fields(config: dict[str, Any], path: Path) -> None:
    """The fields a reader relies on exist and have their types."""
    checks = {
        "sites": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "d_model": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "prompts": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    }
    for key, ok in checks.items():
        if key not in config:
            raise HarvestFormatError(f"{path}: missing key {key!r}; not a complete harvest config")
        if not ok(config[key]):
            raise HarvestFormatError(
                f"{path}: {key!r} has the wrong type ({config[key]!r:.80}); the config is corrupt"
            )


class HarvestReader:
    """Read a harvest folder (committed shards only).

    Shards with NaN/inf activations are refused when read (:class:`HarvestFormatError` naming
    the shard, the tensor, how many rows and the first row's prompt, seed, step and position):
    a non-finite row would make every dictionary trained or scored on it NaN.

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
        if not os.path.lexists(cfg_path):
            raise HarvestFormatError(f"{self.root} is not a harvest folder (no {CONFIG_FILE})")
        try:
            self.config: dict[str, Any] = read_json(cfg_path, "harvest config")
        except BadFileError as e:
            raise HarvestFormatError(str(e)) from None
        if self.config.get("format") != FORMAT:
            raise HarvestFormatError(f"{cfg_path} is not a {FORMAT} config")
        _check_config_fields(self.config, cfg_path)
        try:
            self._sites = [Site.parse(k) for k in self.config["sites"]]
        except SiteError as e:
            raise HarvestFormatError(f"{cfg_path}: {e}") from e
        self.shards: list[ShardInfo] = read_all_shards(self.root)

    @property
    def sites(self) -> list[Site]:
        return list(self._sites)

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

    @property
    def tags_padding(self) -> bool:
        """Whether the ``txt`` rows include T5 padding tagged by ``txt.valid`` (``"tag"``, or its
        old name ``"mask"``)."""
        return self.config.get("text_padding") in TAGGED_PADDING

    def n_rows(self, stream: str, valid_only: bool = True) -> int:
        return sum((s.valid_rows if valid_only else s.rows).get(stream, 0) for s in self.shards)

    def completed_units(self) -> set[tuple[int, int]]:
        return {u for s in self.shards for u in s.units}

    def load_shard(self, index: int, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of shard ``index`` (all of them, or only ``keys``), on CPU."""
        path = self.root / self.shards[index].file
        out: dict[str, torch.Tensor] = {}
        try:
            check_regular_file(path, "harvest shard")
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys()) if keys is None else list(keys)
                missing = sorted(set(names) - set(f.keys()))
                if missing:
                    raise HarvestFormatError(
                        f"{path}: no tensor(s) {missing}; the shard is incomplete or of another "
                        "harvest"
                    )
                for name in names:
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError, BadFileError) as e:
            raise HarvestFormatError(
                f"{path}: unreadable shard ({e}); harvest again into a new folder"
            ) from None
        return out

    def stream_rows(
        self, index: int, stream: str, sites: Sequence[Site], valid_only: bool = True
    ) -> dict[str, torch.Tensor]:
        """One shard's rows of ``stream`` for ``sites``, padding rows removed if ``valid_only``.

        Returns:
            ``{"t": [N], "prompt", "seed", "step", "pos": [N],
            "{key}.x": [N, D], "{key}.y": [N, D]}``.
        """
        keys = [f"{stream}.{f}" for f in ROW_FIELDS]
        for site in sites:
            if site.stream != stream:
                raise ValueError(f"{site} is not in stream {stream!r}")
            keys += [f"{site}.x", f"{site}.y"]
        has_valid = self.tags_padding and stream == "txt"
        if has_valid:
            keys.append(f"{stream}.valid")
        raw = self.load_shard(index, keys) if self.shards[index].rows.get(stream, 0) else {}
        if not raw:
            return {}
        self._check_finite(index, stream, raw)
        out = {k[len(stream) + 1 :] if k.startswith(stream + ".") else k: v for k, v in raw.items()}
        if has_valid and valid_only:
            keep = out.pop("valid")
            out = {k: v[keep] for k, v in out.items()}
        return out

    def _check_finite(self, index: int, stream: str, raw: dict[str, torch.Tensor]) -> None:
        """Refuse a shard with NaN/inf rows: count them and name the first (its prompt, seed,
        step and position), so that no dictionary is trained or scored on them."""
        for name, value in raw.items():
            count, first = nonfinite(value)
            if not count:
                continue
            row = (first or (0,))[0]
            rows = int((~torch.isfinite(value)).reshape(value.shape[0], -1).any(-1).sum())
            origin = ", ".join(
                f"{f} {int(raw[f'{stream}.{f}'][row])}"
                for f in ROW_FIELDS[1:]
                if f"{stream}.{f}" in raw
            )
            raise HarvestFormatError(
                f"{self.root / self.shards[index].file}: {name} has {count} NaN/inf value(s) in "
                f"{rows} row(s); the first is row {row} ({origin}). Non-finite activations "
                "would train and score NaN dictionaries. The model overflowed (run it in "
                "bfloat16/float32, not float16) or the shard is corrupt: harvest again"
            )

    def site_rows(
        self, site: Site, valid_only: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """All rows of one site, concatenated: ``(x [N, D], y [N, D], {"t", "prompt", ...: [N]})``.

        With ``valid_only=False`` on a harvest that tags padding, the metadata also holds
        ``"valid"`` ([N] bool, False on T5 padding). Loads everything into memory: meant for small
        harvests, tests and evaluation.
        """
        parts = [
            self.stream_rows(i, site.stream, [site], valid_only) for i in range(len(self.shards))
        ]
        parts = [p for p in parts if p]
        if not parts:
            raise HarvestFormatError(f"{self.root} holds no rows of {site}")
        x = torch.cat([p[f"{site}.x"] for p in parts])
        y = torch.cat([p[f"{site}.y"] for p in parts])
        fields = ROW_FIELDS + (("valid",) if "valid" in parts[0] else ())
        meta = {f: torch.cat([p[f] for p in parts]) for f in fields}
        return x, y, meta
