"""Train the shapes-world FLUX pipeline: VAE first, then the transformer by flow matching.

Stages (each resumable; files under ``run_dir``):

1. ``init/`` — the random pipeline (:func:`~difract_ext.toy.pipeline.build_shapes_pipeline`),
   saved once; its frozen text encoders are the ones shipped.
2. ``images.npz`` — ``n_images`` jittered renders of TRAIN-split prompts (render seeds
   ``RENDER_SEED_BASE + i``, disjoint from evaluation seeds), ``single_fraction`` one-object.
3. ``vae.pt`` — ``AutoencoderKL`` trained on those renders (MSE in [-1, 1] + ``kl_weight`` ×
   per-element KL), then ``scaling_factor = 1 / std`` and ``shift_factor = mean`` of the
   posterior means, so the transformer sees ~unit-variance latents.
4. ``data.pt`` — packed latents ``[N, 64, 16]`` of every render, T5 states ``[P, 16, 64]`` and
   pooled CLIP ``[P, 64]`` of every prompt (computed with ``FluxPipeline.encode_prompt``).
5. ``ckpt.pt`` — transformer + EMA + optimiser at ``step`` (``init_from``: the transformer
   starts from a trained pipeline's, whose VAE replaces stage 3 — a fine-tune onto new text
   encoders). Flow matching exactly as the
   pipeline samples: ``x_t = (1 - t) x0 + t ε``, target ``ε - x0``, the transformer called
   with ``timestep = t`` in [0, 1]; t is one of the 4 schnell values {1, .75, .5, .25} with
   probability ``t_discrete_fraction``, else uniform. Batch contents, t and ε at step k come
   from a generator seeded by ``(seed, k)``, so a resumed run sees the same data.

Checkpoints are written atomically (:mod:`difract_ext.util.atomic`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from tqdm.auto import tqdm

from difract_ext.flux.defaults import write_call_defaults
from difract_ext.flux.loading import load_pipeline
from difract_ext.toy.pipeline import (
    SHAPES_BASE_T5_LOCAL_STRENGTH,
    SHAPES_CALL_DEFAULTS,
    build_shapes_pipeline,
    load_shapes_pipeline,
    shapes_call_defaults,
)
from difract_ext.util.atomic import atomic_write_json, atomic_write_with
from difract_ext.util.config import config_to_dict, write_config
from difract_ext.util.files import read_json
from difract_ext.util.schedules import warmup_cosine
from difract_ext.util.seeds import shapes_step_seed

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "export_pipeline", "train_shapes"]

RENDER_SEED_BASE = 1_000_000
"""Training renders use seeds ``RENDER_SEED_BASE + i``; evaluation uses small seeds."""
SCHNELL_T = (1.0, 0.75, 0.5, 0.25)
EVAL_SEED_BASE = 500_000


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_shapes` (defaults: the shipped run)."""

    seed: int = 0
    t5_local_strength: float = SHAPES_BASE_T5_LOCAL_STRENGTH
    n_images: int = 40_000
    single_fraction: float = 0.4
    held_out_fraction: float = 0.15
    # VAE
    vae_steps: int = 700
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-3
    # transformer
    steps: int = 3_200
    batch: int = 48
    lr: float = 7e-4
    warmup: int = 200
    min_lr_ratio: float = 0.05
    restart_steps: int = 0
    restart_lr: float = 2e-4
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    t_discrete_fraction: float = 0.6
    # bookkeeping
    ckpt_every_s: float = 120.0
    eval_every: int = 400
    eval_prompts: int = 24
    eval_snapshots: bool = False
    log_every: int = 100
    threads: int = 2
    # fine-tuning: start from a trained pipeline folder (its VAE and transformer) instead of
    # training the VAE and a random transformer; the text encoders are still built from
    # ``seed`` and ``t5_local_strength``, so a new text-encoder bias can be fine-tuned onto it
    init_from: str = ""
    stop_at: int = 0  # stop after this step (0: run the whole schedule); the schedule is unchanged


def _atomic_save(obj: object, path: Path) -> None:
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def _step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(shapes_step_seed(seed, step, salt))


class _ThreadGovernor:
    """Switch between 1 and ``max_threads`` intra-op threads from measured step times.

    On a shared 2-core machine two OpenMP threads stall badly when another process takes a
    core (5-10x slower steps were observed), while one thread degrades gracefully. The
    governor runs on one thread and re-tries ``max_threads`` for ``window`` steps every
    ``backoff`` windows; it keeps the multi-thread setting while its median step is faster
    than the last one-thread median, and abandons it at once on a step 2x slower than that.
    Each failed trial doubles ``backoff`` (up to ``max_backoff``). Only speed changes
    (results match up to float reduction order).
    """

    def __init__(self, max_threads: int, window: int = 10, max_backoff: int = 32) -> None:
        self.max_threads, self.window, self.max_backoff = max_threads, window, max_backoff
        self.current = 1
        self.one_thread: float | None = None
        self.backoff, self.windows_on_one = 2, 0
        self.times: list[float] = []
        torch.set_num_threads(1)

    def _set(self, n: int) -> None:
        self.current = n
        self.times.clear()
        torch.set_num_threads(n)

    def record(self, seconds: float) -> None:
        if self.max_threads <= 1:
            return
        self.times.append(seconds)
        if self.current > 1 and self.one_thread is not None and seconds > 2 * self.one_thread:
            self.backoff = min(2 * self.backoff, self.max_backoff)
            self._set(1)
            return
        if len(self.times) < self.window:
            return
        mean = float(np.median(self.times))
        self.times.clear()
        if self.current == 1:
            self.one_thread = mean
            self.windows_on_one += 1
            if self.windows_on_one >= self.backoff:
                self.windows_on_one = 0
                self._set(self.max_threads)
        elif self.one_thread is not None and mean > self.one_thread:
            self.backoff = min(2 * self.backoff, self.max_backoff)
            self._set(1)
        else:
            self.backoff = 2


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Warm-up, cosine to ``min_lr_ratio * lr`` at ``steps``, then one warm restart: a second
    cosine from ``restart_lr`` over ``restart_steps`` (SGDR-style)."""
    if step >= max(cfg.steps, cfg.warmup):
        return warmup_cosine(
            step - cfg.steps, cfg.restart_steps, end_fraction=cfg.min_lr_ratio, peak=cfg.restart_lr
        )
    return warmup_cosine(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio, peak=cfg.lr)


def _prompt_lists(cfg: TrainConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train single, train double, held-out single, held-out double)."""
    from difract_ext.toy.world import split_prompts

    tr1, ho1 = split_prompts(1, cfg.held_out_fraction, seed=0)
    tr2, ho2 = split_prompts(2, cfg.held_out_fraction, seed=0)
    return tr1, tr2, ho1, ho2


def _render_dataset(cfg: TrainConfig, path: Path) -> None:
    """Write ``images.npz``: uint8 ``images [N, 32, 32, 3]``, ``prompt_idx [N]``, ``prompts``."""
    from difract_ext.toy.world import parse_prompt, render

    tr1, tr2, _, _ = _prompt_lists(cfg)
    prompts = tr1 + tr2
    rng = np.random.default_rng(cfg.seed)
    is_single = rng.random(cfg.n_images) < cfg.single_fraction
    idx = np.where(
        is_single,
        rng.integers(0, len(tr1), cfg.n_images),
        len(tr1) + rng.integers(0, len(tr2), cfg.n_images),
    )
    scenes = [parse_prompt(p) for p in prompts]
    images = np.stack([render(scenes[k], 32, seed=RENDER_SEED_BASE + i) for i, k in enumerate(idx)])
    atomic_write_with(
        path,
        lambda tmp: np.savez(
            tmp, images=images, prompt_idx=idx.astype(np.int64), prompts=np.array(prompts)
        ),
        keep_suffix=True,
    )
    logger.info("rendered %d images of %d train prompts -> %s", len(images), len(prompts), path)


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _train_vae(
    cfg: TrainConfig, vae: AutoencoderKL, images: np.ndarray, prompts: list[str], run_dir: Path
) -> None:
    """Train ``vae`` in place (resumable via ``vae_ckpt.pt``), then set scaling/shift factors."""
    ckpt_path = run_dir / "vae_ckpt.pt"
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        logger.info("VAE: resumed at step %d", start)
    last_save = time.time()
    bar = tqdm(
        range(start, cfg.vae_steps), desc="vae", mininterval=30, initial=start, total=cfg.vae_steps
    )
    gov = _ThreadGovernor(cfg.threads)
    for step in bar:
        t_step = time.time()
        g = _step_generator(cfg.seed, step, salt=1)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g).numpy()
        x = _to_pixels(images[idx])
        lr = (
            cfg.vae_lr
            * min(1.0, (step + 1) / 50)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        gov.record(time.time() - t_step)
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            logger.info(
                "vae step %d mse %.5f kl/elem %.3f lr %.2e", step, mse.item(), kl.item(), lr
            )
            bar.set_postfix(mse=f"{mse.item():.4f}")
        if time.time() - last_save > cfg.ckpt_every_s:
            _atomic_save(
                {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt_path
            )
            last_save = time.time()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        pick = np.random.default_rng(cfg.seed).choice(
            len(images), min(2048, len(images)), replace=False
        )
        sub = images[pick]
        z = torch.cat(
            [
                vae.encode(_to_pixels(sub[i : i + 256])).latent_dist.mean
                for i in range(0, len(sub), 256)
            ]
        )
        rec = torch.cat([vae.decode(z[i : i + 256]).sample for i in range(0, len(z), 256)])
        mse = F.mse_loss(rec, _to_pixels(sub)).item()
    from difract_ext.toy.analyzer import accuracy_report

    rec_img = (rec[:256].permute(0, 2, 3, 1).clamp(-1, 1) / 2 + 0.5).numpy()
    rep = accuracy_report(list(rec_img), [prompts[i] for i in pick[:256]])
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    logger.info(
        "VAE done: recon mse %.5f, analyzer fully-correct on reconstructions %.3f, "
        "latent mean %.4f std %.4f",
        mse,
        rep["all/fully_correct"],
        shift,
        1 / scale,
    )
    _atomic_save(
        {"vae": vae.state_dict(), "scaling_factor": scale, "shift_factor": shift, "mse": mse},
        run_dir / "vae.pt",
    )


@torch.no_grad()
def _encode_dataset(pipe: FluxPipeline, images: np.ndarray, prompts: list[str], path: Path) -> None:
    """Write ``data.pt``: packed scaled latents ``[N, 64, 16]`` and per-prompt text states."""
    vae = pipe.vae
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    lat = []
    for i in tqdm(range(0, len(images), 500), desc="encode", mininterval=30):
        z = vae.encode(_to_pixels(images[i : i + 500])).latent_dist.mean
        z = (z - sh) * sf  # [b, 4, 16, 16]
        lat.append(FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3]))
    embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        max_sequence_length=SHAPES_CALL_DEFAULTS["max_sequence_length"],
    )
    _atomic_save(
        {"latents": torch.cat(lat), "prompt_embeds": embeds, "pooled": pooled, "prompts": prompts},
        path,
    )
    logger.info("encoded %d latents, %d prompts -> %s", len(images), len(prompts), path)


@torch.no_grad()
def _evaluate(pipe: FluxPipeline, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    from difract_ext.toy.analyzer import accuracy_report
    from difract_ext.toy.pipeline import generate_images

    images = generate_images(pipe, prompts, seeds)
    return accuracy_report(list(images), prompts)


def _eval_prompts(cfg: TrainConfig) -> tuple[list[str], list[int]]:
    _, _, ho1, ho2 = _prompt_lists(cfg)
    rng = np.random.default_rng(123)
    ps = [ho1[i] for i in rng.choice(len(ho1), min(cfg.eval_prompts, len(ho1)), replace=False)]
    ps += [ho2[i] for i in rng.choice(len(ho2), cfg.eval_prompts, replace=False)]
    return ps, [EVAL_SEED_BASE + i for i in range(len(ps))]


def _train_transformer(
    cfg: TrainConfig, pipe: FluxPipeline, data: dict, prompt_idx: np.ndarray, run_dir: Path
) -> None:
    """Flow-matching training of ``pipe.transformer`` (resumable via ``ckpt.pt``); loads EMA
    weights at the end.
    """
    model: FluxTransformer2DModel = pipe.transformer
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train().requires_grad_(True)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    ckpt_path, start = run_dir / "ckpt.pt", 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        start = state["step"]
        logger.info("transformer: resumed at step %d", start)
    elif cfg.init_from:
        init = FluxTransformer2DModel.from_pretrained(
            str(Path(cfg.init_from) / "transformer"), local_files_only=True
        )
        model.load_state_dict(init.state_dict())
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        logger.info("transformer: initialised from %s", cfg.init_from)
    latents, embeds, pooled = data["latents"], data["prompt_embeds"], data["pooled"]
    pidx = torch.from_numpy(prompt_idx)
    n, seq, ch = latents.shape
    side = int(round(math.sqrt(seq)))
    img_ids = FluxPipeline._prepare_latent_image_ids(cfg.batch, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(embeds.shape[1], 3)
    t_choices = torch.tensor(SCHNELL_T)
    eval_ps, eval_seeds = _eval_prompts(cfg)
    last_save, t0, run_loss, n_loss = time.time(), time.time(), 0.0, 0

    def save(step: int) -> None:
        _atomic_save(
            {
                "model": model.state_dict(),
                "ema": ema,
                "opt": opt.state_dict(),
                "step": step,
                "config": config_to_dict(cfg),
            },
            ckpt_path,
        )

    gov = _ThreadGovernor(cfg.threads)
    total = cfg.steps + cfg.restart_steps
    if cfg.stop_at:
        total = min(total, cfg.stop_at)
    bar = tqdm(range(start, total), desc="flux", mininterval=30, initial=start, total=total)
    for step in bar:
        t_step = time.time()
        g = _step_generator(cfg.seed, step, salt=2)
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        x0 = latents[idx]
        p = pidx[idx]
        noise = torch.randn(x0.shape, generator=g)
        disc = torch.rand(cfg.batch, generator=g) < cfg.t_discrete_fraction
        t = torch.where(
            disc,
            t_choices[torch.randint(0, 4, (cfg.batch,), generator=g)],
            torch.rand(cfg.batch, generator=g).clamp_min(1e-3),
        )
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        pred = model(
            hidden_states=xt,
            encoder_hidden_states=embeds[p],
            pooled_projections=pooled[p],
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d) if v.dtype.is_floating_point else ema[
                    k
                ].copy_(v)
        run_loss += loss.item()
        n_loss += 1
        gov.record(time.time() - t_step)
        if (step + 1) % cfg.log_every == 0:
            el = time.time() - t0
            logger.info(
                "step %d loss %.4f gnorm %.2f lr %.2e | %.2f s/step (%d threads)",
                step + 1,
                run_loss / n_loss,
                float(gn),
                _lr_at(cfg, step),
                el / n_loss,
                gov.current,
            )
            bar.set_postfix(loss=f"{run_loss / n_loss:.4f}")
            run_loss, n_loss, t0 = 0.0, 0, time.time()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
            save(step + 1)
            last_save = time.time()
            live = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(ema)
            model.eval()
            rep = _evaluate(pipe, eval_ps, eval_seeds)
            if cfg.eval_snapshots:  # EMA weights at every evaluation, to pick a step afterwards
                (run_dir / "snapshots").mkdir(exist_ok=True)
                _atomic_save(
                    {"ema": ema, "step": step + 1, "eval": rep, "config": config_to_dict(cfg)},
                    run_dir / "snapshots" / f"ema_{step + 1:06d}.pt",
                )
            model.load_state_dict(live)
            model.train()
            t0, run_loss, n_loss = time.time(), 0.0, 0
            logger.info(
                "eval step %d (EMA, held-out): single fc %.3f | double fc %.3f color %.3f "
                "shape %.3f pos %.3f binding %.3f",
                step + 1,
                rep["single/fully_correct"],
                rep["double/fully_correct"],
                rep["double/color"],
                rep["double/shape"],
                rep["double/position"],
                rep["double/binding_error"],
            )
            t0 = time.time()
        elif time.time() - last_save > cfg.ckpt_every_s:
            save(step + 1)
            last_save = time.time()
    if start < total:
        save(total)
    model.load_state_dict(ema)
    model.eval().requires_grad_(False)


def train_shapes(run_dir: str | Path, cfg: TrainConfig | None = None) -> FluxPipeline:
    """Run (or resume) every stage in ``run_dir``; return the trained pipeline (EMA transformer).

    Stages already finished (their files exist) are skipped, so calling this again resumes.
    """
    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "train_config.json"
    if cfg_path.exists():
        old = read_json(cfg_path, "shapes training config")
        if old != config_to_dict(cfg):
            logger.warning("train config differs from the one in %s; using the new one", cfg_path)
    write_config(cfg_path, cfg)
    init = run / "init"
    if not (init / "model_index.json").exists():
        build_shapes_pipeline(
            seed=cfg.seed, t5_local_strength=cfg.t5_local_strength
        ).save_pretrained(str(init))
        write_call_defaults(init, shapes_call_defaults())
    pipe = load_shapes_pipeline(path=init)
    if not (run / "images.npz").exists():
        _render_dataset(cfg, run / "images.npz")
    arr = np.load(run / "images.npz")
    images, prompt_idx, prompts = arr["images"], arr["prompt_idx"], [str(p) for p in arr["prompts"]]
    if (run / "vae.pt").exists():
        st = torch.load(run / "vae.pt", map_location="cpu", weights_only=True)
        pipe.vae.load_state_dict(st["vae"])
        pipe.vae.register_to_config(
            scaling_factor=st["scaling_factor"], shift_factor=st["shift_factor"]
        )
    elif cfg.init_from:
        vae = AutoencoderKL.from_pretrained(str(Path(cfg.init_from) / "vae"), local_files_only=True)
        pipe.vae.load_state_dict(vae.state_dict())
        sf, sh = vae.config.scaling_factor, vae.config.shift_factor
        pipe.vae.register_to_config(scaling_factor=sf, shift_factor=sh)
        _atomic_save(
            {
                "vae": vae.state_dict(),
                "scaling_factor": sf,
                "shift_factor": sh,
                "mse": float("nan"),
            },
            run / "vae.pt",
        )
        logger.info("VAE: taken from %s", cfg.init_from)
    else:
        _train_vae(cfg, pipe.vae, images, [prompts[k] for k in prompt_idx], run)
    if not (run / "data.pt").exists():
        _encode_dataset(pipe, images, prompts, run / "data.pt")
    data = torch.load(run / "data.pt", map_location="cpu", weights_only=True)
    _train_transformer(cfg, pipe, data, prompt_idx, run)
    return pipe


def export_pipeline(
    run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None
) -> Path:
    """Assemble the trained pipeline from ``run_dir`` (EMA transformer) and ``save_pretrained`` it,
    with its call defaults (``difract_call_defaults.json``, :func:`shapes_call_defaults`).

    ``checkpoint`` picks the EMA weights (default ``run_dir/ckpt.pt``; e.g. an evaluation
    snapshot ``run_dir/snapshots/ema_002400.pt`` written with ``eval_snapshots``).

    Returns:
        ``out_dir`` (safetensors, float32).
    """
    run = Path(run_dir)
    pipe = load_pipeline(run / "init")
    st = torch.load(run / "vae.pt", map_location="cpu", weights_only=True)
    pipe.vae.load_state_dict(st["vae"])
    pipe.vae.register_to_config(
        scaling_factor=st["scaling_factor"], shift_factor=st["shift_factor"]
    )
    ck = torch.load(
        Path(checkpoint) if checkpoint else run / "ckpt.pt", map_location="cpu", weights_only=True
    )
    pipe.transformer.load_state_dict(ck["ema"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_call_defaults(out, shapes_call_defaults())
    config = ck.get("config")
    if config is None and (run / "train_config.json").is_file():
        config = read_json(run / "train_config.json", "shapes training config")
    record = {"step": ck["step"], "checkpoint": str(checkpoint or "ckpt.pt"), "config": config}
    atomic_write_json(out / "training.json", record)
    logger.info("exported step %d pipeline -> %s", ck["step"], out)
    return out
