"""Harvest folders from tensors: synthetic data with a known sparse structure (tests, benchmarks).

:func:`write_harvest` stores given rows in the same format :func:`~difract_ext.capture.harvest`
writes, so the trainer and the evaluation read them unchanged. :func:`synthetic_harvest` draws a
"linear-plus-sparse" MLP that a transcoder can represent exactly::

    x ~ N(0, I)                                   [N, D]
    z = ReLU(x Eᵀ − θ)        E [m, D] unit rows  [N, m]   (θ sets the sparsity)
    y = z G + σ·ε             G [m, D] unit rows  [N, D]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from difract_ext.capture.format import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    ShardInfo,
    shard_name,
    write_journal,
    write_shard,
)
from difract_ext.flux.sites import Site
from difract_ext.util.atomic import atomic_write_json


def write_harvest(
    root: str | Path,
    rows: Mapping[Site, tuple[torch.Tensor, torch.Tensor]],
    t: Mapping[str, torch.Tensor],
    *,
    shard_rows: int = 4096,
    prompt: Mapping[str, torch.Tensor] | None = None,
    model_name: str = "synthetic",
    prompts: Sequence[str] | None = None,
    text_valid: torch.Tensor | None = None,
) -> Path:
    """Write ``{site: (x [N_s, D], y [N_s, D])}`` with per-stream ``t [N_s]`` as a harvest folder.

    Sites of one stream must have the same number of rows. ``prompt`` (per stream ``[N_s]``)
    defaults to row-block indices; seeds, steps and positions are zeros. ``text_valid``
    (``[N_txt]`` bool, False on padding) makes a harvest that tags T5 padding
    (``text_padding="tag"``).
    """
    root = Path(root)
    streams = sorted({s.stream for s in rows})
    d_model = int(next(iter(rows.values()))[0].shape[-1])
    n = {s: int(t[s].shape[0]) for s in streams}
    n_prompts = (
        1 + max((int(prompt[s].max()) for s in streams if len(prompt[s])), default=0)
        if prompt
        else 1
    )
    atomic_write_json(
        root / CONFIG_FILE,
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "sites": [str(s) for s in sorted(rows)],
            "d_model": d_model,
            "prompts": list(prompts or [f"synthetic {i}" for i in range(n_prompts)]),
            "seeds": [0],
            "batch_size": 1,
            "text_padding": "drop" if text_valid is None else "tag",
            "subsample": 1,
            "sample_seed": 0,
            "dtype": str(next(iter(rows.values()))[0].dtype).replace("torch.", ""),
            "call_kwargs": {},
            "model_name": model_name,
        },
    )
    n_shards = max(-(-n[s] // shard_rows) for s in streams)
    journal = []
    for i in range(n_shards):
        tensors: dict[str, torch.Tensor] = {}
        counts, valid_counts, tvals = {}, {}, set()
        for s in streams:
            lo, hi = i * shard_rows, min((i + 1) * shard_rows, n[s])
            hi = max(lo, hi)
            counts[s] = hi - lo
            ts = t[s][lo:hi].float()
            tensors[f"{s}.t"] = ts
            tensors[f"{s}.prompt"] = (prompt[s][lo:hi] if prompt else torch.zeros(hi - lo)).to(
                torch.int32
            )
            tensors[f"{s}.seed"] = torch.zeros(hi - lo, dtype=torch.int64)
            tensors[f"{s}.step"] = torch.zeros(hi - lo, dtype=torch.int32)
            tensors[f"{s}.pos"] = torch.arange(lo, hi, dtype=torch.int32)
            valid_counts[s] = hi - lo
            if s == "txt" and text_valid is not None:
                tensors["txt.valid"] = text_valid[lo:hi].bool()
                valid_counts[s] = int(tensors["txt.valid"].sum())
            tvals.update(float(v) for v in torch.unique(ts))
        for site, (x, y) in rows.items():
            lo, hi = i * shard_rows, min((i + 1) * shard_rows, n[site.stream])
            hi = max(lo, hi)
            tensors[f"{site}.x"] = x[lo:hi]
            tensors[f"{site}.y"] = y[lo:hi]
        name = shard_name(i, i)
        write_shard(root, name, tensors, {"format": FORMAT})
        journal.append(ShardInfo(name, (i,), ((i, 0),), counts, valid_counts, tuple(sorted(tvals))))
    write_journal(root, 0, journal)
    return root


def linear_plus_sparse(
    n_rows: int,
    d_model: int,
    n_latents: int,
    threshold: float = 1.5,
    noise: float = 0.01,
    timesteps: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    seed: int = 0,
    row_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [N, D], y [N, D], t [N])`` from the model in the module docstring.

    ``seed`` draws the MLP (``E``, ``G``); ``row_seed`` (default: ``seed``) draws the rows, so
    two calls with one ``seed`` and different ``row_seed`` give train / held-out rows of one MLP.
    """
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(n_latents, d_model, generator=g)
    E = E / E.norm(dim=-1, keepdim=True)
    G = torch.randn(n_latents, d_model, generator=g)
    G = G / G.norm(dim=-1, keepdim=True)
    if row_seed is not None:
        g = torch.Generator().manual_seed(row_seed)
    x = torch.randn(n_rows, d_model, generator=g)
    z = (x @ E.T - threshold).relu()
    y = z @ G + noise * torch.randn(n_rows, d_model, generator=g)
    tv = torch.tensor(list(timesteps), dtype=torch.float32)
    t = tv[torch.randint(len(tv), (n_rows,), generator=g)]
    return x, y, t


def synthetic_harvest(
    root: str | Path,
    sites: Sequence[Site],
    n_rows: int = 8192,
    d_model: int = 16,
    n_latents: int = 32,
    shard_rows: int = 4096,
    seed: int = 0,
    row_seed: int | None = None,
    **kwargs: float,
) -> Path:
    """A harvest folder with :func:`linear_plus_sparse` rows for each site (one MLP per site).

    Use the same ``seed`` and another ``row_seed`` for held-out data of the same MLPs.
    """
    rows, ts = {}, {}
    for i, site in enumerate(sorted(sites)):
        rs = None if row_seed is None else row_seed + 1000 * i
        x, y, t = linear_plus_sparse(
            n_rows, d_model, n_latents, seed=seed + i, row_seed=rs, **kwargs
        )  # type: ignore[arg-type]
        rows[site] = (x, y)
        ts.setdefault(site.stream, t)  # rows of one stream share metadata: the first site's t
    return write_harvest(
        root, rows, ts, shard_rows=shard_rows, prompts=[f"synthetic seed {seed} rows {row_seed}"]
    )
