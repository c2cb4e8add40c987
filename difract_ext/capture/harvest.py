"""Harvest FLUX MLP activations ``(x, y, t)`` to resumable safetensors shards.

For every work unit ``(prompt, seed)`` the pipeline generates one image (``output_type="latent"``);
at each denoising step, forward hooks on the chosen MLPs (see :class:`~difract_ext.flux.sites.Site`)
record the MLP input ``x`` and the output before the gate ``y``, and a forward pre-hook on the
transformer records its ``timestep`` keyword ``t`` (one value per batch row). Rows are kept per
token position, optionally subsampled. T5 padding positions are part of the model (FLUX attends to
every T5 position, and DifFRACT trains on all of them): by default they are kept and tagged
(``txt.valid`` False), so that training uses them and evaluation can report them apart.

Work units are grouped into fixed *chunks* of ``batch_size`` units (one pipeline call each). With
several processes (``accelerate launch``), the chunks not yet done are dealt out by rank. See
:mod:`difract_ext.capture.format` for the files and the commit protocol that makes ``resume``
exact: a resumed harvest recomputes the same chunks with the same batching, hence the same rows.

Memory: the host buffer holds at most ``shard_rows`` plus one chunk's rows per stream; per site
that is ``2 * D * bytes(dtype)`` per row (e.g. FLUX ``D = 3072`` in bfloat16: 12 KiB per row and
site). :func:`harvest` logs the bound. Captured tensors leave the accelerator right after each
MLP call, so device memory is the pipeline's own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difract_ext.capture.format import (
    CONFIG_FILE,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    SHARD_DIR,
    SUMMARY_FILE,
    HarvestFormatError,
    ShardInfo,
    read_all_shards,
    read_journal,
)
from difract_ext.capture.processes import process_state
from difract_ext.capture.shard_buffer import ShardBuffer
from difract_ext.flux.sites import STREAMS, Site, as_site
from difract_ext.util.atomic import atomic_write_json
from difract_ext.util.config import check_range, config_to_dict
from difract_ext.util.digest import module_digest
from difract_ext.util.files import BadFileError, read_json
from difract_ext.util.seeds import HARVEST_BASIS, derive_seed

logger = logging.getLogger(__name__)

#: ``text_padding`` choices: ``"tag"`` (default) keeps padding rows with ``txt.valid = False``,
#: ``"drop"`` leaves them out, ``"keep"`` keeps them untagged.
TEXT_PADDING = ("tag", "drop", "keep")
#: older names still accepted (and read back from harvest configs): ``"mask"`` is ``"tag"``.
TEXT_PADDING_ALIASES = {"mask": "tag"}


def normalize_text_padding(value: str) -> str:
    """The canonical ``text_padding`` choice (``"mask"`` -> ``"tag"``).

    Raises:
        ValueError: not one of :data:`TEXT_PADDING` or an alias.
    """
    value = TEXT_PADDING_ALIASES.get(value, value)
    if value not in TEXT_PADDING:
        raise ValueError(
            f"text_padding must be one of {TEXT_PADDING} (or 'mask', the old name of 'tag'), "
            f"got {value!r}"
        )
    return value


# Fields whose change makes an existing harvest folder incompatible with a resumed run.
_IDENTITY_FIELDS = (
    "sites",
    "prompts",
    "seeds",
    "batch_size",
    "text_padding",
    "subsample",
    "text_subsample",
    "sample_seed",
    "dtype",
    "call_kwargs",
    "d_model",
    "model_digest",
    "model_dtype",
)


@dataclass
class HarvestConfig:
    """What to harvest and how.

    Attributes:
        sites: MLPs to record (``Site(layer, "img" | "txt")``).
        seeds: generation seeds; every prompt is generated once per seed.
        batch_size: work units per pipeline call (a *chunk*).
        shard_rows: a shard is written once a stream's buffer reaches this many rows.
        commit_seconds: also commit the finished chunks at least this often (as a partial shard,
            merged into the full one later), so that an interruption loses at most this much
            work; 0 commits after every chunk. An interrupt (Ctrl-C) or an error commits them too.
        text_padding: T5 padding rows of the ``txt`` stream: ``"tag"`` keeps them with
            ``txt.valid = False`` (default: training uses them, evaluation splits real tokens
            from padding), ``"drop"`` leaves them out, ``"keep"`` keeps them untagged.
            ``"mask"`` is accepted as the old name of ``"tag"``.
        subsample: keep ``ceil(n / subsample)`` random token positions out of the ``n``
            candidates per (unit, step, stream) (TIDE uses 16); 1 keeps every position. The
            choice is seeded by ``(sample_seed, prompt, seed, step, stream)``.
        text_subsample: the same for the ``txt`` stream (None: ``subsample``); text rows are
            few and often worth keeping all.
        sample_seed: seed of the position subsampling.
        dtype: storage dtype of ``x`` and ``y`` (``"bfloat16"``, ``"float16"``, ``"float32"``).
        call_kwargs: keywords for the pipeline call (``height``, ``width``,
            ``num_inference_steps``, ``guidance_scale``, ``max_sequence_length``, ...).
        model_name: recorded in the config and later in the dictionaries' metadata.
    """

    sites: Sequence[Site]
    seeds: Sequence[int] = (0,)
    batch_size: int = 8
    shard_rows: int = 1 << 16
    commit_seconds: float = 60.0
    text_padding: str = "tag"
    subsample: int = 1
    text_subsample: int | None = None
    sample_seed: int = 0
    dtype: str = "bfloat16"
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    model_name: str = "unknown"

    def __post_init__(self) -> None:
        self.sites = sorted({as_site(s) for s in self.sites})
        if not self.sites:
            raise ValueError("HarvestConfig.sites is empty")
        self.text_padding = normalize_text_padding(self.text_padding)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.text_subsample is None:
            self.text_subsample = self.subsample
        if min(self.batch_size, self.shard_rows, self.subsample, self.text_subsample) < 1:
            raise ValueError("batch_size, shard_rows, subsample and text_subsample must be >= 1")
        if not self.commit_seconds >= 0:
            raise ValueError(f"commit_seconds must be >= 0, got {self.commit_seconds}")
        if not self.seeds:
            raise ValueError("HarvestConfig.seeds is empty")
        self.seeds = [int(s) for s in self.seeds]
        if (
            self.call_kwargs.get("negative_prompt") is not None
            or float(self.call_kwargs.get("true_cfg_scale", 1.0)) > 1.0
        ):
            raise ValueError(
                "true CFG runs the transformer twice per step (conditional and unconditional); "
                "harvesting would mix both branches. "
                "Harvest without negative_prompt/true_cfg_scale."
            )
        for key in ("prompt", "generator", "output_type", "num_images_per_prompt"):
            if key in self.call_kwargs:
                raise ValueError(f"call_kwargs may not set {key!r}: harvest() controls it")
        for key in ("num_inference_steps", "height", "width", "max_sequence_length"):
            check_range(
                f"call_kwargs[{key!r}]",
                self.call_kwargs.get(key),
                integer=True,
                low=1,
                optional=True,
            )
        check_range(
            "call_kwargs['guidance_scale']",
            self.call_kwargs.get("guidance_scale"),
            low=0,
            optional=True,
        )

    @property
    def streams(self) -> list[str]:
        return [s for s in STREAMS if any(site.stream == s for site in self.sites)]


@dataclass
class HarvestResult:
    """Summary of a harvest folder after :func:`harvest` returns (all processes' shards)."""

    root: Path
    shards: int
    rows: dict[str, int]
    units_done: int
    units_total: int
    timesteps: list[float]

    @property
    def complete(self) -> bool:
        return self.units_done == self.units_total


class StepCapture:
    """Hooks that copy selected rows of every site's MLP input/output to host memory, per step."""

    def __init__(self, transformer: torch.nn.Module, cfg: HarvestConfig, storage: torch.dtype):
        self.transformer = transformer
        self.cfg = cfg
        self.storage = storage
        self.handles: list[Any] = []
        self.units: list[tuple[int, int]] = []
        self.text_valid: torch.Tensor | None = None  # [B, S_txt] bool
        self.step = 0
        self.sel: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: dict[str, dict[str, list[torch.Tensor]]] = {}

    def begin_chunk(self, units: list[tuple[int, int]], text_valid: torch.Tensor) -> None:
        self.units, self.text_valid, self.step = units, text_valid, 0
        self.rows = {s: {} for s in self.cfg.streams}

    def __enter__(self) -> StepCapture:
        self.handles.append(
            self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        )
        for site in self.cfg.sites:
            module = self.transformer.get_submodule(site.module_path)
            self.handles.append(module.register_forward_hook(self._site_hook(site)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _select(
        self, stream: str, n_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Rows to keep at this step: (batch idx [N], position idx [N], metadata [N] each)."""
        b_all, p_all, valid_all = [], [], []
        for b, (prompt, seed) in enumerate(self.units):
            pos = torch.arange(n_pos)
            if stream == "txt":
                assert self.text_valid is not None
                valid = self.text_valid[b, :n_pos]
            else:
                valid = torch.ones(n_pos, dtype=torch.bool)
            if stream == "txt" and self.cfg.text_padding == "drop":
                pos = pos[valid]
            every = self.cfg.text_subsample if stream == "txt" else self.cfg.subsample
            assert every is not None
            if every > 1 and len(pos):
                n_keep = math.ceil(len(pos) / every)
                gen = torch.Generator().manual_seed(
                    derive_seed(
                        self.cfg.sample_seed,
                        prompt,
                        seed,
                        self.step,
                        STREAMS.index(stream),
                        basis=HARVEST_BASIS,
                    )
                )
                pos = pos[torch.randperm(len(pos), generator=gen)[:n_keep].sort().values]
            b_all.append(torch.full_like(pos, b))
            p_all.append(pos)
            valid_all.append(valid[pos])
        b_idx, p_idx = torch.cat(b_all), torch.cat(p_all)
        units = torch.tensor(self.units, dtype=torch.int64).reshape(-1, 2)
        meta = {
            "prompt": units[b_idx, 0].to(torch.int32),
            "seed": units[b_idx, 1],
            "step": torch.full_like(b_idx, self.step, dtype=torch.int32),
            "pos": p_idx.to(torch.int32),
        }
        if stream == "txt" and self.cfg.text_padding == "tag":
            meta["valid"] = torch.cat(valid_all)
        return b_idx, p_idx, meta

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        if hidden is None or text is None or t is None:
            raise RuntimeError(
                "the transformer was called without hidden_states/encoder_hidden_states/timestep"
            )
        if hidden.shape[0] != len(self.units):
            raise RuntimeError(
                f"transformer batch {hidden.shape[0]} != {len(self.units)} work units "
                "(num_images_per_prompt or true CFG would break the row bookkeeping)"
            )
        t_rows = t.detach().float().reshape(-1).expand(len(self.units)).cpu()
        self.sel = {}
        for stream in self.cfg.streams:
            n_pos = (hidden if stream == "img" else text).shape[1]
            b_idx, p_idx, meta = self._select(stream, n_pos)
            meta["t"] = t_rows[b_idx]
            dev = hidden.device
            self.sel[stream] = (b_idx.to(dev), p_idx.to(dev))
            for k, v in meta.items():
                self.rows[stream].setdefault(f"{stream}.{k}", []).append(v)
        self.step += 1

    def _site_hook(self, site: Site) -> Any:
        key = str(site)

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            b_idx, p_idx = self.sel[site.stream]
            store = self.rows[site.stream]
            for name, value in ((f"{key}.x", args[0]), (f"{key}.y", output)):
                store.setdefault(name, []).append(
                    value.detach()[b_idx, p_idx].to(device="cpu", dtype=self.storage)
                )

        return hook

    def chunk_rows(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{stream: {"{stream}.t": [N], "{key}.x": [N, D], ...}}`` for the finished chunk.

        Rows are in (step, unit, position) order.
        """
        return {s: {k: torch.cat(v) for k, v in d.items()} for s, d in self.rows.items()}


def _text_valid(pipe: Any, prompts: list[str], max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool: T5 positions that hold a real token (the pipeline's own
    tokenisation).
    """
    enc = pipe.tokenizer_2(
        prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    )
    return enc.attention_mask.bool()


def _model_identity(pipe: Any) -> dict[str, str]:
    """What the rows depend on besides the config: the transformer's and text encoders' weights
    (sampled digest, :func:`~difract_ext.util.digest.module_digest`) and the compute dtype."""
    parts = [
        f"{name}:{module_digest(module)}"
        for name in ("transformer", "text_encoder", "text_encoder_2")
        if isinstance(module := getattr(pipe, name, None), torch.nn.Module)
    ]
    return {
        "model_digest": hashlib.sha256("|".join(parts).encode()).hexdigest(),
        "model_dtype": str(pipe.transformer.dtype).removeprefix("torch."),
    }


def _config_json(
    cfg: HarvestConfig, prompts: list[str], d_model: int, identity: dict[str, str]
) -> dict[str, Any]:
    d = config_to_dict(cfg)
    d.pop("shard_rows")  # how rows are cut into files: not part of the harvest's identity
    d.pop("commit_seconds")
    d.update(format=FORMAT, version=FORMAT_VERSION, prompts=list(prompts), d_model=d_model)
    d.update(identity)
    return d


def _check_compatible(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    if "text_padding" in old:  # a harvest written with the old name "mask"
        old = {
            **old,
            "text_padding": TEXT_PADDING_ALIASES.get(old["text_padding"], old["text_padding"]),
        }
    unrecorded = [k for k in ("model_digest", "model_dtype") if k not in old]
    if unrecorded:  # written before the model was recorded: cannot be checked
        logger.warning(
            "%s does not record the model it was harvested from (%s); resuming without that check",
            root,
            ", ".join(unrecorded),
        )
    diff = [k for k in _IDENTITY_FIELDS if k not in unrecorded and old.get(k) != new.get(k)]
    if diff:
        raise HarvestFormatError(
            f"{root} was harvested with a different {', '.join(diff)}; resuming would mix "
            "incompatible rows. Use another output folder, or the original settings."
        )


def _clean_orphans(root: Path, shards: list[ShardInfo]) -> None:
    referenced = {root / s.file for s in shards}
    for path in (root / SHARD_DIR).glob("*"):
        if path not in referenced:
            logger.info("removing %s (not committed by any journal: an interrupted write)", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@torch.no_grad()
def harvest(
    pipe: Any,
    prompts: Sequence[str],
    out_dir: str | Path,
    config: HarvestConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> HarvestResult:
    """Run ``pipe`` over ``prompts × config.seeds`` and write MLP activations to ``out_dir``.

    Works in one process or under ``accelerate launch`` (each rank takes every ``world``-th
    pending chunk; the pipeline must already be on that rank's device).

    Args:
        pipe: a diffusers ``FluxPipeline`` (or compatible: ``transformer``, ``tokenizer_2``).
        prompts: the prompts; their order fixes the prompt indices stored in the rows.
        out_dir: harvest folder (created). If it already holds a harvest, ``resume`` must be set.
        config: what to capture (:class:`HarvestConfig`).
        resume: continue an interrupted harvest with the same config, skipping committed chunks.
        progress: show a progress bar (main process only).

    Returns:
        a :class:`HarvestResult` over every process's shards.

    Raises:
        HarvestFormatError: ``out_dir`` holds a harvest and ``resume`` is False, or its config
            differs.
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts to harvest")
    root = Path(out_dir)
    state = process_state()
    rank, world = state.process_index, state.num_processes
    tcfg = pipe.transformer.config
    d_model = int(tcfg.num_attention_heads * tcfg.attention_head_dim)
    for site in config.sites:
        site.check_in(int(tcfg.num_layers))
    new_cfg = _config_json(config, prompts, d_model, _model_identity(pipe))
    cfg_path = root / CONFIG_FILE
    existed = cfg_path.is_file()
    state.wait_for_everyone()
    if existed:
        if not resume:
            raise HarvestFormatError(
                f"{root} already holds a harvest; pass resume=True (--resume) to continue it"
            )
        try:
            old_cfg = read_json(cfg_path, "harvest config")
        except BadFileError as e:
            raise HarvestFormatError(str(e)) from None
        _check_compatible(old_cfg, new_cfg, root)
    committed = read_all_shards(root) if existed else []
    if state.is_main_process:
        if not existed:
            atomic_write_json(cfg_path, new_cfg)
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        _clean_orphans(root, committed)
    state.wait_for_everyone()  # nobody writes before every rank has read the journals

    units = [(p, s) for p in range(len(prompts)) for s in config.seeds]
    n_chunks = math.ceil(len(units) / config.batch_size)
    done = {c for s in committed for c in s.chunks}
    mine = [c for c in range(n_chunks) if c not in done][rank::world]
    journal = read_journal(root, rank)
    storage = DTYPES[config.dtype]
    n_sites = {s: sum(site.stream == s for site in config.sites) for s in config.streams}
    bytes_per_row = {s: n * 2 * d_model * storage.itemsize for s, n in n_sites.items()}
    logger.info(
        "rank %d/%d: %d of %d chunks to do (%d already committed); host buffer bound ~%.1f MiB "
        "(shard_rows=%d + one chunk, per stream: %s bytes/row)",
        rank,
        world,
        len(mine),
        n_chunks,
        len(done),
        sum(b * config.shard_rows for b in bytes_per_row.values()) / 2**20,
        config.shard_rows,
        bytes_per_row,
    )
    max_len = int(config.call_kwargs.get("max_sequence_length", 512))
    buf = ShardBuffer(root, rank, config.streams, config.batch_size, journal, units)
    capture = StepCapture(pipe.transformer, config, storage)
    bar = tqdm(
        total=len(mine),
        unit="chunk",
        desc=f"harvest[{rank}]",
        disable=not (progress and state.is_main_process),
    )
    last_commit = time.monotonic()
    try:
        with capture:
            if (
                buf.rows() >= config.shard_rows
            ):  # partial shards read back under a smaller shard_rows
                buf.commit()
            for c in mine:
                chunk = units[c * config.batch_size : (c + 1) * config.batch_size]
                chunk_prompts = [prompts[p] for p, _ in chunk]
                capture.begin_chunk(chunk, _text_valid(pipe, chunk_prompts, max_len))
                gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
                pipe(
                    prompt=chunk_prompts, generator=gens, output_type="latent", **config.call_kwargs
                )
                buf.add(c, capture.chunk_rows())
                bar.update(1)
                if buf.rows() >= config.shard_rows:
                    buf.commit()
                    last_commit = time.monotonic()
                elif time.monotonic() - last_commit >= config.commit_seconds:
                    buf.commit(partial=True)
                    last_commit = time.monotonic()
            buf.commit()
    except (KeyboardInterrupt, Exception):
        try:  # keep every finished chunk; the one in flight is redone on --resume
            buf.commit(partial=True)
        except Exception:
            logger.exception("could not commit the finished chunks after the interruption")
        raise
    finally:
        bar.close()
    state.wait_for_everyone()
    return _summarise(root, n_units=len(units), write=state.is_main_process)


def _summarise(root: Path, n_units: int, write: bool) -> HarvestResult:
    shards = read_all_shards(root)
    rows: dict[str, int] = {}
    for s in shards:
        for k, v in s.valid_rows.items():
            rows[k] = rows.get(k, 0) + v
    result = HarvestResult(
        root=root,
        shards=len(shards),
        rows=rows,
        units_done=sum(len(s.units) for s in shards),
        units_total=n_units,
        timesteps=sorted({t for s in shards for t in s.timesteps}),
    )
    if write:
        atomic_write_json(
            root / SUMMARY_FILE,
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "complete": result.complete,
                "units_done": result.units_done,
                "units_total": n_units,
                "valid_rows": rows,
                "timesteps": result.timesteps,
                "shards": [s.to_json() for s in shards],
            },
        )
    logger.info(
        "harvest %s: %d shards, rows %s, %d/%d units",
        root,
        result.shards,
        rows,
        result.units_done,
        n_units,
    )
    return result


__all__ = [
    "TEXT_PADDING",
    "HarvestConfig",
    "HarvestResult",
    "StepCapture",
    "harvest",
    "normalize_text_padding",
]
