"""Spliced generation: replace FLUX MLPs by transcoders (no error term) and measure the damage.

:func:`splice_transcoders` is a context manager: inside it, each chosen MLP's output (before the
gate) is replaced by its transcoder's reconstruction from the same MLP input, at every denoising
step, with ``t`` read from the transformer's ``timestep`` keyword. :func:`spliced_generation`
generates the same ``(prompt, seed)`` pairs with and without splicing and compares the final
latents (and, given a scorer, the images' prompt adherence).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from difract_ext.flux.sites import Site
from difract_ext.intervene.splice import TranscoderSite, spliced

logger = logging.getLogger(__name__)

ImageScorer = Callable[[list[np.ndarray], list[str]], dict[str, float]]


@contextlib.contextmanager
def splice_transcoders(
    transformer: torch.nn.Module, transcoders: Mapping[Site, Any]
) -> Iterator[None]:
    """Replace ``site``'s MLP output by ``transcoders[site](mlp_input, t)`` while active.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel``.
        transcoders: ``{Site: TimestepTranscoder}``; computed in the transcoder's dtype, cast back.
    """
    sites = {site: TranscoderSite(tc, site, mode="replace") for site, tc in transcoders.items()}
    with spliced(transformer, sites):
        yield


@torch.no_grad()
def generate_latents(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    call_kwargs: Mapping[str, Any],
    batch_size: int = 16,
    images: bool = False,
) -> tuple[torch.Tensor, list[np.ndarray] | None]:
    """Final latents ``[N, ...]`` (float32, CPU) and, if ``images``, the decoded images.

    One CPU ``torch.Generator`` per ``(prompt, seed)``, so results do not depend on batching
    other than through float rounding of batched kernels.
    """
    lat, ims = [], []
    for lo in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[lo : lo + batch_size]), list(seeds[lo : lo + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
        box: dict[str, torch.Tensor] = {}

        def grab(
            p: Any, i: int, t: Any, kw: dict[str, Any], box: dict[str, torch.Tensor] = box
        ) -> dict[str, Any]:
            box["latents"] = kw["latents"]
            return kw

        out = pipe(
            prompt=ps,
            generator=gens,
            output_type="np" if images else "latent",
            callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["latents"],
            **call_kwargs,
        )
        lat.append(box["latents"].detach().float().cpu())
        if images:
            ims += [np.asarray(im, dtype=np.float32) for im in out.images]
    return torch.cat(lat), (ims if images else None)


def _compare(base: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    b, o = base.flatten(1).double(), other.flatten(1).double()
    cos = torch.nn.functional.cosine_similarity(b, o, dim=-1)
    mse = (b - o).pow(2).mean(-1)
    rel = (b - o).pow(2).sum(-1) / b.pow(2).sum(-1).clamp(min=1e-12)
    return {
        "latent_cosine": float(cos.mean()),
        "latent_cosine_min": float(cos.min()),
        "latent_mse": float(mse.mean()),
        "latent_rel_error": float(rel.mean()),
    }


def spliced_generation(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    transcoders: Mapping[Site, Any],
    call_kwargs: Mapping[str, Any],
    *,
    single: bool = True,
    all_sites: bool = True,
    score_images: ImageScorer | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate each ``(prompt, seed)`` with MLPs replaced by transcoders; compare with baseline.

    Configurations: each site alone (``single``), then every site at once (``all_sites``).

    Returns:
        one dict per configuration: ``{"spliced": "img_0" | "all (N)", "latent_cosine",
        "latent_cosine_min", "latent_mse", "latent_rel_error"}`` plus, with ``score_images``,
        its metrics for the spliced images prefixed ``adherence/`` (the baseline comes first,
        as ``"spliced": "none"``).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images = score_images is not None
    base, base_ims = generate_latents(pipe, prompts, seeds, call_kwargs, batch_size, images)
    rows: list[dict[str, Any]] = [{"spliced": "none", **_compare(base, base)}]
    if images:
        assert base_ims is not None and score_images is not None
        rows[0].update(
            {f"adherence/{k}": v for k, v in score_images(base_ims, list(prompts)).items()}
        )
    configs: list[tuple[str, dict[Site, Any]]] = []
    if single:
        configs += [(str(s), {s: tc}) for s, tc in sorted(transcoders.items())]
    if all_sites and (len(transcoders) > 1 or not single):
        configs.append((f"all ({len(transcoders)})", dict(transcoders)))
    for label, chosen in tqdm(configs, desc="splice", unit="config", disable=not progress):
        with splice_transcoders(pipe.transformer, chosen):
            lat, ims = generate_latents(pipe, prompts, seeds, call_kwargs, batch_size, images)
        row: dict[str, Any] = {"spliced": label, **_compare(base, lat)}
        if images:
            assert ims is not None and score_images is not None
            row.update({f"adherence/{k}": v for k, v in score_images(ims, list(prompts)).items()})
        rows.append(row)
        logger.info(
            "splice %s: latent cosine %.4f, mse %.3g",
            label,
            row["latent_cosine"],
            row["latent_mse"],
        )
    return rows


def splice_table(rows: Sequence[Mapping[str, Any]], adherence_keys: Sequence[str] = ()) -> str:
    """Markdown table of :func:`spliced_generation` results."""
    cols = ["latent_cosine", "latent_cosine_min", "latent_mse", "latent_rel_error"]
    cols += [f"adherence/{k}" for k in adherence_keys]
    head = "| spliced | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = []
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append(f"| {r['spliced']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
