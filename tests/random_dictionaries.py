"""Random timestep-conditioned transcoders for attribution tests (one helper, many tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from difract_ext import TimestepTranscoder, TimestepTranscoderConfig
from difract_ext.flux.sites import Site

SITES = [Site(layer, stream) for layer in range(2) for stream in ("img", "txt")]


def random_transcoders(
    width: int,
    sites: Iterable[Site] = SITES,
    *,
    d_sae: int = 24,
    mod_std: float | None = 0.2,
    seed: int = 1,
    metadata: Callable[[Site], dict] | None = None,
) -> dict[Site, TimestepTranscoder]:
    """``{site: transcoder}`` of width ``width -> d_sae -> width``, encoder biases drawn from
    N(-0.2, 0.3) so that some features fire and some do not; ``mod_std`` (None: left at its
    initialisation) draws the timestep modulation's weights."""
    torch.manual_seed(seed)
    out = {}
    for site in sites:
        extra = {"metadata": metadata(site)} if metadata is not None else {}
        tc = TimestepTranscoder(
            TimestepTranscoderConfig(d_in=width, d_sae=d_sae, d_out=width, d_t_embed=16, **extra)
        )
        with torch.no_grad():
            if mod_std is not None:
                tc.mod_linear.weight.normal_(0, mod_std)
            tc.b_enc.normal_(-0.2, 0.3)
        out[site] = tc
    return out
