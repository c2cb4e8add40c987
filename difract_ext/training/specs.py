"""What to train: dictionary specs, the training config, and the two reference recipes.

* **DifFRACT** (:func:`difract_recipe`): ReLU, L1 penalty ``λ·mean_b Σ_i |z_i|`` with λ per
  stream (img 3e-4, txt 5e-5), variance-normalised MSE, AdamW (lr 2e-4, no weight decay),
  cosine schedule, decoder rows renormalised to unit norm after every step.
* **TIDE** (:func:`tide_recipe`): TopK activation (no L1), same loss otherwise, with an auxiliary
  TopK loss on dead latents.

A :class:`DictionarySpec` is one dictionary (site × role × activation × sparsity × width);
:func:`sweep` crosses sites, roles and sparsity levels, and the trainer trains all of them in one
pass over the harvested data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difract_ext.flux.sites import Site, as_site, dictionary_metadata
from difract_ext.training.dictionary_io import DictionaryIO
from difract_ext.util.config import ConfigError, check_range, config_from_dict, config_to_dict

ROLES = ("transcoder", "sae")
TRAIN_ACTIVATIONS = ("relu", "topk")
DEAD_REMEDIES = ("auto", "resample", "auxk", "none")
DIFRACT_L1: dict[str, float] = {"img": 3e-4, "txt": 5e-5}


@dataclass
class DictionarySpec:
    """One dictionary to train.

    Attributes:
        site: the MLP (``Site(layer, stream)``).
        role: ``"transcoder"`` (MLP input -> output) or ``"sae"`` (output -> output).
        activation: ``"relu"`` (with L1) or ``"topk"``.
        l1_coefficient: λ of the L1 penalty (ReLU only).
        k: active features per row (TopK only).
        expansion_factor: ``d_sae = round(expansion_factor * d_model)`` unless ``d_sae`` is set.
        d_sae: explicit width.
        lr: AdamW learning rate.
        d_t_embed: width of the timestep embedding / time MLP (DifFRACT: 256).
        dead_remedy: ``"resample"`` (re-initialise dead features towards badly reconstructed
            rows), ``"auxk"`` (auxiliary TopK loss on dead latents, TopK only), ``"none"``, or
            ``"auto"`` (ReLU -> resample, TopK -> auxk).
        name: output sub-folder; default ``{role}s/{stream}_{layer}/{variant}``.
    """

    site: Site
    role: str = "transcoder"
    activation: str = "relu"
    l1_coefficient: float | None = None
    k: int | None = None
    expansion_factor: float = 8.0
    d_sae: int | None = None
    lr: float = 2e-4
    d_t_embed: int = 256
    dead_remedy: str = "auto"
    name: str | None = None

    def __post_init__(self) -> None:
        self.site = as_site(self.site)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.activation not in TRAIN_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {TRAIN_ACTIVATIONS}, got {self.activation!r}"
            )
        if self.activation == "relu":
            if self.l1_coefficient is None:
                self.l1_coefficient = DIFRACT_L1[self.site.stream]
            if self.k is not None:
                raise ValueError("k is only used with activation='topk'")
        else:
            if self.k is None or self.k < 1:
                raise ValueError("activation='topk' needs k >= 1")
            if self.l1_coefficient:
                raise ValueError("TopK dictionaries are trained without L1 (l1_coefficient=None)")
        if self.dead_remedy not in DEAD_REMEDIES:
            raise ValueError(
                f"dead_remedy must be one of {DEAD_REMEDIES}, got {self.dead_remedy!r}"
            )
        check_range("k", self.k, integer=True, low=1, optional=True)
        check_range("l1_coefficient", self.l1_coefficient, low=0, optional=True)
        check_range("expansion_factor", self.expansion_factor, low=0, low_open=True)
        check_range("d_sae", self.d_sae, integer=True, low=1, optional=True)
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("d_t_embed", self.d_t_embed, integer=True, low=2)
        if self.d_t_embed % 2:
            raise ConfigError(f"d_t_embed must be even (sin and cos halves), got {self.d_t_embed}")
        if self.dead_remedy == "auxk" and self.activation != "topk":
            raise ValueError("dead_remedy='auxk' needs activation='topk'")

    @property
    def remedy(self) -> str:
        """The dead-feature remedy actually used (``auto`` resolved)."""
        if self.dead_remedy != "auto":
            return self.dead_remedy
        return "auxk" if self.activation == "topk" else "resample"

    def width(self, d_model: int) -> int:
        """``d_sae`` for activations of width ``d_model``.

        Raises:
            ConfigError: a width below 1 or below ``k``.
        """
        width = (
            int(self.d_sae)
            if self.d_sae is not None
            else int(round(self.expansion_factor * d_model))
        )
        if width < 1:
            raise ConfigError(
                f"{self.resolved_name}: expansion_factor {self.expansion_factor:g} x d_model "
                f"{d_model} gives {width} features; raise it or pass d_sae"
            )
        if self.k is not None and self.k > width:
            raise ConfigError(
                f"{self.resolved_name}: k={self.k} active features of only {width}; "
                "k must be <= the width (d_sae)"
            )
        return width

    @property
    def variant(self) -> str:
        if self.activation == "relu":
            lam = float(self.l1_coefficient)  # type: ignore[arg-type]
            # one significant digit when exact (1e-03), else two (1.2e-03): distinct levels,
            # distinct names
            sparsity = f"l1-{lam:.0e}" if float(f"{lam:.0e}") == lam else f"l1-{lam:.1e}"
        else:
            sparsity = f"k-{self.k}"
        width = f"d{self.d_sae}" if self.d_sae is not None else f"x{self.expansion_factor:g}"
        return f"{self.activation}_{sparsity}_{width}"

    @property
    def resolved_name(self) -> str:
        return self.name or f"{self.role}s/{self.site}/{self.variant}"

    @property
    def sparsity(self) -> float:
        """The sparsity knob (λ for ReLU, k for TopK) as a number, for tables and plots."""
        return float(self.l1_coefficient if self.activation == "relu" else self.k)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """JSON-able fields (``site`` as ``"img_3"``, ``name`` resolved)."""
        return {**config_to_dict(self), "name": self.resolved_name}

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "spec") -> DictionarySpec:
        """Inverse of :meth:`to_json` (``source`` names the file in errors)."""
        return config_from_dict(cls, d, source)


@dataclass
class TrainConfig:
    """How to train (shared by every dictionary of one run).

    Attributes:
        batch_size: rows per optimizer step per dictionary (global, over all processes).
        epochs: passes over the harvested rows.
        lr_warmup_steps: linear learning-rate warm-up.
        lr_end_fraction: the cosine schedule ends at ``lr * lr_end_fraction``.
        l1_warmup_steps: the L1 coefficient ramps linearly from 0 over these steps.
        weight_decay, betas: AdamW settings (DifFRACT: 0 and (0.9, 0.999)).
        mix_shards: shards loaded and shuffled together (memory ~ this many shards).
        seed: initialisation, data order and resampling seed.
        dead_window: a feature that has not fired for this many steps is dead.
        resample_every: steps between dead-feature resamplings (``resample`` remedy); 0: never.
        resample_until: no resampling after this fraction of a dictionary's steps.
        resample_min_rate: at each resampling check, features that fired on fewer than this
            fraction of the rows seen since the previous check are resampled too (not only those
            silent for ``dead_window`` steps). Rare features fire on training-set specifics and
            are typically never active on held-out data; 0 keeps the plain criterion.
        auxk_coefficient: weight of the auxiliary dead-latent loss (``auxk`` remedy).
        auxk_k: latents used by the auxiliary loss (default ``d_out // 2``).
        checkpoint_every_steps: write a checkpoint every this many steps (0: only by time).
        checkpoint_every_seconds: ... and at least this often.
        stop_after_steps: stop (with a checkpoint) once this many global steps are done,
            for time-limited jobs; resume later.
        log_every: steps between log lines / history entries (0: none).
        include_padding: train on the T5 padding rows of a harvest that tags them
            (``text_padding="tag"``), as DifFRACT does: FLUX attends to every T5 position. False
            trains on real tokens only.
    """

    batch_size: int = 4096
    epochs: int = 1
    lr_warmup_steps: int = 0
    lr_end_fraction: float = 0.0
    l1_warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    mix_shards: int = 4
    seed: int = 0
    dead_window: int = 1000
    resample_every: int = 2000
    resample_until: float = 0.75
    resample_min_rate: float = 0.0
    auxk_coefficient: float = 1.0 / 32.0
    auxk_k: int | None = None
    checkpoint_every_steps: int = 0
    checkpoint_every_seconds: float = 300.0
    stop_after_steps: int | None = None
    log_every: int = 100
    include_padding: bool = True

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_range(f"betas[{i}]", beta, low=0, high=1, high_open=True)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        for name in ("batch_size", "epochs", "mix_shards", "dead_window"):
            check_range(name, getattr(self, name), integer=True, low=1)
        for name in (
            "log_every",  # 0: no log lines
            "lr_warmup_steps",
            "l1_warmup_steps",
            "resample_every",
            "checkpoint_every_steps",
        ):
            check_range(name, getattr(self, name), integer=True, low=0)
        check_range("seed", self.seed, integer=True)
        check_range("auxk_k", self.auxk_k, integer=True, low=1, optional=True)
        check_range("stop_after_steps", self.stop_after_steps, integer=True, low=1, optional=True)
        for name in ("lr_end_fraction", "resample_until"):
            check_range(name, getattr(self, name), low=0, high=1)
        check_range("resample_min_rate", self.resample_min_rate, low=0, high=1, high_open=True)
        for name in ("weight_decay", "auxk_coefficient", "checkpoint_every_seconds"):
            check_range(name, getattr(self, name), low=0)

    def to_json(self) -> dict[str, Any]:
        """JSON-able fields (``betas`` as a list)."""
        return config_to_dict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "train config") -> TrainConfig:
        """Inverse of :meth:`to_json` (``source`` names the file in errors)."""
        return config_from_dict(cls, d, source)


def difract_recipe(
    sites: Sequence[Site],
    roles: Sequence[str] = ("transcoder",),
    l1: dict[str, float] | None = None,
    expansion_factor: float = 16.0,
    lr: float = 2e-4,
    **kwargs: Any,
) -> list[DictionarySpec]:
    """DifFRACT's recipe: ReLU + L1 (λ per stream, default img 3e-4, txt 5e-5), width 16×."""
    lam = {**DIFRACT_L1, **(l1 or {})}
    return [
        DictionarySpec(
            site,
            role,
            "relu",
            l1_coefficient=lam[site.stream],
            expansion_factor=expansion_factor,
            lr=lr,
            **kwargs,
        )
        for site in sites
        for role in roles
    ]


def tide_recipe(
    sites: Sequence[Site],
    k: int = 32,
    roles: Sequence[str] = ("transcoder",),
    expansion_factor: float = 16.0,
    lr: float = 2e-4,
    **kwargs: Any,
) -> list[DictionarySpec]:
    """TIDE's recipe: TopK (``k`` active features), auxiliary loss on dead latents."""
    return [
        DictionarySpec(site, role, "topk", k=k, expansion_factor=expansion_factor, lr=lr, **kwargs)
        for site in sites
        for role in roles
    ]


def sweep(
    sites: Sequence[Site],
    roles: Sequence[str] = ("transcoder", "sae"),
    activation: str = "relu",
    levels: Sequence[float] = (),
    l1_scale_txt: float | None = None,
    **kwargs: Any,
) -> list[DictionarySpec]:
    """Several sparsity levels per site and role (for sparsity–faithfulness curves).

    For ReLU, ``levels`` are L1 coefficients (multiplied by ``l1_scale_txt`` on the text stream if
    given, e.g. DifFRACT's 5e-5 / 3e-4); for TopK they are values of k.
    """
    specs = []
    for site in sites:
        for role in roles:
            for level in levels:
                if activation == "relu":
                    lam = float(level) * (
                        l1_scale_txt if (l1_scale_txt and site.stream == "txt") else 1.0
                    )
                    specs.append(DictionarySpec(site, role, "relu", l1_coefficient=lam, **kwargs))
                else:
                    specs.append(DictionarySpec(site, role, "topk", k=int(level), **kwargs))
    return specs


def specs_from_options(
    sites: Sequence[Site],
    roles: Sequence[str] = ("transcoder",),
    activations: Sequence[str] = ("relu",),
    l1_img: Sequence[float] = (DIFRACT_L1["img"],),
    l1_txt: Sequence[float] = (DIFRACT_L1["txt"],),
    ks: Sequence[int] = (32,),
    **kwargs: Any,
) -> list[DictionarySpec]:
    """Cross sites × roles × activations × sparsity levels (L1 levels per stream, k for TopK).

    Extra keywords (``expansion_factor``, ``d_sae``, ``lr``, ``d_t_embed``, ``dead_remedy``) go to
    every :class:`DictionarySpec`.
    """
    specs = []
    for site in sites:
        for role in roles:
            for act in activations:
                if act == "relu":
                    for lam in l1_img if site.stream == "img" else l1_txt:
                        specs.append(
                            DictionarySpec(site, role, "relu", l1_coefficient=float(lam), **kwargs)
                        )
                else:
                    for k in ks:
                        specs.append(DictionarySpec(site, role, "topk", k=int(k), **kwargs))
    return specs


def build_dictionary(
    spec: DictionarySpec,
    d_model: int,
    *,
    io: DictionaryIO,
    trained_timesteps: Sequence[float] | None = None,
    model_name: str = "unknown",
    seed: int = 0,
    device: str | torch.device = "cpu",
    extra_metadata: dict[str, Any] | None = None,
) -> Any:
    """A freshly initialised dictionary for ``spec``, made by ``io``.

    ``io`` is the library that owns the module class, e.g.
    :data:`difract_ext.adapters.dictionaries.SAELENS_IO` (a :class:`TimestepTranscoder` /
    :class:`TimestepSAE`). Initialisation uses its own generator state (``seed``) and leaves the
    global RNG untouched.
    """
    extra = extra_metadata or {}
    meta = dictionary_metadata(spec.site, spec.role, model_name=model_name, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return io.build(
            spec.role,
            d_model,
            spec.width(d_model),
            activation=spec.activation,
            k=spec.k,
            d_t_embed=spec.d_t_embed,
            trained_timesteps=list(trained_timesteps) if trained_timesteps else None,
            metadata=meta,
            device=str(device),
        )


__all__ = [
    "DEAD_REMEDIES",
    "DIFRACT_L1",
    "ROLES",
    "DictionarySpec",
    "TrainConfig",
    "build_dictionary",
    "difract_recipe",
    "specs_from_options",
    "sweep",
    "tide_recipe",
]
