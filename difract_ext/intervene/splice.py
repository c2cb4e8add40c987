"""Splicing conditioned transcoders into a FLUX transformer with plain torch hooks.

A :class:`TranscoderSite` wraps one dictionary at one MLP. During a forward it encodes the MLP
input at the step's timestep and passes the features through ``features`` (an ``nn.Identity``,
so tracing libraries can read or edit them there). What reaches the model:

- ``mode="delta"`` (default): ``y + (z' − z) · W_dec``: the true MLP output plus the effect of
  the edit; with no edit it is ``y`` itself, bit for bit, so reconstruction error never leaks in;
- ``mode="replace"``: ``decode(z')`` (the transcoder replaces the MLP);
- ``mode="replace"`` with ``keep_error=True``: ``decode(z') + (y − decode(z))``.

:func:`spliced` installs the hooks on a ``FluxTransformer2DModel`` for the duration of a block and
removes them in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from difract_ext.flux.roles import check_transcoder
from difract_ext.flux.sites import Site, SiteError

SpliceMode = Literal["delta", "replace"]


class TimestepBox:
    """Holds the ``timestep`` the transformer received in the current forward (``[B]``)."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs.get("timestep")
        if t is None and len(args) > 2:
            t = args[2]
        if t is None:
            raise SiteError("the transformer was called without a `timestep`; cannot condition")
        self.t = t.detach()


class TranscoderSite(nn.Module):
    """One dictionary spliced into one MLP.

    Submodules: ``dictionary`` (the transcoder), ``features`` (identity on ``[B, S, d_sae]``
    activations) and ``reconstruction`` (identity on ``[B, S, d_out]``, ``decode(features)``;
    computed only in ``replace`` mode).
    """

    def __init__(
        self,
        dictionary: nn.Module,
        site: Site,
        mode: SpliceMode = "delta",
        keep_error: bool = False,
    ):
        super().__init__()
        if mode not in ("delta", "replace"):
            raise ValueError(f"mode must be 'delta' or 'replace', got {mode!r}")
        if mode == "delta" and keep_error:
            raise ValueError(
                "keep_error only applies to mode='replace' (delta mode always keeps y)"
            )
        check_transcoder(site, dictionary, "splicing (TranscoderSite)")
        self.dictionary = dictionary
        self.features = nn.Identity()
        self.reconstruction = nn.Identity()
        self.site = site
        self.mode: SpliceMode = mode
        self.keep_error = keep_error

    def splice(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """New MLP output for input ``x [B, S, d_in]``, true output ``y [B, S, d_out]``,
        ``t [B]``.
        """
        dic: Any = self.dictionary
        dtype = dic.W_dec.dtype
        with torch.no_grad():
            z = dic.encode(x.to(dtype), t=t.to(x.device))
        z_edit = self.features(z.clone())
        if self.mode == "delta":
            delta = z_edit - z
            if not bool(delta.any()):
                return y
            return y + (delta @ dic.W_dec).to(y.dtype)
        recon = self.reconstruction(dic.decode(z_edit))
        if self.keep_error:
            recon = recon + (y.to(dtype) - dic.decode(z))
        return recon.to(y.dtype)


def make_site_hook(site: TranscoderSite, box: TimestepBox) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if box.t is None:
            raise SiteError("no timestep recorded for this forward (transformer pre-hook missing)")
        return site.splice(args[0], output, box.t)

    return hook


def check_dictionary_fits(
    transformer: nn.Module,
    site: Site,
    dictionary: Any,
    where: str = "splicing (attach_transcoders, splice_transcoders)",
) -> None:
    """Raise :class:`SiteError` if ``site`` is not in ``transformer``, the widths differ, the
    dictionary is not a transcoder (:class:`~difract_ext.flux.roles.DictionaryRoleError`) or its
    metadata names another site (:class:`~difract_ext.flux.roles.DictionarySiteError`)."""
    n = len(transformer.transformer_blocks)
    site.check_in(n)
    check_transcoder(site, dictionary, where)
    width = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    cfg = dictionary.cfg
    d_out = getattr(cfg, "d_out", cfg.d_in)
    if cfg.d_in != width or d_out != width:
        raise SiteError(
            f"the dictionary for layer {site.layer} stream {site.stream!r} has d_in={cfg.d_in}, "
            f"d_out={d_out} but this model's MLPs are {width} wide: it belongs to another model"
        )


@contextlib.contextmanager
def spliced(
    transformer: nn.Module, sites: Mapping[Site, TranscoderSite], box: TimestepBox | None = None
) -> Iterator[TimestepBox]:
    """Install the timestep pre-hook and one forward hook per site; remove them on exit."""
    box = box or TimestepBox()
    handles = [transformer.register_forward_pre_hook(box.pre_hook, with_kwargs=True)]
    try:
        for site, mod in sites.items():
            target = transformer.get_submodule(site.module_path)
            handles.append(target.register_forward_hook(make_site_hook(mod, box)))
        yield box
    finally:
        for h in handles:
            h.remove()
        box.t = None
