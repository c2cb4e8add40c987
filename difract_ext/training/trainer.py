"""Train many conditioned dictionaries in one pass over harvested FLUX activations.

Why our own loop and not SAELens' ``SAETrainer``: the SAELens trainer fits one SAE per trainer
fed by a fixed-size provider; it hard-codes Adam with gradient clipping at 1.0, evaluates only
through wandb, has no data-parallel path, no decoder projection and no dead-feature resampling.
Our data are ``(x, y, t)`` triples with different row counts per stream (text rows minus padding),
and the recipes need AdamW, a per-step cosine schedule, an L1 warm-up, unit-norm decoder rows after
every step and a dead-feature remedy. A ~300-line loop that does exactly this, runs under
``accelerate`` (DDP), and writes SAELens folders is simpler than adapting ``SAETrainer``; the
result is still a SAELens object (``SAE.load_from_disk`` works).

One *global step* gives every dictionary whose stream still has rows in the current group one
optimizer step on ``batch_size`` rows. Checkpoints (``<out>/checkpoint/trainer_state.pt``, written
atomically by the main process) hold weights, AdamW and schedule states, dead-feature counters,
the resampling generators and the data position, so a resumed run takes exactly the same steps.
Each dictionary's initialisation and resampling are seeded from its name, and the data order
from the config's seed alone, so a dictionary trained alongside others takes the same steps as
the same spec trained alone: bit-identical where the float kernels are (one thread in the
tests); with several MKL threads, kernel choices that depend on memory alignment can differ in
the last bits, and a long run can drift from there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from sae_lens import SAE
from tqdm.auto import tqdm

from difract_ext import __version__
from difract_ext.util.atomic import atomic_directory, atomic_write_bytes, atomic_write_json
from difract_ext.capture.format import HarvestReader, site_key
from difract_ext.capture.processes import make_accelerator
from difract_ext.training.data import GroupData, derive_seed, group_rows, plan_groups, steps_per_stream
from difract_ext.training.objective import Objective, resample_dead
from difract_ext.training.specs import DictionarySpec, TrainConfig, build_dictionary

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint/trainer_state.pt"
CHECKPOINT_VERSION = 2
INDEX_FILE = "index.json"
_NON_IDENTITY = ("checkpoint_every_steps", "checkpoint_every_seconds", "stop_after_steps", "log_every")


def _spec_seed(spec: DictionarySpec) -> int:
    """A stable integer from the dictionary's name: its initialisation and resampling seeds."""
    return int.from_bytes(hashlib.sha256(spec.resolved_name.encode()).digest()[:7], "little")


@dataclass
class TrainResult:
    """What :func:`train_dictionaries` produced.

    ``finished`` is False when it stopped early (``stop_after_steps``); then only the checkpoint
    was written and ``dictionaries`` is empty. ``modules`` holds the trained dictionaries in
    memory (every process); ``dictionaries`` / ``metrics`` the saved folders (main process).
    """

    out_dir: Path
    finished: bool
    global_step: int
    dictionaries: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, Any] = field(default_factory=dict)


def _lr_lambda(total: int, warmup: int, end_fraction: float) -> Any:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return end_fraction + (1 - end_fraction) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


class _State:
    """One dictionary being trained: module, DDP-wrapped objective, optimiser, counters."""

    def __init__(self, spec: DictionarySpec, module: Any, cfg: TrainConfig, total: int, acc: Accelerator):
        self.spec, self.module, self.total = spec, module, total
        # its own resampling generator: a dictionary trains the same whatever else is trained with it
        self.gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _spec_seed(spec), 7919))
        auxk = cfg.auxk_coefficient if spec.remedy == "auxk" else 0.0
        self.objective = acc.prepare(Objective(module, spec.role, cfg.auxk_k, auxk))
        self.optimizer = torch.optim.AdamW(
            module.parameters(), lr=spec.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(total, cfg.lr_warmup_steps, cfg.lr_end_fraction)
        )
        self.since_fired = torch.zeros(module.cfg.d_sae, dtype=torch.long)
        self.fire_counts = torch.zeros(module.cfg.d_sae, dtype=torch.long)  # since the last resampling check
        self.rows_counted = 0
        self.steps = 0
        self.resampled = 0
        self.history: list[dict[str, float]] = []
        self.window: dict[str, float] = {"nmse": 0.0, "l0": 0.0, "aux": 0.0, "n": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "since_fired": self.since_fired.clone(),
            "fire_counts": self.fire_counts.clone(),
            "rows_counted": self.rows_counted,
            "steps": self.steps,
            "resampled": self.resampled,
            "history": list(self.history),
            "window": dict(self.window),
            "generator": self.gen.get_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.module.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])
        self.since_fired = d["since_fired"].clone()
        self.fire_counts = d.get("fire_counts", torch.zeros_like(self.since_fired)).clone()
        self.rows_counted = int(d.get("rows_counted", 0))
        self.steps, self.resampled = int(d["steps"]), int(d["resampled"])
        self.history, self.window = list(d["history"]), dict(d["window"])
        self.gen.set_state(d["generator"])

    def dead_fraction(self, window: int) -> float:
        return float((self.since_fired >= window).float().mean())

    def summary(self, window: int) -> dict[str, float]:
        n = max(self.window["n"], 1.0)
        return {
            "step": float(self.steps),
            "nmse": self.window["nmse"] / n,
            "l0": self.window["l0"] / n,
            "aux_loss": self.window["aux"] / n,
            "dead_fraction": self.dead_fraction(window),
            "lr": float(self.scheduler.get_last_lr()[0]),
        }


def _fingerprint(reader: HarvestReader, specs: Sequence[DictionarySpec], cfg: TrainConfig) -> str:
    blob = json.dumps({
        "specs": [s.to_json() for s in specs],
        "config": {k: v for k, v in cfg.to_json().items() if k not in _NON_IDENTITY},
        "shards": [s.file for s in reader.shards],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def train_dictionaries(
    data: str | Path | HarvestReader,
    specs: Sequence[DictionarySpec],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train every dictionary of ``specs`` on a harvest folder, in one pass per epoch.

    Under ``accelerate launch`` each process takes an equal slice of every batch and gradients
    are averaged by DDP (``batch_size`` must be divisible by the number of processes).

    Args:
        data: a harvest folder (see :mod:`difract_ext.capture`) or its reader.
        specs: dictionaries to train (distinct ``resolved_name``).
        out_dir: output folder: ``<name>/`` per dictionary (SAELens ``cfg.json`` +
            ``sae_weights.safetensors``, plus ``metrics.json`` and ``training.json``), an
            ``index.json`` and ``checkpoint/``.
        config: :class:`TrainConfig` (defaults if None).
        resume: continue from ``out_dir``'s checkpoint (same specs, config and data required).
        progress: show a progress bar (main process only).
        accelerator: an existing ``accelerate.Accelerator`` (one is created otherwise).

    Raises:
        ValueError: unknown sites, duplicate names, too few rows, or a checkpoint that does not
            match (or exists while ``resume`` is False).
    """
    cfg = config or TrainConfig()
    reader = data if isinstance(data, HarvestReader) else HarvestReader(data)
    acc = accelerator or make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    out = Path(out_dir)
    specs = list(specs)
    names = [s.resolved_name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"dictionary names must be distinct, got {names}")
    missing = sorted({site_key(s.site) for s in specs} - {site_key(s) for s in reader.sites})
    if missing:
        raise ValueError(f"{reader.root} has no activations for sites {missing}")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    groups = plan_groups(len(reader.shards), cfg.epochs, cfg.mix_shards, cfg.seed)
    streams = sorted({s.site.stream for s in specs})
    totals = steps_per_stream(reader, groups, streams, cfg.batch_size)
    for s, n in totals.items():
        if n == 0:
            raise ValueError(
                f"stream {s!r} has fewer rows per shard group than batch_size={cfg.batch_size}; "
                "harvest more, lower batch_size or raise mix_shards"
            )
    n_global = sum(max(group_rows(reader, g, s) // cfg.batch_size for s in streams) for g in groups)
    trained_t = reader.timesteps
    states = []
    for spec in specs:
        module = build_dictionary(
            spec, reader.d_model, trained_timesteps=trained_t, model_name=reader.model_name,
            seed=derive_seed(cfg.seed, _spec_seed(spec)), device=acc.device,
        )
        states.append(_State(spec, module, cfg, totals[spec.site.stream], acc))
    fingerprint = _fingerprint(reader, specs, cfg)
    ckpt_path = out / CHECKPOINT
    position, global_step = (0, 0), 0
    if ckpt_path.is_file():
        if not resume:
            raise ValueError(f"{out} holds a training checkpoint; pass resume=True (--resume) or use another folder")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{ckpt_path} is a version-{ck.get('version')} checkpoint (this trainer writes "
                             f"version {CHECKPOINT_VERSION}, seeded per dictionary); train again in a new folder")
        if ck["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt_path} was written for different specs, config or data; cannot resume")
        for st in states:
            st.load_state_dict(ck["dictionaries"][st.spec.resolved_name])
        position, global_step = (int(ck["group"]), int(ck["batch"])), int(ck["global_step"])
        logger.info("resumed %s at global step %d", out, global_step)
    elif resume:
        logger.info("no checkpoint in %s: starting from scratch", out)

    def save_checkpoint(gi: int, b: int) -> None:
        if not acc.is_main_process:
            return
        buf = io.BytesIO()
        torch.save({
            "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "group": gi, "batch": b,
            "global_step": global_step,
            "dictionaries": {st.spec.resolved_name: st.state_dict() for st in states},
        }, buf)
        atomic_write_bytes(ckpt_path, buf.getvalue())

    logger.info(
        "training %d dictionaries on %s: %d global steps (%s per stream), %d process(es), device %s",
        len(states), reader.root, n_global, totals, world, acc.device,
    )
    bar = tqdm(total=n_global, initial=global_step, unit="step", desc="train",
               disable=not (progress and acc.is_main_process))
    last_ckpt = time.monotonic()
    try:
        for gi in range(position[0], len(groups)):
            gd = GroupData(reader, groups[gi], [s.site for s in specs], cfg.seed, cfg.batch_size)
            nb = max(gd.n_batches.values(), default=0)
            for b in range(position[1] if gi == position[0] else 0, nb):
                for st in states:
                    if b < gd.n_batches.get(st.spec.site.stream, 0):
                        x, y, t = gd.batch(st.spec.site, b, rank, world, acc.device)
                        _step(st, x, y, t, cfg, acc)
                global_step += 1
                bar.update(1)
                if cfg.log_every and global_step % cfg.log_every == 0:
                    _log(states, cfg, acc.is_main_process)
                stop = cfg.stop_after_steps is not None and global_step >= cfg.stop_after_steps
                due = (cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0) or (
                    time.monotonic() - last_ckpt >= cfg.checkpoint_every_seconds
                )
                if stop or due:
                    save_checkpoint(gi, b + 1)
                    last_ckpt = time.monotonic()
                if stop and global_step < n_global:
                    acc.wait_for_everyone()
                    logger.info("stopped after %d global steps (checkpoint written)", global_step)
                    return TrainResult(out, False, global_step,
                                       modules={st.spec.resolved_name: st.module for st in states})
    finally:
        bar.close()
    save_checkpoint(len(groups), 0)
    _log(states, cfg, acc.is_main_process)
    result = TrainResult(out, True, global_step, modules={st.spec.resolved_name: st.module for st in states})
    if acc.is_main_process:
        data_info = {
            "root": str(reader.root.resolve()), "model_name": reader.model_name,
            "n_prompts": len(reader.prompts), "prompts_sha256": _prompts_digest(reader.prompts),
            "rows": {s: reader.n_rows(s) for s in streams}, "timesteps": trained_t,
        }
        index = []
        for st in states:
            path, metrics = _save(st, out, cfg, data_info, world)
            result.dictionaries[st.spec.resolved_name] = path
            result.metrics[st.spec.resolved_name] = metrics
            index.append({**st.spec.to_json(), "d_sae": int(st.module.cfg.d_sae), "final": metrics["final"]})
        atomic_write_json(out / INDEX_FILE, {"dictionaries": index, "data": data_info})
    acc.wait_for_everyone()
    return result


def _step(st: _State, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, cfg: TrainConfig, acc: Accelerator) -> None:
    spec = st.spec
    l1 = 0.0
    if spec.activation == "relu" and spec.l1_coefficient:
        ramp = min(1.0, (st.steps + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0
        l1 = spec.l1_coefficient * ramp
    dead = (st.since_fired >= cfg.dead_window).to(x.device) if spec.remedy == "auxk" else None
    out = st.objective(x, y, t, l1, dead)
    acc.backward(out.loss)
    st.optimizer.step()
    st.scheduler.step()
    st.optimizer.zero_grad(set_to_none=True)
    st.module.normalize_decoder_()
    counts = out.fire_counts
    if acc.num_processes > 1:
        counts = acc.reduce(counts, reduction="sum")
    counts = counts.cpu()
    fired = counts > 0
    st.since_fired += 1
    st.since_fired[fired] = 0
    st.fire_counts += counts
    st.rows_counted += cfg.batch_size
    st.steps += 1
    for k, v in (("nmse", out.nmse), ("l0", out.l0), ("aux", out.aux)):
        st.window[k] += float(v)
    st.window["n"] += 1
    if (
        spec.remedy == "resample" and cfg.resample_every and st.steps % cfg.resample_every == 0
        and st.steps <= cfg.resample_until * st.total
    ):
        dead = st.since_fired >= cfg.dead_window
        if cfg.resample_min_rate and st.rows_counted:
            dead |= st.fire_counts < cfg.resample_min_rate * st.rows_counted
        st.fire_counts.zero_()
        st.rows_counted = 0
        dead_idx = torch.nonzero(dead).flatten()
        if len(dead_idx):
            if acc.num_processes > 1:
                x, y, t = acc.gather(x), acc.gather(y), acc.gather(t)
            n = resample_dead(st.module, st.optimizer, spec.role, x, y, t, dead_idx.to(x.device), st.gen)
            st.since_fired[dead_idx] = 0
            st.resampled += n
            if acc.is_main_process:
                logger.info("%s: resampled %d dead features at step %d", spec.resolved_name, n, st.steps)


def _log(states: Sequence[_State], cfg: TrainConfig, main: bool) -> None:
    """Close the metric window of every dictionary into its history (and log it on the main process)."""
    parts = []
    for st in states:
        if st.window["n"] == 0:
            continue
        summ = st.summary(cfg.dead_window)
        st.history.append(summ)
        st.window = {"nmse": 0.0, "l0": 0.0, "aux": 0.0, "n": 0.0}
        parts.append(f"{st.spec.resolved_name}: nmse {summ['nmse']:.4f} L0 {summ['l0']:.1f} "
                     f"dead {summ['dead_fraction']:.1%}")
    if parts and main:
        logger.info("step %d | %s", max(st.steps for st in states), " | ".join(parts))


def _save(st: _State, out: Path, cfg: TrainConfig, data_info: dict[str, Any], world: int) -> tuple[Path, dict[str, Any]]:
    path = out / st.spec.resolved_name
    final = dict(st.history[-1]) if st.history else {}
    final["dead_fraction"] = st.dead_fraction(cfg.dead_window)
    metrics = {"steps": st.steps, "rows_seen": st.steps * cfg.batch_size, "resampled": st.resampled,
               "final": final, "history": st.history}
    with atomic_directory(path) as tmp:
        SAE.save_model(st.module, tmp)
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "training.json", {
            "spec": st.spec.to_json(), "config": cfg.to_json(), "data": data_info,
            "processes": world, "difract_ext_version": __version__,
        })
    return path, metrics
