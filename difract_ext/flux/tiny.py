"""Build tiny random FLUX pipelines offline (real diffusers/transformers classes, toy sizes).

:func:`build_tiny_flux_pipeline` assembles a ``diffusers.FluxPipeline`` from a
:class:`TinyFluxConfig`: ``FluxTransformer2DModel`` (double- and single-stream blocks, joint
attention, AdaLN, RoPE), ``AutoencoderKL``, ``CLIPTextModel``, ``T5EncoderModel``, locally built
tokenizers (:mod:`difract_ext.flux.tokenizers`) and a schnell-style
``FlowMatchEulerDiscreteScheduler`` (shift 1, no dynamic shifting, so 4 steps give the
transformer ``timestep`` = 1.0, 0.75, 0.5, 0.25). Nothing is downloaded.

Shapes for a call with ``height = width = H`` and ``max_sequence_length = S``:
latents ``[B, C_lat, H / f, H / f]`` with ``f = 2 ** (len(vae_block_out_channels) - 1)``, packed
to ``[B, (H / 2f) ** 2, 4 * C_lat]`` image tokens; text states ``[B, S, t5_dim]``; pooled CLIP
``[B, clip_dim]``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from difract_ext.flux.tokenizers import build_clip_tokenizer, build_t5_tokenizer
from difract_ext.util.config import config_from_dict, config_to_dict

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_WORDS",
    "TinyFluxConfig",
    "build_tiny_flux_pipeline",
    "schnell_scheduler",
    "set_t5_local_attention",
]

DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "of", "cat", "dog", "and", "on", "at", "in", "left", "right", "top",
    "bottom", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square",
    "triangle", "small", "big",
)  # fmt: skip


@dataclass
class TinyFluxConfig:
    """Sizes of every component of a tiny FLUX pipeline (defaults: fast, ~0.2 M parameters).

    ``axes_dims_rope`` must sum to ``attention_head_dim``; the transformer's ``in_channels`` is
    ``4 * vae_latent_channels`` (FLUX packs 2×2 latent patches).
    """

    words: tuple[str, ...] = DEFAULT_WORDS
    max_sequence_length: int = 16
    clip_max_length: int = 16
    # transformer
    num_layers: int = 2
    num_single_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = False
    # text encoders
    t5_dim: int = 32
    t5_layers: int = 2
    t5_heads: int = 2
    t5_ff: int = 64
    t5_local_offsets: tuple[int, ...] | None = None
    t5_local_strength: float = 8.0
    clip_dim: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    clip_ff: int = 64
    # VAE
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    vae_layers_per_block: int = 1
    vae_latent_channels: int = 4
    vae_norm_num_groups: int = 4
    vae_mid_attention: bool = False
    vae_scaling_factor: float = 1.0
    vae_shift_factor: float = 0.0
    # scheduler
    shift: float = 1.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "TinyFluxConfig") -> TinyFluxConfig:
        """Inverse of :meth:`to_dict` (types checked; ``source`` names the file in errors)."""
        return config_from_dict(cls, d, source)


def schnell_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler scheduler configured like FLUX.1-schnell (static shift, no dynamic
    shifting).
    """
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False
    )


def _t5_bucket(offset: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5's bidirectional relative-position bucket of ``memory_pos - query_pos = offset``."""
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.tensor([offset])
    return int(T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance)[0])


@torch.no_grad()
def set_t5_local_attention(
    t5: T5EncoderModel, offsets: tuple[int, ...], strength: float = 8.0
) -> None:
    """Give each T5 head a fixed local attention pattern (head h looks at offset ``offsets[h]``).

    T5 has no absolute positions; its only order signal is the relative-position bias shared by
    all layers, and at random init (std ``d_model ** -0.5``) it is too weak for a frozen encoder
    to carry word order. Setting ``bias[bucket(offset_h), h] = strength`` (others 0) makes head
    h attend mostly to the token at ``offset_h``, so every token state mixes in its neighbours
    and two layers see ±2 offsets (e.g. which colour and shape precede a position word).

    Args:
        t5: the encoder (modified in place).
        offsets: one relative offset per head (``len == config.num_heads``).
        strength: bias added to the attention logits at that offset.
    """
    attn = t5.encoder.block[0].layer[0].SelfAttention
    n_heads = t5.config.num_heads
    if len(offsets) != n_heads:
        raise ValueError(f"need one offset per head ({n_heads}), got {offsets}")
    bias = attn.relative_attention_bias.weight  # [num_buckets, n_heads]
    bias.zero_()
    for h, off in enumerate(offsets):
        bias[
            _t5_bucket(
                off,
                t5.config.relative_attention_num_buckets,
                t5.config.relative_attention_max_distance,
            ),
            h,
        ] = strength


def build_tiny_flux_pipeline(
    config: TinyFluxConfig | None = None, seed: int = 0, tokenizer_dir: str | Path | None = None
) -> FluxPipeline:
    """Build a random-weight ``FluxPipeline`` at toy size, fully offline and deterministic.

    Args:
        config: component sizes (default: :class:`TinyFluxConfig`, builds in well under 2 s).
        seed: torch seed for all weight initialisations.
        tokenizer_dir: where to write tokenizer files (default: a temporary folder; the loaded
            tokenizers keep no reference to it).

    Returns:
        a ``FluxPipeline`` in float32 on CPU, in eval mode. Call it with
        ``height=width=32, max_sequence_length=config.max_sequence_length``.
    """
    cfg = config or TinyFluxConfig()
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
        raise ValueError(
            f"axes_dims_rope {cfg.axes_dims_rope} must sum to "
            f"attention_head_dim {cfg.attention_head_dim}"
        )
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            clip_tok = build_clip_tokenizer(cfg.words, Path(tmp) / "clip", cfg.clip_max_length)
            t5_tok = build_t5_tokenizer(cfg.words, Path(tmp) / "t5", cfg.max_sequence_length)
    else:
        clip_tok = build_clip_tokenizer(
            cfg.words, Path(tokenizer_dir) / "clip", cfg.clip_max_length
        )
        t5_tok = build_t5_tokenizer(cfg.words, Path(tokenizer_dir) / "t5", cfg.max_sequence_length)

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=cfg.clip_dim,
                intermediate_size=cfg.clip_ff,
                num_hidden_layers=cfg.clip_layers,
                num_attention_heads=cfg.clip_heads,
                max_position_embeddings=cfg.clip_max_length,
                projection_dim=cfg.clip_dim,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=cfg.t5_dim,
                d_kv=cfg.t5_dim // cfg.t5_heads,
                d_ff=cfg.t5_ff,
                num_layers=cfg.t5_layers,
                num_heads=cfg.t5_heads,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
                decoder_start_token_id=t5_tok.pad_token_id,
                is_encoder_decoder=False,
                use_cache=False,
            )
        )
        if cfg.t5_local_offsets is not None:
            set_t5_local_attention(t5, cfg.t5_local_offsets, cfg.t5_local_strength)
        n_blocks = len(cfg.vae_block_out_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n_blocks,
            up_block_types=("UpDecoderBlock2D",) * n_blocks,
            block_out_channels=cfg.vae_block_out_channels,
            layers_per_block=cfg.vae_layers_per_block,
            latent_channels=cfg.vae_latent_channels,
            norm_num_groups=cfg.vae_norm_num_groups,
            sample_size=32,
            scaling_factor=cfg.vae_scaling_factor,
            shift_factor=cfg.vae_shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=cfg.vae_mid_attention,
        )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * cfg.vae_latent_channels,
            num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.t5_dim,
            pooled_projection_dim=cfg.clip_dim,
            guidance_embeds=cfg.guidance_embeds,
            axes_dims_rope=tuple(cfg.axes_dims_rope),
        )
    finally:
        torch.random.set_rng_state(gen_state)
    pipe = FluxPipeline(
        scheduler=schnell_scheduler(cfg.shift),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    for m in (vae, clip, t5, transformer):
        m.eval()
        m.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
