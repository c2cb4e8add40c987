"""Where pipelines and prompt lists come from, by name (shared by the CLI and scripts).

Pipeline specs: ``"tiny"`` / ``"tiny:SEED"`` (a random toy FLUX pipeline, for smoke tests),
``"shapes"`` (the shipped shapes-world model; ``"shapes:FOLDER"`` for another save of it, with the
same call defaults unless the folder has its own) or a diffusers ``FluxPipeline`` folder / Hub id
(loaded by :func:`difract_ext.flux.loading.load_pipeline`, ``local_files_only`` when
``HF_HUB_OFFLINE=1``). Call keywords come from the pipeline itself
(:func:`difract_ext.flux.defaults.resolve`).

Prompt specs: ``"shapes:train"`` / ``"shapes:held_out"`` (the shapes world's disjoint split, one-
and two-object prompts) or a text file with one prompt per line (blank lines and ``#`` lines
skipped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difract_ext.capture.format import DTYPES
from difract_ext.flux.sites import STREAMS, Site, SiteError, check_stream
from difract_ext.util.files import MAX_JSON_BYTES, check_regular_file

_OLD_SITE = re.compile(r"^(?P<layer>[0-9]+):(?P<stream>[a-z]+)$")

SHAPES_MODEL_NAME = "difract-ext/shapes-flux"
"""Name recorded in metadata for the shipped shapes model."""


@dataclass
class LoadedPipeline:
    """A pipeline, its own call keywords (:func:`~difract_ext.flux.defaults.resolve`) and the
    name recorded in metadata."""

    pipe: Any
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    model_name: str = "unknown"


def load_pipeline(
    spec: str, device: str | torch.device = "cpu", dtype: str = "float32"
) -> LoadedPipeline:
    """Resolve a pipeline spec (see module docstring) to a pipeline on ``device``.

    Raises:
        FileNotFoundError: a folder without ``model_index.json``.
    """
    from difract_ext.flux.defaults import CallDefaults, resolve, set_call_defaults
    from difract_ext.flux.loading import load_pipeline as load

    torch_dtype = DTYPES[dtype]
    if spec == "tiny" or spec.startswith("tiny:"):
        from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline

        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        cfg = TinyFluxConfig()
        pipe = load(build_tiny_flux_pipeline(cfg, seed=seed), device=device, dtype=torch_dtype)
        tiny_call = CallDefaults(
            height=32,
            width=32,
            num_inference_steps=4,
            guidance_scale=0.0,
            max_sequence_length=cfg.max_sequence_length,
            source="tiny",
        )
        set_call_defaults(pipe, tiny_call)
        name = f"tiny-flux-random-seed{seed}"
    elif spec == "shapes" or spec.startswith("shapes:"):
        from difract_ext.toy import load_shapes_pipeline

        path = spec.split(":", 1)[1] if ":" in spec else None
        pipe = load_shapes_pipeline(device=device, dtype=torch_dtype, path=path)
        name = SHAPES_MODEL_NAME
    else:
        pipe = load(spec, device=device, dtype=torch_dtype)
        name = spec
    return LoadedPipeline(pipe, resolve(pipe), name)


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
        raise FileNotFoundError(
            f"prompt file {path} not found (or use shapes:train / shapes:held_out)"
        )
    check_regular_file(path, "prompt file", max_bytes=MAX_JSON_BYTES)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {e.start}); a prompt file holds one prompt per line"
        ) from None
    lines = [ln.strip() for ln in text.splitlines()]
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
    """``["img_1", "all", "all:txt"]`` -> sites (sorted, without repeats).

    ``all`` means every double-block MLP of ``transformer``, or every site in ``available``;
    ``all:txt`` (or ``all:img,txt``) only those of the given streams; anything else is a site
    in its one string form, ``img_3``.

    Raises:
        SiteError: a spec that is neither, e.g. the old ``3:img`` (the message shows ``img_3``).
        ValueError: ``all`` without a pipeline or harvest to list the sites.
    """
    out: list[Site] = []
    for spec in specs:
        if spec == "all" or spec.startswith("all:"):
            named = spec.split(":", 1)[1].split(",") if ":" in spec else STREAMS
            streams = tuple(check_stream(s) for s in named)
            if available is not None:
                out += [s for s in available if s.stream in streams]
            elif transformer is not None:
                out += double_block_sites(transformer, streams)
            else:
                raise ValueError("'all' needs a pipeline or a harvest to list the sites")
        else:
            m = _OLD_SITE.match(spec)
            if m:
                site = Site(int(m["layer"]), check_stream(m["stream"]))
                raise SiteError(
                    f"site {spec!r}: write it as {site} (STREAM_LAYER); "
                    f"'all' and 'all:{site.stream}' select several"
                )
            out.append(Site.parse(spec))
    return sorted(set(out))
