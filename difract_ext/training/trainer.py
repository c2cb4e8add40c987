"""Train many conditioned dictionaries in one pass over harvested FLUX activations.

Why our own loop and not SAELens' ``SAETrainer``: the SAELens trainer fits one SAE per trainer
fed by a fixed-size provider; it hard-codes Adam with gradient clipping at 1.0, evaluates only
through wandb, has no data-parallel path, no decoder projection and no dead-feature resampling.
Our data are ``(x, y, t)`` triples with different row counts per stream,
and the recipes need AdamW, a per-step cosine schedule, an L1 warm-up, unit-norm decoder rows after
every step and a dead-feature remedy. A ~300-line loop that does exactly this, runs under
``accelerate`` (DDP), and writes SAELens folders is simpler than adapting ``SAETrainer``; the
result is still a SAELens object (``SAE.load_from_disk`` works). The modules are built, written
and read through a :class:`~difract_ext.training.dictionary_io.DictionaryIO` (``io=SAELENS_IO``
from :mod:`difract_ext.adapters.dictionaries`), so this core module never imports SAELens.

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

import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from difract_ext._version import __version__
from difract_ext.capture.format import HarvestReader
from difract_ext.capture.processes import make_accelerator
from difract_ext.training.data import GroupData, group_rows, plan_groups, steps_per_stream
from difract_ext.training.dictionary_io import DictionaryIO
from difract_ext.training.objective import Objective, resample_dead
from difract_ext.training.quality import OVERACTIVE_RATE, warn_failures
from difract_ext.training.resume import checked_position, run_fingerprint
from difract_ext.training.specs import DictionarySpec, TrainConfig, build_dictionary
from difract_ext.util.atomic import atomic_directory, atomic_write_bytes, atomic_write_json
from difract_ext.util.files import read_json
from difract_ext.util.interrupt import DeferredInterrupt
from difract_ext.util.schedules import warmup_cosine
from difract_ext.util.seeds import derive_seed, text_seed

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint/trainer_state.pt"
CHECKPOINT_VERSION = 2
INDEX_FILE = "index.json"
#: the end-of-training report covers the last min(this, total/4) steps of each dictionary
REPORT_WINDOW_STEPS = 100
DENSE_RATE = (
    0.1  # a feature active on more rows than this is "dense" (as in the evaluation's default)
)


def _spec_seed(spec: DictionarySpec) -> int:
    """A stable integer from the dictionary's name: its initialisation and resampling seeds."""
    return text_seed(spec.resolved_name)


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


class _State:
    """One dictionary being trained: module, DDP-wrapped objective, optimiser, counters."""

    def __init__(
        self, spec: DictionarySpec, module: Any, cfg: TrainConfig, total: int, acc: Accelerator
    ):
        self.spec, self.module, self.total = spec, module, total
        # its own resampling generator: a dictionary trains the same whatever else is trained
        # with it
        self.gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _spec_seed(spec), 7919))
        auxk = cfg.auxk_coefficient if spec.remedy == "auxk" else 0.0
        self.objective = acc.prepare(Objective(module, spec.role, cfg.auxk_k, auxk))
        self.optimizer = torch.optim.AdamW(
            module.parameters(), lr=spec.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(
                warmup_cosine,
                total=total,
                warmup=cfg.lr_warmup_steps,
                end_fraction=cfg.lr_end_fraction,
            ),
        )
        self.since_fired = torch.zeros(module.cfg.d_sae, dtype=torch.long)
        self.fire_counts = torch.zeros(
            module.cfg.d_sae, dtype=torch.long
        )  # since the last resampling check
        self.rows_counted = 0
        self.steps = 0
        self.resampled = 0
        self.history: list[dict[str, float]] = []
        self.window: dict[str, float] = {"nmse": 0.0, "l0": 0.0, "aux": 0.0, "n": 0.0}
        # the last `tail_steps` steps, which the end-of-training report is measured on
        self.tail_steps = max(1, min(REPORT_WINDOW_STEPS, total // 4))
        self.tail: dict[str, float] = {"nmse": 0.0, "l0": 0.0, "n": 0.0}
        self.tail_fires = torch.zeros(module.cfg.d_sae, dtype=torch.long)

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
            "tail": dict(self.tail),
            "tail_fires": self.tail_fires.clone(),
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
        self.tail = dict(d.get("tail", self.tail))
        self.tail_fires = d.get("tail_fires", self.tail_fires).clone()

    def dead_fraction(self, window: int) -> float:
        return float((self.since_fired >= window).float().mean())

    def last_window(self, batch_size: int) -> dict[str, float]:
        """EV, L0, dead / dense / over-active fractions over the last ``tail_steps`` steps."""
        n = self.tail["n"]
        rows = n * batch_size
        rate = self.tail_fires.double() / max(rows, 1.0)
        nmse = self.tail["nmse"] / n if n else float("nan")
        return {
            "steps": n,
            "rows": rows,
            "nmse": nmse,
            "explained_variance": 1.0 - nmse,
            "l0": self.tail["l0"] / n if n else float("nan"),
            "dead_fraction": float((self.tail_fires == 0).double().mean()),
            "dense_fraction": float((rate > DENSE_RATE).double().mean()),
            "overactive_fraction": float((rate > OVERACTIVE_RATE).double().mean()),
        }

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


def _prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def train_dictionaries(
    data: str | Path | HarvestReader,
    specs: Sequence[DictionarySpec],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    io: DictionaryIO,
    resume: bool = False,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    keep_checkpoint: bool = False,
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
        io: builds, writes and reads the modules: ``SAELENS_IO`` from
            :mod:`difract_ext.adapters.dictionaries` for SAELens classes and folders.
        resume: continue from ``out_dir``'s checkpoint (same specs, config and data required);
            on a finished run, load its dictionaries instead of training again.
        progress: show a progress bar (main process only).
        accelerator: an existing ``accelerate.Accelerator`` (one is created otherwise).
        keep_checkpoint: keep ``checkpoint/trainer_state.pt`` (weights + AdamW state, ~3× the
            dictionaries' size) when the run finishes; by default it is removed.

    A first SIGINT (Ctrl-C, single process) stops after the current step with a checkpoint and
    raises ``KeyboardInterrupt``; ``resume=True`` continues from there. At the end, each
    dictionary's last-window metrics (``metrics.json["last_window"]``) are checked and failures
    logged as warnings (:mod:`~difract_ext.training.quality`).

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
    missing = sorted({str(s.site) for s in specs} - {str(s) for s in reader.sites})
    if missing:
        raise ValueError(f"{reader.root} has no activations for sites {missing}")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    groups = plan_groups(len(reader.shards), cfg.epochs, cfg.mix_shards, cfg.seed)
    streams = sorted({s.site.stream for s in specs})
    totals = steps_per_stream(reader, groups, streams, cfg.batch_size, cfg.include_padding)
    for s, n in totals.items():
        if n == 0:
            raise ValueError(
                f"stream {s!r} has fewer rows per shard group than batch_size={cfg.batch_size}; "
                "harvest more, lower batch_size or raise mix_shards"
            )
    per_group = [
        max(group_rows(reader, g, s, cfg.include_padding) // cfg.batch_size for s in streams)
        for g in groups
    ]
    n_global = sum(per_group)
    fingerprint = run_fingerprint(reader, specs, cfg)
    ckpt_path = out / CHECKPOINT
    finished = _finished_run(out, fingerprint, resume, acc.device, io)
    if finished is not None:
        return finished
    trained_t = reader.timesteps
    states = []
    for spec in specs:
        module = build_dictionary(
            spec,
            reader.d_model,
            io=io,
            trained_timesteps=trained_t,
            model_name=reader.model_name,
            seed=derive_seed(cfg.seed, _spec_seed(spec)),
            device=acc.device,
        )
        states.append(_State(spec, module, cfg, totals[spec.site.stream], acc))
    position, global_step = (0, 0), 0
    if ckpt_path.is_file():
        if not resume:
            raise ValueError(
                f"{out} holds a training checkpoint; "
                "pass resume=True (--resume) or use another folder"
            )
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or corrupt file: torch's errors name no file
            raise ValueError(
                f"{ckpt_path} cannot be read ({type(e).__name__}: {e}); delete it to train from "
                "the start, or restore it from a backup"
            ) from None
        if not isinstance(ck, dict):
            raise ValueError(
                f"{ckpt_path} is not a training checkpoint; delete it or use another folder"
            )
        if ck.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{ckpt_path} is a version-{ck.get('version')} checkpoint (this trainer writes "
                f"version {CHECKPOINT_VERSION}, seeded per dictionary); train again in a new folder"
            )
        if ck["fingerprint"] != fingerprint:
            raise ValueError(
                f"{ckpt_path} was written for different specs, config or data; cannot resume"
            )
        position, global_step = checked_position(
            ck, ckpt_path, per_group, [st.spec.resolved_name for st in states]
        )
        for st in states:
            st.load_state_dict(ck["dictionaries"][st.spec.resolved_name])
        logger.info("resumed %s at global step %d", out, global_step)
    elif resume:
        logger.info("no checkpoint in %s: starting from scratch", out)

    def save_checkpoint(gi: int, b: int) -> None:
        if not acc.is_main_process:
            return
        buf = BytesIO()
        torch.save(
            {
                "version": CHECKPOINT_VERSION,
                "fingerprint": fingerprint,
                "group": gi,
                "batch": b,
                "global_step": global_step,
                "dictionaries": {st.spec.resolved_name: st.state_dict() for st in states},
            },
            buf,
        )
        atomic_write_bytes(ckpt_path, buf.getvalue())

    logger.info(
        "training %d dictionaries on %s: %d global steps (%s per stream), %d process(es), "
        "device %s",
        len(states),
        reader.root,
        n_global,
        totals,
        world,
        acc.device,
    )
    bar = tqdm(
        total=n_global,
        initial=global_step,
        unit="step",
        desc="train",
        disable=not (progress and acc.is_main_process),
    )
    last_ckpt = time.monotonic()
    interrupt = DeferredInterrupt(
        enabled=world == 1, what="stopping after this step with a checkpoint"
    )
    interrupt.install()
    try:
        for gi in range(position[0], len(groups)):
            gd = GroupData(
                reader,
                groups[gi],
                [s.site for s in specs],
                cfg.seed,
                cfg.batch_size,
                cfg.include_padding,
            )
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
                due = (
                    cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0
                ) or (time.monotonic() - last_ckpt >= cfg.checkpoint_every_seconds)
                if stop or due or interrupt.requested:
                    save_checkpoint(gi, b + 1)
                    last_ckpt = time.monotonic()
                if interrupt.requested:
                    logger.warning(
                        "interrupted after global step %d (checkpoint written): continue with "
                        "resume=True (--resume)",
                        global_step,
                    )
                    raise KeyboardInterrupt
                if stop and global_step < n_global:
                    acc.wait_for_everyone()
                    logger.info("stopped after %d global steps (checkpoint written)", global_step)
                    return TrainResult(
                        out,
                        False,
                        global_step,
                        modules={st.spec.resolved_name: st.module for st in states},
                    )
    finally:
        interrupt.restore()
        bar.close()
    save_checkpoint(len(groups), 0)
    _log(states, cfg, acc.is_main_process)
    result = TrainResult(
        out, True, global_step, modules={st.spec.resolved_name: st.module for st in states}
    )
    if acc.is_main_process:
        data_info = {
            "root": str(reader.root.resolve()),
            "model_name": reader.model_name,
            "n_prompts": len(reader.prompts),
            "prompts_sha256": _prompts_digest(reader.prompts),
            "rows": {s: reader.n_rows(s, valid_only=not cfg.include_padding) for s in streams},
            "text_padding": reader.config.get("text_padding"),
            "timesteps": trained_t,
        }
        index = []
        for st in states:
            path, metrics = _save(st, out, cfg, data_info, world, io)
            result.dictionaries[st.spec.resolved_name] = path
            result.metrics[st.spec.resolved_name] = metrics
            index.append(
                {
                    **st.spec.to_json(),
                    "d_sae": int(st.module.cfg.d_sae),
                    "final": metrics["final"],
                    "last_window": metrics["last_window"],
                }
            )
        atomic_write_json(
            out / INDEX_FILE,
            {
                "dictionaries": index,
                "data": data_info,
                "global_step": global_step,
                "fingerprint": fingerprint,
            },
        )
        if not keep_checkpoint:  # the index is the run's commit point: the checkpoint is not needed
            ckpt_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                ckpt_path.parent.rmdir()
        warn_failures(result.metrics)
    acc.wait_for_everyone()
    return result


def _finished_run(
    out: Path, fingerprint: str, resume: bool, device: Any, io: DictionaryIO
) -> TrainResult | None:
    """The finished run in ``out`` (its index written, its checkpoint removed), loaded; or None."""
    index_path = out / INDEX_FILE
    if (out / CHECKPOINT).is_file() or not index_path.is_file():
        return None
    if not resume:
        raise ValueError(
            f"{out} already holds a finished training run ({INDEX_FILE}); use another folder, or "
            "pass resume=True (--resume) to load it instead of training again"
        )
    index = read_json(
        index_path, "training index", required=["fingerprint", "global_step", "dictionaries"]
    )
    if index.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{out} holds a finished training run of different specs, config or data; "
            "use another folder"
        )
    from difract_ext.training.store import load_dictionary

    result = TrainResult(out, True, int(index["global_step"]))
    for entry in index["dictionaries"]:
        path = out / entry["name"]
        result.dictionaries[entry["name"]] = path
        result.metrics[entry["name"]] = read_json(path / "metrics.json", "metrics file")
        result.modules[entry["name"]] = load_dictionary(path, device=str(device), io=io).module
    logger.info(
        "%s: finished already; loaded its %d dictionaries without training",
        out,
        len(result.modules),
    )
    return result


def _step(
    st: _State,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    cfg: TrainConfig,
    acc: Accelerator,
) -> None:
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
    if st.steps > st.total - st.tail_steps:
        st.tail["nmse"] += float(out.nmse)
        st.tail["l0"] += float(out.l0)
        st.tail["n"] += 1
        st.tail_fires += counts
    if (
        spec.remedy == "resample"
        and cfg.resample_every
        and st.steps % cfg.resample_every == 0
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
            n = resample_dead(
                st.module, st.optimizer, spec.role, x, y, t, dead_idx.to(x.device), st.gen
            )
            st.since_fired[dead_idx] = 0
            st.resampled += n
            if acc.is_main_process:
                logger.info(
                    "%s: resampled %d dead features at step %d", spec.resolved_name, n, st.steps
                )


def _log(states: Sequence[_State], cfg: TrainConfig, main: bool) -> None:
    """Close the metric window of every dictionary into its history (and log it on the main
    process).
    """
    parts = []
    for st in states:
        if st.window["n"] == 0:
            continue
        summ = st.summary(cfg.dead_window)
        st.history.append(summ)
        st.window = {"nmse": 0.0, "l0": 0.0, "aux": 0.0, "n": 0.0}
        parts.append(
            f"{st.spec.resolved_name}: nmse {summ['nmse']:.4f} L0 {summ['l0']:.1f} "
            f"dead {summ['dead_fraction']:.1%}"
        )
    if parts and main:
        logger.info("step %d | %s", max(st.steps for st in states), " | ".join(parts))


def _save(
    st: _State, out: Path, cfg: TrainConfig, data_info: dict[str, Any], world: int, io: DictionaryIO
) -> tuple[Path, dict[str, Any]]:
    path = out / st.spec.resolved_name
    final = dict(st.history[-1]) if st.history else {}
    final["dead_fraction"] = st.dead_fraction(cfg.dead_window)
    metrics = {
        "steps": st.steps,
        "rows_seen": st.steps * cfg.batch_size,
        "resampled": st.resampled,
        "final": final,
        "last_window": st.last_window(cfg.batch_size),
        "history": st.history,
    }
    # a folder with training.json is one this trainer wrote (a run killed during its final save):
    # replace it; any other existing folder holds someone's files and is refused, not deleted
    owned = None if (path / "training.json").is_file() else ()
    with atomic_directory(path, owned=owned) as tmp:
        io.save(st.module, tmp)
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(
            tmp / "training.json",
            {
                "spec": st.spec.to_json(),
                "config": cfg.to_json(),
                "data": data_info,
                "processes": world,
                "difract_ext_version": __version__,
            },
        )
    return path, metrics
