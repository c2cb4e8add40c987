"""Scan a prompt set through a FLUX pipeline and write feature dashboards for every dictionary.

For every work unit ``(prompt, seed)`` (example ``e = prompt_index · n_seeds + seed_index``) the
pipeline generates one image; at each denoising step the capture hooks of
:mod:`difract_ext.capture.harvest` record every site's MLP input and output, and each dictionary
encodes what it reads (a transcoder the MLP input, an SAE the MLP output; see
:mod:`difract_ext.flux.roles`) at the step's ``t``. The activations update streaming statistics
(:class:`~difract_ext.dashboards.stats.SiteStats`: exact top-k examples per step with their
activation at every position of the site's stream, histogram, profile over t, token sums and,
with a concept source, concept counts for labels).

Work units are cut into fixed *chunks* of ``batch_size`` units (one pipeline call each). With
several processes (``torchrun`` / ``accelerate launch``) rank ``r`` takes every ``world``-th chunk
not yet done; each rank checkpoints its state atomically to ``DASH/.scan/rank{r}.safetensors``
every ``checkpoint_chunks`` chunks (the chunks done are stored in the same file), so an
interruption loses at most that much work and ``resume=True`` continues. Rank 0 merges all states
and writes the folder (:mod:`difract_ext.dashboards.store`).

Memory: activations are encoded for groups of whole examples with at most ``block_elems``
activations (``rows × F``; at least one example: ``P × F × 4`` bytes, e.g. 0.8 GB for FLUX at
1024² with 49,152 features) and the statistics are updated ``feature_block`` features at a time.
The state itself holds ``F·S·k·P`` float16 maps, as the output does. The capture hooks keep one
chunk's MLP inputs and outputs in host memory (``2 · batch_size · S · P · D · 4`` bytes per site,
e.g. 400 MiB per site for FLUX at 1024² with ``batch_size=1``): scan fewer sites per run, or
smaller chunks, when that is too much (the scan logs the bound).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from difract_ext.capture.harvest import HarvestConfig, StepCapture
from difract_ext.capture.processes import process_state
from difract_ext.dashboards.stats import SiteStats
from difract_ext.dashboards.store import write_index, write_labels, write_site
from difract_ext.flux.roles import dictionary_role
from difract_ext.flux.sites import Site, as_site_dict
from difract_ext.util.atomic import atomic_write_json, atomic_write_with
from difract_ext.util.config import check_range
from difract_ext.util.files import BadFileError, read_json
from difract_ext.util.interrupt import DeferredInterrupt

logger = logging.getLogger(__name__)

__all__ = ["ConceptSource", "ScanConfig", "ScanError", "scan_dashboards"]

STATE_DIR = ".scan"
_CONFIG = "config.json"


class ScanError(ValueError):
    """A scan folder that cannot be resumed with these settings, or bad scan input."""


class ConceptSource(Protocol):
    """Ground-truth concepts per position (for labels): ``names(stream)`` [C] and
    ``masks(prompt, seed, stream, layout)`` -> (present [P, C] bool, scored [P] bool)."""

    def names(self, stream: str) -> list[str]: ...

    def masks(
        self, prompt: str, seed: int, stream: str, layout: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class ScanConfig:
    """How to scan.

    Attributes:
        seeds: generation seeds (every prompt once per seed).
        top_k: examples kept per feature and step.
        batch_size: work units per pipeline call (a chunk).
        checkpoint_chunks: save the state after this many chunks.
        block_elems: at most this many activations (rows × features) encoded at once.
        feature_block: features updated at once.
        call_kwargs: pipeline call keywords (``height``, ``width``, ``num_inference_steps``, ...).
        model_name: recorded in the index. scan: the scan's name (graphs find dashboards by it).
    """

    seeds: Sequence[int] = (0,)
    top_k: int = 10
    batch_size: int = 16
    checkpoint_chunks: int = 1
    block_elems: int = 1 << 24
    feature_block: int = 4096
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    model_name: str = "unknown"
    scan: str = "scan"

    def __post_init__(self) -> None:
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("ScanConfig.seeds is empty")
        for name in ("top_k", "batch_size", "checkpoint_chunks", "block_elems", "feature_block"):
            check_range(f"ScanConfig.{name}", getattr(self, name), integer=True, low=1)
        for key in ("prompt", "generator", "output_type", "num_images_per_prompt"):
            if key in self.call_kwargs:
                raise ValueError(f"call_kwargs may not set {key!r}: the scan controls it")
        if not self.scan or "/" in self.scan or self.scan.startswith("."):
            raise ValueError(f"scan name must be a plain folder name, got {self.scan!r}")


def _tokenize(pipe: Any, prompts: list[str], max_len: int) -> dict[str, Any]:
    """Each prompt's T tokens, their character spans, and a vocabulary of the non-padding
    tokens (``ids[i][p]`` indexes it, -1 for padding)."""
    tok = pipe.tokenizer_2
    enc = tok(
        prompts,
        padding="max_length",
        max_length=max_len,
        truncation=True,
        return_offsets_mapping=bool(getattr(tok, "is_fast", False)),
    )
    tokens = [tok.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
    mask = enc["attention_mask"]
    vocab = sorted({w for toks, m in zip(tokens, mask) for w, keep in zip(toks, m) if keep})
    where = {w: i for i, w in enumerate(vocab)}
    ids = [[where[w] if keep else -1 for w, keep in zip(toks, m)] for toks, m in zip(tokens, mask)]
    offsets = enc.get("offset_mapping") or [[(0, 0)] * max_len for _ in prompts]
    return {
        "tokens": tokens,
        "ids": ids,
        "vocab": vocab,
        "offsets": [list(map(list, o)) for o in offsets],
    }


def _identity(cfg: ScanConfig, prompts: list[str], dicts: Mapping[Site, Any]) -> dict[str, Any]:
    return {
        "prompts": prompts,
        "seeds": list(cfg.seeds),
        "top_k": cfg.top_k,
        "batch_size": cfg.batch_size,
        "call_kwargs": {
            k: v for k, v in cfg.call_kwargs.items() if isinstance(v, (int, float, str, bool))
        },
        "sites": {
            str(s): [dictionary_role(d) or "unknown", int(d.cfg.d_sae)] for s, d in dicts.items()
        },
    }


def _save_state(
    path: Path, stats: Mapping[Site, SiteStats], done: list[int], timesteps: list[float]
) -> None:
    data = {f"{s}/{n}": v.contiguous() for s, st in stats.items() for n, v in st.state().items()}
    data["done_chunks"] = torch.tensor(sorted(done), dtype=torch.int64)
    data["timesteps"] = torch.tensor(timesteps, dtype=torch.float64)
    atomic_write_with(path, lambda tmp: save_file(data, str(tmp)))


def _load_state(
    path: Path, sites: Sequence[Site]
) -> tuple[dict[Site, SiteStats], list[int], list[float]]:
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        done = f.get_tensor("done_chunks").tolist()
        timesteps = [float(v) for v in f.get_tensor("timesteps").tolist()]
        stats = {}
        for s in sites:
            tensors = {k.split("/", 1)[1]: f.get_tensor(k) for k in keys if k.startswith(f"{s}/")}
            stats[s] = SiteStats.from_tensors(tensors)
    return stats, [int(c) for c in done], timesteps


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    rgb = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    atomic_write_with(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


@torch.no_grad()
def scan_dashboards(
    pipe: Any,
    dictionaries: Mapping[Any, Any],
    prompts: Sequence[str],
    out_dir: str | Path,
    config: ScanConfig,
    *,
    concepts: ConceptSource | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_chunks: int | None = None,
) -> Path:
    """Scan ``prompts × config.seeds`` and write the dashboards of every dictionary to
    ``out_dir`` (see :mod:`difract_ext.dashboards.store`).

    Args:
        pipe: a diffusers ``FluxPipeline`` (``transformer``, ``tokenizer_2``, ``vae_scale_factor``).
        dictionaries: ``{Site: dictionary}`` (modules with ``encode(x, t=)`` and ``cfg.d_sae``).
        prompts: the prompts; their order fixes the example indices.
        out_dir: the dashboard folder (created).
        config: :class:`ScanConfig`.
        concepts: ground-truth concepts for labels (e.g.
            :class:`~difract_ext.dashboards.labels.ShapesConcepts`); writes ``{site}.labels.json``.
        resume: continue an interrupted scan of the same settings.
        progress: tqdm bar on the main process.
        stop_after_chunks: stop (checkpointed, as after Ctrl-C) after this many chunks; for tests.

    Returns:
        ``out_dir``.

    Raises:
        ScanError: ``out_dir`` holds a scan and ``resume`` is False, or its settings differ.
        KeyboardInterrupt: after Ctrl-C, once the state is saved (the log says how to resume).
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ScanError("no prompts to scan")
    dicts = as_site_dict(dictionaries)
    if not dicts:
        raise ScanError("no dictionaries to scan")
    tcfg = pipe.transformer.config
    for site in dicts:
        site.check_in(int(tcfg.num_layers))
    root = Path(out_dir)
    state_dir = root / STATE_DIR
    pstate = process_state()
    rank, world = pstate.process_index, pstate.num_processes
    identity = _identity(config, prompts, dicts)
    cfg_path = state_dir / _CONFIG
    existed = cfg_path.is_file() or (root / "index.json").is_file()
    pstate.wait_for_everyone()
    if existed:
        if not resume:
            raise ScanError(
                f"{root} already holds a scan; pass resume=True (--resume) to continue it, "
                "or choose another --out"
            )
        try:
            old = read_json(cfg_path, "scan config") if cfg_path.is_file() else None
        except BadFileError as e:
            raise ScanError(str(e)) from None
        if old is not None and old != identity:
            diff = [k for k in identity if old.get(k) != identity[k]]
            raise ScanError(
                f"{root} was scanned with a different {', '.join(diff)}; "
                "use another output folder or the original settings"
            )
        if old is None:
            logger.info("%s is already complete", root)
            return root
    if pstate.is_main_process and not existed:
        atomic_write_json(cfg_path, identity)
    pstate.wait_for_everyone()

    kw = dict(config.call_kwargs)
    steps = int(kw.get("num_inference_steps", 4))
    height, width = int(kw.get("height", 32)), int(kw.get("width", 32))
    patch = int(getattr(pipe, "vae_scale_factor", 8)) * 2
    grid = (height // patch, width // patch)
    max_len = int(kw.get("max_sequence_length", 512))
    toks = _tokenize(pipe, prompts, max_len)
    token_ids = torch.tensor(toks["ids"], dtype=torch.int64)
    n_pos = {"img": grid[0] * grid[1], "txt": max_len}
    vocab = len(toks["vocab"])
    names = {s: (concepts.names(s) if concepts is not None else []) for s in ("img", "txt")}
    layout = {"grid": grid, "height": height, "width": width}

    def fresh() -> dict[Site, SiteStats]:
        return {
            s: SiteStats(
                int(d.cfg.d_sae), steps, config.top_k, n_pos[s.stream], vocab, len(names[s.stream])
            )
            for s, d in dicts.items()
        }

    done: set[int] = set()
    timesteps: list[float] = []
    for path in sorted(state_dir.glob("rank*.safetensors")):
        _, chunks, ts = _load_state(path, list(dicts))
        done |= set(chunks)
        timesteps = timesteps or ts
    own = state_dir / f"rank{rank}.safetensors"
    stats, my_done, _ = _load_state(own, list(dicts)) if own.is_file() else (fresh(), [], [])
    units = [(p, s) for p in range(len(prompts)) for s in config.seeds]
    n_chunks = math.ceil(len(units) / config.batch_size)
    mine = [c for c in range(n_chunks) if c not in done][rank::world]
    d_model = int(tcfg.num_attention_heads * tcfg.attention_head_dim)
    capture_bytes = sum(
        2 * config.batch_size * steps * n_pos[s.stream] * d_model * 4 for s in dicts
    )
    logger.info("capture buffer per chunk: %.1f MiB", capture_bytes / 2**20)
    logger.info(
        "rank %d/%d: %d of %d chunks to scan (%d done)", rank, world, len(mine), n_chunks, len(done)
    )
    hcfg = HarvestConfig(
        sites=list(dicts), seeds=config.seeds, text_padding="keep", dtype="float32", call_kwargs=kw
    )
    capture = StepCapture(pipe.transformer, hcfg, torch.float32)
    bar = tqdm(
        total=len(mine),
        unit="chunk",
        desc=f"dashboards[{rank}]",
        disable=not (progress and pstate.is_main_process),
    )
    since = 0
    seeds_index = {s: j for j, s in enumerate(config.seeds)}
    try:
        with capture, DeferredInterrupt(what="saving the scan after the current chunk") as stop:
            for i, c in enumerate(mine):
                chunk = units[c * config.batch_size : (c + 1) * config.batch_size]
                chunk_prompts = [prompts[p] for p, _ in chunk]
                capture.begin_chunk(chunk, torch.ones(len(chunk), max_len, dtype=torch.bool))
                gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
                out = pipe(prompt=chunk_prompts, generator=gens, output_type="np", **kw)
                for (p, s), img in zip(chunk, np.asarray(out.images)):
                    _save_png(root / "images" / f"p{p:05d}_s{s}.png", img)
                rows = capture.chunk_rows()
                ex = torch.tensor([p * len(config.seeds) + seeds_index[s] for p, s in chunk])
                ids = token_ids[[p for p, _ in chunk]]
                cmasks = _concept_masks(concepts, prompts, chunk, layout, n_pos, names, toks)
                for site, dic in dicts.items():
                    t_rows = rows[site.stream][f"{site.stream}.t"]
                    key = f"{site}.x" if dictionary_role(dic) != "sae" else f"{site}.y"
                    x = rows[site.stream][key].reshape(steps, len(chunk), n_pos[site.stream], -1)
                    t = t_rows.reshape(steps, len(chunk), -1)[:, 0, 0]
                    if not timesteps:
                        timesteps = [float(v) for v in t]
                    _add_site(
                        stats[site],
                        dic,
                        x,
                        t,
                        ex,
                        ids,
                        site.stream,
                        cmasks.get(site.stream),
                        config,
                    )
                my_done.append(c)
                since += 1
                bar.update(1)
                if since >= config.checkpoint_chunks:
                    _save_state(own, stats, my_done, timesteps)
                    since = 0
                if stop.requested or (stop_after_chunks is not None and i + 1 >= stop_after_chunks):
                    raise KeyboardInterrupt
            _save_state(own, stats, my_done, timesteps)
    except KeyboardInterrupt:
        _save_state(own, stats, my_done, timesteps)
        logger.warning(
            "scan interrupted; state saved in %s. Resume with the same command and --resume "
            "(Python: resume=True)",
            state_dir,
        )
        raise
    finally:
        bar.close()
    pstate.wait_for_everyone()
    if pstate.is_main_process:
        _finalize(
            root,
            pipe,
            dicts,
            prompts,
            config,
            toks,
            grid,
            steps,
            timesteps,
            names,
            layout,
            n_pos,
            concepts,
        )
    pstate.wait_for_everyone()
    return root


def _concept_masks(
    concepts: ConceptSource | None,
    prompts: list[str],
    chunk: list[tuple[int, int]],
    layout: Mapping[str, Any],
    n_pos: Mapping[str, int],
    names: Mapping[str, list[str]],
    toks: Mapping[str, Any],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if concepts is None:
        return {}
    out = {}
    for stream in ("img", "txt"):
        pres, scored = [], []
        for p, s in chunk:
            where = {**layout, "offsets": toks["offsets"][p], "tokens": toks["tokens"][p]}
            m, v = concepts.masks(prompts[p], s, stream, where)
            if m.shape != (n_pos[stream], len(names[stream])):
                raise ScanError(
                    f"concept masks of {stream} have shape {m.shape}, "
                    f"expected {(n_pos[stream], len(names[stream]))}"
                )
            pres.append(torch.from_numpy(np.array(m, dtype=bool)))
            scored.append(torch.from_numpy(np.array(v, dtype=bool)))
        out[stream] = (torch.stack(pres), torch.stack(scored))
    return out


def _add_site(
    stats: SiteStats,
    dic: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    ex: torch.Tensor,
    ids: torch.Tensor,
    stream: str,
    cmask: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: ScanConfig,
) -> None:
    """Encode ``x`` [S, B, P, D] (per step at ``t`` [S]) and add it to ``stats``."""
    steps, b, p, _ = x.shape
    f = int(dic.cfg.d_sae)
    group = max(1, cfg.block_elems // max(p * f, 1))
    param = next(iter(dic.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    for s in range(steps):
        pres, scored = cmask if cmask is not None else (None, None)
        stats.add_counts(s, ids, stream, p, pres, scored)
        for b0 in range(0, b, group):
            sl = slice(b0, b0 + group)
            xb = x[s, sl].to(dev, dtype)
            tb = torch.full(xb.shape[:-1], float(t[s]), device=dev, dtype=dtype)
            acts = dic.encode(xb, t=tb).float().cpu()  # [nb, P, F]
            for f0 in range(0, f, cfg.feature_block):
                stats.add_block(
                    s,
                    f0,
                    acts[..., f0 : f0 + cfg.feature_block],
                    ex[sl],
                    ids[sl],
                    stream,
                    None if pres is None else pres[sl],
                    None if scored is None else scored[sl],
                )


def _finalize(
    root: Path,
    pipe: Any,
    dicts: Mapping[Site, Any],
    prompts: list[str],
    cfg: ScanConfig,
    toks: Mapping[str, Any],
    grid: tuple[int, int],
    steps: int,
    timesteps: list[float],
    names: Mapping[str, list[str]],
    layout: Mapping[str, Any],
    n_pos: Mapping[str, int],
    concepts: ConceptSource | None,
) -> None:
    from difract_ext.dashboards.labels import f1_table, labels_from_counts

    state_dir = root / STATE_DIR
    merged: dict[Site, SiteStats] | None = None
    for path in sorted(state_dir.glob("rank*.safetensors")):
        part, _, ts = _load_state(path, list(dicts))
        timesteps = timesteps or ts
        if merged is None:
            merged = part
        else:
            for s in dicts:
                merged[s].merge(part[s])
    assert merged is not None
    n_ex = len(prompts) * len(cfg.seeds)
    entries, tables = {}, {}
    for site, st in merged.items():
        write_site(root, site, st.site_tensors())
        if concepts is not None:
            write_labels(root, site, labels_from_counts(st, names[site.stream]))
            tables[str(site)] = f1_table(st, names[site.stream])
        entries[str(site)] = {
            "file": f"{site}.safetensors",
            "kind": dictionary_role(dicts[site]) or "unknown",
            "d_sae": int(dicts[site].cfg.d_sae),
            "stream": site.stream,
            "layer": site.layer,
            "positions_per_step": n_ex * n_pos[site.stream],
            "concepts": names[site.stream],
        }
    examples = [
        {"prompt": p, "seed": s, "image": f"images/p{p:05d}_s{s}.png"}
        for p in range(len(prompts))
        for s in cfg.seeds
    ]
    write_index(
        root,
        {
            "scan": cfg.scan,
            "model": cfg.model_name,
            "prompts": prompts,
            "seeds": list(cfg.seeds),
            "num_inference_steps": steps,
            "timesteps": timesteps,
            "height": layout["height"],
            "width": layout["width"],
            "grid": list(grid),
            "n_txt": n_pos["txt"],
            "top_k": cfg.top_k,
            "sites": entries,
            "images": "images/",
            "examples": examples,
            "prompt_tokens": toks["tokens"],
            "prompt_token_ids": toks["ids"],
            "prompt_token_offsets": toks["offsets"],
            "vocab": toks["vocab"],
        },
    )
    if concepts is not None:
        atomic_write_json(root / "concepts.json", tables)
    for path in state_dir.glob("*"):
        path.unlink()
    state_dir.rmdir()
