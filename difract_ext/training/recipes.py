"""Training recipes: every default of ``difract train`` in one named bundle.

* ``difract``: DifFRACT's published hyper-parameters for real FLUX (ReLU + L1 with λ img 3e-4,
  txt 5e-5, width 16×, AdamW lr 2e-4, cosine to 0, no warm-ups, time embedding 256), plus
  dead-feature resampling (DifFRACT has none). Meant for large harvests of FLUX.1 (DifFRACT took
  ~62 k steps of 4,096 rows); a small harvest gives few steps and poor dictionaries.
* ``tide``: the same with TopK (k 32) and an auxiliary loss on dead latents instead of L1.
* ``shapes``: the recipe of the shipped shapes-model dictionaries
  (``scripts/train_shapes_dictionaries.py``): lr 1e-2 with warm-ups, 6 epochs, batch 2,048, width
  2× (image) / 0.75× (text), λ per stream with per-site overrides, SAE λ 1e-2, rare features
  resampled.

:func:`recipe_for_model` picks ``shapes`` for a harvest of the shapes model and ``difract``
otherwise. :func:`recipe_specs` turns a recipe (plus explicit overrides) into dictionary specs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from difract_ext.flux.sites import Site
from difract_ext.training.specs import DictionarySpec

#: ``model_name`` that a harvest of the shipped shapes model records (``--model shapes``).
SHAPES_MODEL_NAME = "difract-ext/shapes-flux"


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Recipe:
    """Defaults for dictionary specs and the training config.

    Attributes:
        name: ``"difract"``, ``"tide"`` or ``"shapes"``.
        activation: default activation (``"relu"`` or ``"topk"``).
        lr: AdamW learning rate.
        expansion: ``d_sae / d_model`` per stream.
        l1: L1 coefficient of ReLU transcoders per stream.
        l1_sae: L1 coefficient of ReLU SAEs per stream.
        l1_site: per-site overrides of ``l1`` for transcoders (``{"img_0": 3e-3}``).
        k: active features of TopK dictionaries.
        d_t_embed: timestep-embedding width.
        train: :class:`~difract_ext.training.specs.TrainConfig` fields.
    """

    name: str
    activation: str
    lr: float
    expansion: Mapping[str, float]
    l1: Mapping[str, float]
    l1_sae: Mapping[str, float]
    k: int
    d_t_embed: int
    train: Mapping[str, Any]
    l1_site: Mapping[str, float] = field(default_factory=lambda: _frozen({}))

    def l1_for(self, site: Site, role: str) -> float:
        """The recipe's L1 coefficient of a ReLU dictionary at ``site`` in ``role``."""
        if role == "sae":
            return float(self.l1_sae[site.stream])
        return float(self.l1_site.get(str(site), self.l1[site.stream]))


_DIFRACT_TRAIN = _frozen(
    {
        "batch_size": 4096,
        "epochs": 1,
        "lr_warmup_steps": 0,
        "lr_end_fraction": 0.0,
        "l1_warmup_steps": 0,
        "dead_window": 1000,
        "resample_every": 2000,
        "resample_until": 0.75,
        "resample_min_rate": 0.0,
    }
)

RECIPES: Mapping[str, Recipe] = _frozen(
    {
        "difract": Recipe(
            name="difract",
            activation="relu",
            lr=2e-4,
            expansion=_frozen({"img": 16.0, "txt": 16.0}),
            l1=_frozen({"img": 3e-4, "txt": 5e-5}),
            l1_sae=_frozen({"img": 3e-4, "txt": 5e-5}),
            k=32,
            d_t_embed=256,
            train=_DIFRACT_TRAIN,
        ),
        "tide": Recipe(
            name="tide",
            activation="topk",
            lr=2e-4,
            expansion=_frozen({"img": 16.0, "txt": 16.0}),
            l1=_frozen({"img": 3e-4, "txt": 5e-5}),
            l1_sae=_frozen({"img": 3e-4, "txt": 5e-5}),
            k=32,
            d_t_embed=256,
            train=_DIFRACT_TRAIN,
        ),
        "shapes": Recipe(
            name="shapes",
            activation="relu",
            lr=1e-2,
            expansion=_frozen({"img": 2.0, "txt": 0.75}),
            l1=_frozen({"img": 1e-3, "txt": 1.2e-3}),
            l1_sae=_frozen({"img": 1e-2, "txt": 1e-2}),
            # img_0's MLP is the most linear (dense at the stream's λ); txt_0's die late at it
            l1_site=_frozen({"img_0": 3e-3, "txt_0": 2e-4}),
            k=16,
            d_t_embed=64,
            train=_frozen(
                {
                    "batch_size": 2048,
                    "epochs": 6,
                    "lr_warmup_steps": 50,
                    "lr_end_fraction": 0.05,
                    "l1_warmup_steps": 200,
                    "dead_window": 100,
                    "resample_every": 100,
                    "resample_until": 0.8,
                    "resample_min_rate": 2e-4,
                }
            ),
        ),
    }
)


def recipe_for_model(model_name: str) -> Recipe:
    """``shapes`` for the shipped shapes model's harvests, ``difract`` for anything else."""
    return RECIPES["shapes" if model_name == SHAPES_MODEL_NAME else "difract"]


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_specs(
    recipe: Recipe,
    sites: Sequence[Site],
    roles: Sequence[str] = ("transcoder",),
    activations: Sequence[str] | None = None,
    *,
    l1_img: Sequence[float] | None = None,
    l1_txt: Sequence[float] | None = None,
    l1_sae: Sequence[float] | None = None,
    ks: Sequence[int] | None = None,
    expansion_factor: float | None = None,
    **kwargs: Any,
) -> list[DictionarySpec]:
    """Cross sites × roles × activations × sparsity levels, with the recipe's defaults.

    An explicit argument overrides the recipe: ``l1_img`` / ``l1_txt`` set the L1 levels of every
    ReLU dictionary of that stream (SAEs too, unless ``l1_sae`` is given; the recipe's per-site
    overrides then no longer apply), ``expansion_factor`` the width of both streams. Extra keywords
    (``d_sae``, ``lr``, ``d_t_embed``, ``dead_remedy``) go to every spec.
    """
    kwargs.setdefault("lr", recipe.lr)
    kwargs.setdefault("d_t_embed", recipe.d_t_embed)
    explicit = {"img": l1_img, "txt": l1_txt}
    specs = []
    for site in sites:
        width = expansion_factor if expansion_factor is not None else recipe.expansion[site.stream]
        for role in roles:
            for act in activations or (recipe.activation,):
                if act != "relu":
                    for k in ks or (recipe.k,):
                        specs.append(
                            DictionarySpec(
                                site, role, act, k=int(k), expansion_factor=width, **kwargs
                            )
                        )
                    continue
                if role == "sae" and l1_sae is not None:
                    levels: Sequence[float] = l1_sae
                elif explicit[site.stream] is not None:
                    levels = explicit[site.stream]  # type: ignore[assignment]
                else:
                    levels = (recipe.l1_for(site, role),)
                for lam in levels:
                    specs.append(
                        DictionarySpec(
                            site,
                            role,
                            "relu",
                            l1_coefficient=float(lam),
                            expansion_factor=width,
                            **kwargs,
                        )
                    )
    return specs


__all__ = [
    "RECIPES",
    "SHAPES_MODEL_NAME",
    "Recipe",
    "get_recipe",
    "recipe_for_model",
    "recipe_specs",
]
