"""Where pipelines and prompt lists come from, by name (shared by the CLI and scripts).

Pipeline specs: ``"tiny"`` / ``"tiny:SEED"`` (a random toy FLUX pipeline, for smoke tests),
``"shapes"`` (the shipped shapes-world model; ``"shapes:FOLDER"`` for another save of it, with the
same call defaults) or a diffusers ``FluxPipeline`` folder / Hub id
(loaded with ``local_files_only`` when ``HF_HUB_OFFLINE=1``).

Prompt specs: ``"shapes:train"`` / ``"shapes:held_out"`` (the shapes world's disjoint split, one-
and two-object prompts) or a text file with one prompt per line (blank lines and ``#`` lines
skipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difract_ext.capture.format import DTYPES, parse_site_key
from difract_ext.flux.sites import STREAMS, Site


@dataclass
class LoadedPipeline:
    """A pipeline with the call keywords that suit it and the name recorded in metadata."""

    pipe: Any
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    model_name: str = "unknown"


def load_pipeline(spec: str, device: str | torch.device = "cpu", dtype: str = "float32") -> LoadedPipeline:
    """Resolve a pipeline spec (see module docstring) to a pipeline on ``device``.

    Raises:
        FileNotFoundError: ``"shapes"`` while its weights are not shipped yet.
    """
    torch_dtype = DTYPES[dtype]
    if spec == "tiny" or spec.startswith("tiny:"):
        from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        cfg = TinyFluxConfig()
        pipe = build_tiny_flux_pipeline(cfg, seed=seed).to(device)
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
        kw = dict(height=32, width=32, num_inference_steps=4, guidance_scale=0.0,
                  max_sequence_length=cfg.max_sequence_length)
        return LoadedPipeline(pipe, kw, f"tiny-flux-random-seed{seed}")
    if spec == "shapes" or spec.startswith("shapes:"):
        from difract_ext.toy import SHAPES_CALL_DEFAULTS, load_shapes_pipeline

        path = spec.split(":", 1)[1] if ":" in spec else None
        pipe = load_shapes_pipeline(device=device, dtype=torch_dtype, path=path)
        return LoadedPipeline(pipe, dict(SHAPES_CALL_DEFAULTS), "difract-ext/shapes-flux")
    from diffusers import FluxPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    pipe = FluxPipeline.from_pretrained(spec, torch_dtype=torch_dtype, local_files_only=offline).to(device)
    pipe.set_progress_bar_config(disable=True)
    schnell = "schnell" in spec.lower()
    kw = dict(num_inference_steps=4 if schnell else 28, guidance_scale=0.0 if schnell else 3.5,
              max_sequence_length=256 if schnell else 512)
    return LoadedPipeline(pipe, kw, spec)


def load_prompts(spec: str) -> list[str]:
    """Resolve a prompt spec (see module docstring) to a list of prompts."""
    if spec.startswith("shapes:"):
        from difract_ext.toy.world import split_prompts

        part = spec.split(":", 1)[1]
        if part not in ("train", "held_out"):
            raise ValueError(f"shapes prompt split must be 'train' or 'held_out', got {part!r}")
        out: list[str] = []
        for n in (1, 2):
            train, held = split_prompts(n)
            out += train if part == "train" else held
        return out
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (or use shapes:train / shapes:held_out)")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def double_block_sites(transformer: Any, streams: tuple[str, ...] = STREAMS) -> list[Site]:
    """Every double-block MLP of a FLUX transformer (``config.num_layers`` blocks × ``streams``)."""
    return [Site(layer, s) for layer in range(int(transformer.config.num_layers)) for s in streams]


def parse_sites(
    specs: list[str], transformer: Any | None = None, available: list[Site] | None = None
) -> list[Site]:
    """``["0:img", "img_1", "all", "all:txt"]`` -> sites.

    ``all`` means every double-block MLP of ``transformer``, or every site in ``available``.
    """
    out: list[Site] = []
    for spec in specs:
        if spec == "all" or spec.startswith("all:"):
            streams = tuple(spec.split(":", 1)[1].split(",")) if ":" in spec else STREAMS
            if available is not None:
                out += [s for s in available if s.stream in streams]
            elif transformer is not None:
                out += double_block_sites(transformer, streams)
            else:
                raise ValueError("'all' needs a pipeline or a harvest to list the sites")
        else:
            out.append(parse_site_key(spec))
    return sorted(set(out))
