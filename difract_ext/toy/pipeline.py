"""The shapes-world FLUX model: its configuration, a random build, and the shipped weights.

The shipped model is a real ``diffusers.FluxPipeline`` at toy size (see :func:`shapes_config`):
a ``FluxTransformer2DModel`` with 4 double-stream and 2 single-stream blocks (4 heads × 32,
~3.0 M parameters), a 2-level ``AutoencoderKL`` (32×32 RGB ↔ 4×16×16 latents, so 8×8 = 64
packed image tokens of 16 channels), a frozen random ``CLIPTextModel`` (pooled 64-d) and
``T5EncoderModel`` (64-d states, 16 tokens) with locally built word-level tokenizers, and a
schnell-style flow-matching Euler scheduler. It is meant to run at :func:`shapes_call_defaults`
(32×32 px, 16 T5 tokens, 4 steps, no guidance; the transformer then receives ``timestep`` = 1.0,
0.75, 0.5, 0.25). Its folder records them in ``difract_call_defaults.json``, so
``FluxModel.trace``, ``capture_step_input`` and the CLI use them when the caller does not
override; a plain ``pipe(...)`` call needs them passed (:data:`SHAPES_CALL_DEFAULTS`, or
``**resolve(pipe)`` from :mod:`difract_ext.flux.defaults`).

Example::

    from difract_ext.toy import load_shapes_pipeline, SHAPES_CALL_DEFAULTS
    pipe = load_shapes_pipeline()
    out = pipe(["a red circle on the left"], output_type="np", **SHAPES_CALL_DEFAULTS)
    out.images  # float [1, 32, 32, 3] in [0, 1]
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline

from difract_ext.flux.defaults import CallDefaults, read_call_defaults, resolve, set_call_defaults
from difract_ext.flux.loading import load_pipeline
from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "SHAPES_CALL_DEFAULTS",
    "SHAPES_MAX_SEQUENCE_LENGTH",
    "build_shapes_pipeline",
    "generate_images",
    "load_shapes_pipeline",
    "shapes_call_defaults",
    "shapes_config",
    "shapes_pipeline_path",
    "shapes_vocabulary",
]

SHAPES_MAX_SEQUENCE_LENGTH = 16
"""T5 tokens per prompt: the longest prompt has 13 words + ``</s>``."""

SHAPES_IMAGE_SIZE = 32
"""Side in pixels of every training image (``toy.world.render``'s default)."""


def shapes_call_defaults() -> CallDefaults:
    """What the shapes model was trained at and runs at: 32×32 px, 16 T5 tokens, 4 Euler steps,
    no guidance. ``export_pipeline`` writes it into the folder (``difract_call_defaults.json``)."""
    size = SHAPES_IMAGE_SIZE
    return CallDefaults(
        height=size,
        width=size,
        num_inference_steps=4,
        guidance_scale=0.0,
        max_sequence_length=SHAPES_MAX_SEQUENCE_LENGTH,
        trained_heights=(size,),
        trained_widths=(size,),
        trained_max_sequence_lengths=(SHAPES_MAX_SEQUENCE_LENGTH,),
    )


SHAPES_CALL_DEFAULTS: dict = shapes_call_defaults().call_kwargs()
"""Keyword arguments to pass to the shapes pipeline's ``__call__`` (schnell-style sampling);
the same values its folder records (``difract_call_defaults.json``)."""


def shapes_vocabulary() -> tuple[str, ...]:
    """Every word of the shapes-world prompt grammar, sorted."""
    from difract_ext.toy.world import all_prompts

    words = {w for n in (1, 2) for p in all_prompts(n) for w in p.split()}
    return tuple(sorted(words))


SHAPES_T5_LOCAL_STRENGTH = 1.0
"""T5 local-attention bias of the shipped model (see
:func:`~difract_ext.flux.tiny.set_t5_local_attention`).

Weak on purpose: at 1.0 a head puts ~15 % of its attention on its neighbour among 16 tokens (vs
~99.5 % at 8.0), so the text states carry word order only faintly and the model binds shapes to
positions most of the time but not always (see ``BENCHMARKS.md``)."""

SHAPES_BASE_T5_LOCAL_STRENGTH = 8.0
"""Bias of the first training stage (a model that binds perfectly), fine-tuned to the shipped
one."""


def shapes_config(t5_local_strength: float = SHAPES_T5_LOCAL_STRENGTH) -> TinyFluxConfig:
    """Sizes of the shapes model (VAE scaling/shift are placeholders until trained).

    Args:
        t5_local_strength: logit bias of the frozen T5's local attention heads; it sets how
            much word order (and so colour-to-shape binding) the text states carry.
    """
    return TinyFluxConfig(
        words=shapes_vocabulary(),
        max_sequence_length=SHAPES_MAX_SEQUENCE_LENGTH,
        clip_max_length=SHAPES_MAX_SEQUENCE_LENGTH,
        num_layers=4,
        num_single_layers=2,
        num_attention_heads=4,
        attention_head_dim=32,
        axes_dims_rope=(8, 12, 12),
        t5_dim=64,
        t5_layers=2,
        t5_heads=4,
        t5_ff=128,
        t5_local_offsets=(-1, 1, -3, 3),
        t5_local_strength=t5_local_strength,
        clip_dim=64,
        clip_layers=2,
        clip_heads=4,
        clip_ff=128,
        vae_block_out_channels=(32, 64),
        vae_layers_per_block=1,
        vae_latent_channels=4,
        vae_norm_num_groups=32,
        vae_mid_attention=False,
    )


def build_shapes_pipeline(
    seed: int = 0, t5_local_strength: float = SHAPES_T5_LOCAL_STRENGTH
) -> FluxPipeline:
    """The shapes model with random weights (the starting point of training), carrying
    :func:`shapes_call_defaults` (``save_pretrained`` does not store them: see
    :func:`~difract_ext.flux.defaults.write_call_defaults`)."""
    pipe = build_tiny_flux_pipeline(shapes_config(t5_local_strength), seed=seed)
    set_call_defaults(pipe, shapes_call_defaults())
    return pipe


def shapes_pipeline_path() -> Path:
    """Folder of the shipped, trained pipeline (a ``FluxPipeline.save_pretrained`` folder)."""
    return Path(__file__).resolve().parent / "weights" / "shapes-flux"


def load_shapes_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path | None = None,
) -> FluxPipeline:
    """Load the shipped shapes pipeline offline.

    Args:
        device: where to put every component.
        dtype: parameter dtype (weights are stored in float32).
        path: another ``save_pretrained`` folder (default: :func:`shapes_pipeline_path`).

    Returns:
        a ``FluxPipeline`` with the progress bar disabled and its call defaults attached (the
        folder's own, else :func:`shapes_call_defaults`); a plain call still needs
        ``**SHAPES_CALL_DEFAULTS``.

    Raises:
        FileNotFoundError: if the folder has no ``model_index.json``.
    """
    folder = Path(path) if path is not None else shapes_pipeline_path()
    defaults = read_call_defaults(folder) if folder.is_dir() else None
    defaults = defaults or shapes_call_defaults()
    return load_pipeline(folder, device=device, dtype=dtype, defaults=defaults)


@torch.no_grad()
def generate_images(
    pipe: FluxPipeline, prompts: list[str], seeds: list[int], batch_size: int = 64, **call_kwargs
) -> np.ndarray:
    """Generate one image per (prompt, seed) with the pipeline's own sampling loop.

    Each image uses its own ``torch.Generator().manual_seed(seed)`` so results do not depend on
    batching. Keyword arguments override the pipeline's call defaults (:data:`SHAPES_CALL_DEFAULTS`
    for the shapes model).

    Returns:
        float32 ``[N, H, W, 3]`` in [0, 1].
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    kw = resolve(pipe, **call_kwargs)
    device = pipe.transformer.device
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i : i + batch_size], seeds[i : i + batch_size]
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in ss]
        res = pipe(prompt=list(ps), generator=gens, output_type="np", **kw)
        out.append(np.asarray(res.images, dtype=np.float32))
    if not out:
        return np.zeros((0, kw.get("height", 0), kw.get("width", 0), 3), np.float32)
    return np.concatenate(out, axis=0)


def shapes_dictionaries_path() -> Path:
    """Folder of the shipped dictionaries: ``{transcoders,saes}/<site>/`` SAELens folders."""
    return Path(__file__).resolve().parent / "dictionaries"
