"""Where FLUX's MLPs are, and what their inputs and outputs are.

A *site* is ``(layer, stream)``: double-stream block ``layer`` and its image MLP (``"img"``,
diffusers module ``transformer_blocks.{layer}.ff``) or text MLP (``"txt"``,
``transformer_blocks.{layer}.ff_context``). In diffusers' ``FluxTransformerBlock``:

- MLP **input** ``[B, S, D]`` = ``LN(h) ⊙ (1 + scale_mlp) + shift_mlp``: the affine-free
  LayerNorm (eps 1e-6) of the residual after the gated attention update, AdaLN-modulated;
- MLP **output** ``[B, S, D]`` = the ``FeedForward`` result *before* the block multiplies it by
  ``gate_mlp`` and adds it to the residual.

``S`` is the number of image patches (``img``) or text tokens (``txt``). The timestep ``t`` is the
``timestep`` keyword the pipeline passes to the transformer (``scheduler_t / 1000``, in [0, 1]).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

STREAMS: tuple[str, ...] = ("img", "txt")
STREAM_MODULES: dict[str, str] = {"img": "ff", "txt": "ff_context"}

FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
#: The 4 values FLUX.1-schnell's transformer receives (scheduler 1000, 750, 500, 250 cast to
#: bf16, so 750 -> 752, then divided by 1000 in bf16). DifFRACT's transcoders saw only these.
SCHNELL_TIMESTEPS: tuple[float, ...] = (1.0, 0.75390625, 0.5, 0.25)


V = TypeVar("V")


class SiteError(ValueError):
    """An unknown stream or a layer the model does not have."""


def check_stream(stream: str) -> str:
    if stream not in STREAMS:
        raise SiteError(
            f"unknown stream {stream!r}; streams are 'img' (image MLP, module `ff`) and 'txt' "
            "(text MLP, module `ff_context`)"
        )
    return stream


_SITE_RE = re.compile(r"^(?P<stream>[a-z]+)_(?P<layer>[0-9]+)$")
SITE_FORM = "'img_3' (stream_layer), i.e. Site(3, 'img')"


@dataclass(frozen=True, order=True)
class Site:
    """One MLP of a double-stream block: ``Site(layer, stream)``.

    Its one string form (files, folders, shards, the CLI) is ``"{stream}_{layer}"``, e.g.
    ``str(Site(3, "img")) == "img_3"``; :meth:`parse` is the inverse and :func:`as_site`
    converts any accepted key.
    """

    layer: int
    stream: str

    def __post_init__(self) -> None:
        if self.stream == "single":
            raise SiteError(
                "transcoders on single-stream blocks are not supported: their MLP is fused with "
                "the attention output in `proj_out`; use double-block sites ('img' / 'txt')"
            )
        check_stream(self.stream)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise SiteError(f"layer must be a non-negative int, got {self.layer!r}")

    def __str__(self) -> str:
        return f"{self.stream}_{self.layer}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """``"img_3" -> Site(3, "img")``.

        Raises:
            SiteError: any other spelling; the message shows the accepted form.
        """
        m = _SITE_RE.match(str(text).strip())
        if not m:
            raise SiteError(f"not a site: {text!r}; write a site as {SITE_FORM}")
        return cls(int(m.group("layer")), m.group("stream"))

    @property
    def module_path(self) -> str:
        """Path of the MLP inside ``FluxTransformer2DModel``, e.g. ``transformer_blocks.3.ff``."""
        return f"transformer_blocks.{self.layer}.{STREAM_MODULES[self.stream]}"

    @property
    def hook_in(self) -> str:
        """Name of the MLP input (nnsight spelling: ``<module>.input``)."""
        return f"{self.module_path}.input"

    @property
    def hook_out(self) -> str:
        """Name of the MLP output before the gate (nnsight spelling: ``<module>.output``)."""
        return f"{self.module_path}.output"

    def check_in(self, num_double_layers: int) -> Site:
        if self.layer >= num_double_layers:
            raise SiteError(
                f"layer {self.layer} does not exist: the model has {num_double_layers} "
                f"double-stream blocks (layers 0..{num_double_layers - 1})"
            )
        return self


def as_site(key: object) -> Site:
    """The :class:`Site` a key names: a ``Site``, its string form ``"img_3"``, or ``(3, "img")``.

    A ``(stream, layer)`` tuple is refused rather than guessed: it is the order of DifFRACT's file
    names, not of ``Site``.

    Raises:
        SiteError: anything else, with the accepted forms.
    """
    if isinstance(key, Site):
        return key
    if isinstance(key, str):
        return Site.parse(key)
    if isinstance(key, tuple) and len(key) == 2:
        layer, stream = key
        if isinstance(layer, str) and not isinstance(stream, str):
            raise SiteError(
                f"{key!r} is a (stream, layer) tuple; sites are keyed Site(layer, stream): "
                f"use Site({stream!r}, {layer!r}) or the string "
                f"'{layer}_{stream}'"
            )
        if isinstance(stream, str) and isinstance(layer, int) and not isinstance(layer, bool):
            return Site(layer, stream)
    raise SiteError(f"cannot read a site from {key!r}; write a site as {SITE_FORM}")


def as_site_dict(mapping: Mapping[Any, V], what: str = "dictionaries") -> dict[Site, V]:
    """``{key: value}`` with every key converted by :func:`as_site` (two keys for one site:
    error).
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping {{Site: value}}, got {type(mapping).__name__}")
    out: dict[Site, V] = {}
    for key, value in mapping.items():
        site = as_site(key)
        if site in out:
            raise SiteError(f"{what}: two entries for site {site} ({key!r} and an earlier key)")
        out[site] = value
    return out


def dictionary_metadata(
    site: Site,
    role: str,
    model_name: str = FLUX_SCHNELL,
    **extra: object,
) -> dict[str, object]:
    """SAELens metadata for a dictionary at ``site``.

    A transcoder reads the MLP input and writes the MLP output; an SAE reads and writes the output.
    """
    if role not in ("transcoder", "sae"):
        raise ValueError(f"role must be 'transcoder' or 'sae', got {role!r}")
    meta: dict[str, object] = {
        "model_name": model_name,
        "model_class_name": "FluxTransformer2DModel",
        "hook_name": site.hook_in if role == "transcoder" else site.hook_out,
        "stream": site.stream,
        "layer": site.layer,
        "block_type": "double",
        "module_path": site.module_path,
        "timestep_source": "transformer `timestep` kwarg",
        "timestep_range": [0.0, 1.0],
    }
    if role == "transcoder":
        meta["hook_name_out"] = site.hook_out
    meta.update(extra)
    return meta


def transformer_calls_per_step(call_kwargs: dict[str, Any]) -> int:
    """How often ``FluxPipeline`` calls the transformer per denoising step: 2 under true CFG
    (``true_cfg_scale > 1`` and a negative prompt), else 1."""
    scale = float(call_kwargs.get("true_cfg_scale", 1.0) or 1.0)
    has_neg = call_kwargs.get("negative_prompt") is not None or (
        call_kwargs.get("negative_prompt_embeds") is not None
        and call_kwargs.get("negative_pooled_prompt_embeds") is not None
    )
    return 2 if scale > 1 and has_neg else 1
