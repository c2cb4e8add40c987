"""``difract train`` as a function: recipe defaults, training, and the end-of-training report.

Options left unset take their value from the recipe (``--recipe``; ``auto`` = ``shapes`` for a
harvest of the shipped shapes model, ``difract`` otherwise, see
:mod:`~difract_ext.training.recipes`). The report lists, per dictionary, its explained variance,
L0, dead and dense fractions over its last training steps, and says loudly which ones fail the
checks of :mod:`~difract_ext.training.quality`.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from typing import Any

from difract_ext.training.quality import (
    ADVICE,
    MAX_OVERACTIVE_FRACTION,
    MIN_EXPLAINED_VARIANCE,
    OVERACTIVE_RATE,
    quality_problems,
)
from difract_ext.training.recipes import RECIPES, Recipe, get_recipe, recipe_for_model

logger = logging.getLogger(__name__)

#: TrainConfig fields a recipe sets, and the ``difract train`` option of each.
RECIPE_TRAIN_OPTIONS = (
    "batch_size",
    "epochs",
    "lr_warmup_steps",
    "lr_end_fraction",
    "l1_warmup_steps",
    "dead_window",
    "resample_every",
    "resample_until",
    "resample_min_rate",
)


def recipe_values(field: str) -> str:
    """A recipe attribute or train field, per recipe: ``"difract 0.0002, tide 0.0002, ..."``."""
    parts = []
    for name, r in RECIPES.items():
        v = r.train[field] if field in r.train else getattr(r, field)
        if isinstance(v, Mapping):
            values = {f"{x:g}" for x in v.values()}
            v = values.pop() if len(values) == 1 else " / ".join(f"{k} {x:g}" for k, x in v.items())
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{name} {v}")
    return ", ".join(parts)


def choose_recipe(name: str, model_name: str) -> tuple[Recipe, str]:
    """(recipe, why) for ``--recipe NAME`` on a harvest of ``model_name``."""
    if name != "auto":
        return get_recipe(name), "--recipe"
    recipe = recipe_for_model(model_name)
    return recipe, f"auto: the harvest is of {model_name!r}"


def run_train(args: argparse.Namespace) -> int:
    """Run ``difract train`` (see ``difract train --help``)."""
    from difract_ext.adapters.dictionaries import SAELENS_IO
    from difract_ext.capture import HarvestReader
    from difract_ext.capture.processes import process_state
    from difract_ext.cli.sources import parse_sites
    from difract_ext.training import TrainConfig, train_dictionaries
    from difract_ext.training.recipes import recipe_specs

    reader = HarvestReader(args.data)
    sites = parse_sites(args.sites, available=reader.sites)
    recipe, why = choose_recipe(args.recipe, reader.model_name)
    given = {k: v for k, v in (("lr", args.lr), ("d_t_embed", args.d_t_embed)) if v is not None}
    specs = recipe_specs(
        recipe,
        sites,
        roles=args.roles,
        activations=args.activation,
        l1_img=args.l1_img,
        l1_txt=args.l1_txt,
        l1_sae=args.l1_sae,
        ks=args.k,
        expansion_factor=args.expansion,
        d_sae=args.d_sae,
        dead_remedy=args.dead_remedy,
        **given,
    )
    train = dict(recipe.train)
    train.update(
        {k: getattr(args, k) for k in RECIPE_TRAIN_OPTIONS if getattr(args, k) is not None}
    )
    config = TrainConfig(
        **train,
        weight_decay=args.weight_decay,
        mix_shards=args.mix_shards,
        seed=args.seed,
        auxk_coefficient=args.auxk_coefficient,
        auxk_k=args.auxk_k,
        checkpoint_every_steps=args.checkpoint_every_steps,
        checkpoint_every_seconds=args.checkpoint_every_seconds,
        stop_after_steps=args.stop_after_steps,
        log_every=args.log_every,
        include_padding=not args.no_padding,
    )
    main = process_state().is_main_process
    if main:
        print(f"recipe {recipe.name} ({why}); explicit options override it")
    result = train_dictionaries(
        reader,
        specs,
        args.out,
        config,
        io=SAELENS_IO,
        resume=args.resume,
        progress=not args.no_progress,
        keep_checkpoint=args.keep_checkpoint,
    )
    if main:
        if not result.finished:
            print(f"stopped at global step {result.global_step}; continue with --resume")
        else:
            print(train_report(result.metrics))
            print(f"dictionaries written under {result.out_dir}")
    return 0


def train_report(metrics: dict[str, dict[str, Any]]) -> str:
    """One line per dictionary (last-window EV, L0, dead, dense, verdict), then a loud summary."""
    lines = ["last training steps of each dictionary:"]
    failed = []
    for name, m in metrics.items():
        w = m.get("last_window")
        if w is None:  # a finished run of an older version, loaded by --resume
            lines.append(f"  {name}: no last-window metrics recorded; check it with `difract eval`")
            continue
        problems = quality_problems(w)
        verdict = "ok" if not problems else "FAIL: " + "; ".join(problems)
        if problems:
            failed.append(name)
        lines.append(
            f"  {name}: EV {_num(w['explained_variance'])}  L0 {_num(w['l0'], '.1f')}  "
            f"dead {w['dead_fraction']:.1%}  dense {w['dense_fraction']:.1%}  "
            f"(last {int(w['steps'])} steps)  {verdict}"
        )
    if failed:
        lines.append(
            f"WARNING: {len(failed)} of {len(metrics)} dictionaries FAIL the quality checks "
            f"(explained variance >= {MIN_EXPLAINED_VARIANCE:g}; at most "
            f"{MAX_OVERACTIVE_FRACTION:.0%} of features firing on > {OVERACTIVE_RATE:.0%} "
            "of rows): "
            f"{', '.join(failed)}. {ADVICE[0].upper()}{ADVICE[1:]}."
        )
    else:
        lines.append(
            f"all {len(metrics)} dictionaries pass the quality checks on their last training steps "
            "(confirm on held-out prompts with `difract eval`)"
        )
    return "\n".join(lines)


def _num(v: float, fmt: str = ".3f") -> str:
    return "nan" if v is None or not math.isfinite(float(v)) else format(float(v), fmt)


__all__ = ["RECIPE_TRAIN_OPTIONS", "choose_recipe", "recipe_values", "run_train", "train_report"]
