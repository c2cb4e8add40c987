"""Train, evaluate and ship the shapes model's transcoders and SAEs (reproducible, resumable).

Stages (each resumes or is skipped when its output exists; ``--fresh`` starts over):

1. **harvest**: every double-block MLP (both streams) of the shipped shapes model over the train
   prompts (``shapes:train`` × ``--seeds``; image tokens subsampled 1/``--img-subsample``, every
   text position, T5 padding included and tagged: FLUX attends to it and DifFRACT trains on it),
   and over the held-out prompts (``shapes:held_out``, other seeds, every token).
2. **train**, one pass for everything: DifFRACT-recipe ReLU transcoders for every MLP and SAE
   baselines on ``--sae-layers`` at the shipping sparsity, plus a sweep of sparsity levels
   (transcoder vs SAE, ReLU L1 and TopK k) on ``--sweep-sites`` for the curves. Shipping L1 is
   per stream (``--l1-img``/``--l1-txt``) with per-site overrides (``--l1-site img_0=3e-3``);
   dead features are resampled while silent for 100 steps *or* rarer than
   ``--resample-min-rate`` (rare training features are often never active on held-out prompts).
   Targets on the held-out harvest, every shipped transcoder: EV >= 0.9 (text: over every
   position, padding included), dead < 5%, L0 <= 25%. ``--streams txt`` trains (and ships) only
   the text stream's dictionaries and keeps the shipped image ones as they are; the sweep on the
   other streams' ``--sweep-sites`` is still trained (in ``dicts-sweep/``), for the curves.
3. **eval** on the held-out harvest: FVU / EV / cosine / L0 / dead / dense per timestep and, for
   text, over real tokens and padding apart; curves, spliced generation (each MLP alone, then
   all) with the shapes analyzer's prompt adherence. Shipped dictionaries of streams not trained
   (``--streams``) are evaluated alongside.
4. **ship**: the shipping dictionaries to
   ``difract_ext/toy/dictionaries/{transcoders,saes}/{site}/`` (SAELens folders + ``metrics.json``
   with the held-out numbers), ``index.json``, ``EVAL.md`` and the curves PNG.

Single-stream blocks are not included: their MLP output is fused with attention in ``proj_out``
(no separate "MLP output before the gate"), and :class:`~difract_ext.flux.sites.Site` has no such
site yet.

Usage::

    # harvests, then ~15 min of training (2 cores):
    python scripts/train_shapes_dictionaries.py
    # smoke test:
    python scripts/train_shapes_dictionaries.py --quick --no-ship --work /tmp/sd
    # the text dictionaries only (image ones stay as shipped):
    python scripts/train_shapes_dictionaries.py --streams txt
    # SAEs of layers 0 and 3 added to the shipped ones (the steering baseline's other layers):
    python scripts/train_shapes_dictionaries.py --add-saes 0 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from difract_ext.adapters.dictionaries import SAELENS_IO
from difract_ext.capture import TEXT_PADDING, HarvestConfig, HarvestReader, harvest
from difract_ext.cli.eval_job import run_evaluation
from difract_ext.cli.sources import double_block_sites, load_pipeline, load_prompts
from difract_ext.flux.sites import STREAMS, Site
from difract_ext.training import (
    DictionarySpec,
    TrainConfig,
    TrainedDictionary,
    load_dictionaries,
    train_dictionaries,
)
from difract_ext.training.recipes import RECIPES
from difract_ext.util.atomic import atomic_directory, atomic_write_bytes, atomic_write_json

logger = logging.getLogger("train_shapes_dictionaries")
R = RECIPES["shapes"]  # the shipping defaults (also `difract train --recipe shapes`)
REPO = Path(__file__).resolve().parents[1]
SHIP_DIR = REPO / "difract_ext" / "toy" / "dictionaries"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--work", default=str(REPO / "runs" / "shapes-dictionaries"), help="working folder"
    )
    p.add_argument("--model", default="shapes", help="pipeline spec ('shapes' or 'shapes:FOLDER')")
    p.add_argument("--ship-dir", default=str(SHIP_DIR), help="where the shipped dictionaries go")
    p.add_argument("--no-ship", action="store_true", help="stop after the evaluation")
    p.add_argument("--no-splice", action="store_true", help="skip spliced generation")
    p.add_argument("--fresh", action="store_true", help="delete the working folder first")
    p.add_argument(
        "--retrain",
        action="store_true",
        help="keep the harvests but train and evaluate again (after changing a recipe option)",
    )
    p.add_argument("--quick", action="store_true", help="tiny run to check the script")
    p.add_argument(
        "--streams",
        nargs="+",
        choices=list(STREAMS),
        default=list(STREAMS),
        help="streams whose dictionaries are trained and shipped; the shipped dictionaries of "
        "the others are kept as they are (and evaluated alongside)",
    )
    p.add_argument(
        "--text-padding",
        choices=list(TEXT_PADDING),
        default="tag",
        help="T5 padding rows in the harvests: 'tag' keeps (and trains on) them, tagged so that "
        "the evaluation reports them apart; 'drop' was the choice before the padding retrain",
    )
    p.add_argument("--seeds", type=int, default=6, help="train seeds per prompt (0..N-1)")
    p.add_argument(
        "--held-seeds",
        type=int,
        default=6,
        help="held-out seeds per prompt (1000..); 'dead' = never active on the held-out harvest, "
        "so too few rows count rare features as dead (2 seeds: ~1 in 30 of img_1's features)",
    )
    p.add_argument("--img-subsample", type=int, default=4, help="keep 1/N image tokens per step")
    p.add_argument(
        "--expansion-img",
        type=float,
        default=R.expansion["img"],
        help="d_sae / d_model, image stream",
    )
    p.add_argument(
        "--expansion-txt",
        type=float,
        default=R.expansion["txt"],
        help="d_sae / d_model, text stream (few distinct token contexts: wider dies)",
    )
    p.add_argument(
        "--expansion-site",
        nargs="*",
        default=[],
        metavar="SITE=X",
        help="shipping width overrides per site (d_sae / d_model)",
    )
    p.add_argument(
        "--d-t-embed", type=int, default=R.d_t_embed, help="timestep embedding width (small files)"
    )
    p.add_argument("--l1-img", type=float, default=R.l1["img"], help="shipping L1 (image stream)")
    p.add_argument("--l1-txt", type=float, default=R.l1["txt"], help="shipping L1 (text stream)")
    p.add_argument(
        "--l1-sae",
        type=float,
        default=R.l1_sae["img"],
        help="shipping L1 of the SAE baselines (an SAE reconstructs its own input, so the same "
        "sparsity needs a stronger penalty than a transcoder's)",
    )
    p.add_argument(
        "--l1-site",
        nargs="*",
        default=[f"{k}={v:g}" for k, v in R.l1_site.items()],
        metavar="SITE=L1",
        help="shipping L1 overrides per site (img_0's MLP is the most linear: at the stream's L1 "
        "its transcoder is dense; txt_0's features die late in training, the fewer the lower "
        "its L1: dead on held-out prompts 0-7 %% at 4e-4, 1-4 %% at 2e-4 over 5-6 seeds, "
        "EV and L0 nearly unchanged; see BENCHMARKS.md)",
    )
    p.add_argument(
        "--sweep-l1",
        type=float,
        nargs="+",
        default=[3e-4, 3e-3, 1e-2, 3e-2],
        help="extra L1 levels on the sweep sites (the shipping level is added)",
    )
    p.add_argument(
        "--sweep-k", type=int, nargs="+", default=[8, 16, 32], help="TopK levels on the sweep sites"
    )
    p.add_argument(
        "--sweep-sites",
        nargs="+",
        default=["img_1", "txt_1"],
        help="sites with a transcoder-vs-SAE sweep",
    )
    p.add_argument(
        "--sae-layers", type=int, nargs="+", default=[1, 2], help="layers with shipped SAEs"
    )
    p.add_argument(
        "--add-saes",
        type=int,
        nargs="+",
        default=[],
        metavar="LAYER",
        help="only train SAEs of these layers (both streams, the shipping recipe) on the "
        "existing harvest, evaluate them and add them to the shipped folder (nothing else "
        "shipped changes; their own working folder: dicts-saes-LAYERS)",
    )
    p.add_argument("--lr", type=float, default=R.lr, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=R.train["batch_size"], help="rows per step")
    p.add_argument(
        "--epochs", type=int, default=R.train["epochs"], help="passes over the train harvest"
    )
    p.add_argument(
        "--resample-min-rate",
        type=float,
        default=R.train["resample_min_rate"],
        help="also resample features firing on fewer than this fraction of rows between checks "
        "(rare features are the ones never active on held-out prompts)",
    )
    p.add_argument(
        "--resample-until",
        type=float,
        default=R.train["resample_until"],
        help="no resampling after this fraction of training",
    )
    p.add_argument(
        "--splice-prompts", type=int, default=64, help="held-out prompts for spliced generation"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    args.l1_site = parse_site_levels(args.l1_site, p, "--l1-site")
    args.expansion_site = parse_site_levels(args.expansion_site, p, "--expansion-site")
    return args


def parse_site_levels(
    items: list[str], parser: argparse.ArgumentParser, option: str
) -> dict[str, float]:
    """``["img_0=3e-3", ...]`` -> ``{"img_0": 0.003, ...}`` (errors through ``parser``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            out[str(Site.parse(key))] = float(value)
        except ValueError:
            parser.error(f"{option} expects SITE=VALUE with SITE like img_0 or txt_3, got {item!r}")
    return out


def stage_harvest(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    loaded = load_pipeline(args.model)
    sites = double_block_sites(loaded.pipe.transformer)
    train_prompts, held_prompts = load_prompts("shapes:train"), load_prompts("shapes:held_out")
    if args.quick:
        train_prompts, held_prompts = train_prompts[::20], held_prompts[::10]
    common = dict(
        sites=sites,
        shard_rows=65536,
        text_padding=args.text_padding,
        dtype="bfloat16",
        call_kwargs=loaded.call_kwargs,
        model_name=loaded.model_name,
        text_subsample=1,
    )
    out = []
    # held-out: every image token (more rows make "never active" = dead a fairer count)
    # held-out batch 8: the shipped evaluation's harvest was made so (batching is part of a
    # harvest's identity)
    for name, prompts, seeds, sub, batch in (
        ("harvest-train", train_prompts, range(args.seeds), args.img_subsample, 32),
        ("harvest-held", held_prompts, range(1000, 1000 + args.held_seeds), 1, 8),
    ):
        t0 = time.time()
        cfg = HarvestConfig(seeds=list(seeds), subsample=sub, batch_size=batch, **common)
        res = harvest(loaded.pipe, prompts, work / name, cfg, resume=True)
        logger.info(
            "%s: %d prompts x %d seeds -> rows %s in %.0f s",
            name,
            len(prompts),
            len(seeds),
            res.rows,
            time.time() - t0,
        )
        out.append(work / name)
    return out[0], out[1]


def ship_specs(
    args: argparse.Namespace, sites: list[Site]
) -> tuple[list[DictionarySpec], list[DictionarySpec], list[DictionarySpec]]:
    """(shipping specs of ``--streams``, those plus their sweep, the sweep of the other streams).

    The sweep of a stream not trained leaves out its shipping specs: the shipped dictionaries
    (kept as they are) are those points.
    """
    lam = {"img": args.l1_img, "txt": args.l1_txt}
    width = {"img": args.expansion_img, "txt": args.expansion_txt}

    def common(site: Site) -> dict:
        factor = args.expansion_site.get(str(site), width[site.stream])
        return dict(expansion_factor=factor, d_t_embed=args.d_t_embed, lr=args.lr)

    def ship_l1(site: Site) -> float:
        return args.l1_site.get(str(site), lam[site.stream])

    unknown = sorted((set(args.l1_site) | set(args.expansion_site)) - {str(s) for s in sites})
    if unknown:
        raise SystemExit(
            f"--l1-site / --expansion-site name sites that were not harvested: {unknown}"
        )
    every = [
        DictionarySpec(s, "transcoder", "relu", l1_coefficient=ship_l1(s), **common(s))
        for s in sites
    ]
    every += [
        DictionarySpec(s, "sae", "relu", l1_coefficient=args.l1_sae, **common(s))
        for s in sites
        if s.layer in args.sae_layers
    ]
    names = {s.resolved_name for s in every}
    sweep = []
    for key in args.sweep_sites:
        site = next(s for s in sites if str(s) == key)
        for role in ("transcoder", "sae"):
            for level in sorted(
                set(args.sweep_l1) | {ship_l1(site) if role == "transcoder" else args.l1_sae}
            ):
                sweep.append(
                    DictionarySpec(site, role, "relu", l1_coefficient=level, **common(site))
                )
            for k in args.sweep_k:
                sweep.append(DictionarySpec(site, role, "topk", k=k, **common(site)))
    sweep = [s for s in sweep if s.resolved_name not in names]
    ship = [s for s in every if s.site.stream in args.streams]
    mine = ship + [s for s in sweep if s.site.stream in args.streams]
    return ship, mine, [s for s in sweep if s.site.stream not in args.streams]


def kept_dictionaries(args: argparse.Namespace) -> list[TrainedDictionary]:
    """The shipped dictionaries of the streams this run does not train (named as in a run)."""
    if set(args.streams) == set(STREAMS):
        return []
    if not (Path(args.ship_dir) / "index.json").is_file():
        raise SystemExit(
            f"--streams {' '.join(args.streams)} keeps the others' dictionaries from "
            f"{args.ship_dir}, which has none: train every stream"
        )
    return [
        dataclasses.replace(d, name=d.spec.resolved_name)
        for d in load_dictionaries(args.ship_dir, io=SAELENS_IO)
        if d.spec.site.stream not in args.streams
    ]


def ship_one(src: Path, dst: Path, spec: DictionarySpec, evals: dict) -> dict:
    """Copy one trained dictionary ``src`` into the shipped folder ``dst`` (SAELens files,
    ``training.json``, ``metrics.json`` with its held-out evaluation); returns its index entry."""
    for f in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy2(src / f, dst / f)
    training = json.loads((src / "training.json").read_text())
    training["data"]["root"] = "runs/shapes-dictionaries/harvest-train (shapes:train prompts)"
    atomic_write_json(dst / "training.json", training)
    metrics = json.loads((src / "metrics.json").read_text())
    metrics["held_out"] = evals[spec.resolved_name]["groups"]
    atomic_write_json(dst / "metrics.json", metrics)
    m = metrics["held_out"]["all"]
    split = {  # text: "all" includes T5 padding; real tokens and padding apart
        f"explained_variance_{g}": metrics["held_out"][g]["explained_variance"]
        for g in ("real", "padding")
        if g in metrics["held_out"]
    }
    return {
        **split,
        "path": f"{spec.role}s/{spec.site}",
        "site": str(spec.site),
        "role": spec.role,
        "variant": spec.variant,
        "d_sae": evals[spec.resolved_name]["d_sae"],
        "explained_variance": m["explained_variance"],
        "l0": m["l0"],
        "dead_fraction": m["dead_fraction"],
        "dense_fraction": m["dense_fraction"],
    }


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The shipping recipe's training configuration with this run's options."""
    return TrainConfig(
        **{
            **R.train,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "resample_until": args.resample_until,
            "resample_min_rate": args.resample_min_rate,
        },
        log_every=100,
        seed=0,
    )


def stage_ship(
    args: argparse.Namespace,
    work: Path,
    ship: list[DictionarySpec],
    kept: list[TrainedDictionary],
) -> None:
    """Write the shipping folder: this run's ``ship`` dictionaries, the ``kept`` ones copied as
    they are (files and index entries unchanged)."""
    evals = {e["name"]: e for e in json.loads((work / "eval" / "eval.json").read_text())["evals"]}
    splice = (
        json.loads((work / "eval" / "splice.json").read_text())
        if (work / "eval" / "splice.json").is_file()
        else []
    )
    index = []
    ship_dir = Path(args.ship_dir)
    old_index = (
        {e["path"]: e for e in json.loads((ship_dir / "index.json").read_text())["dictionaries"]}
        if kept
        else {}
    )
    # the shipped folder is this script's own output: replaced whole
    with atomic_directory(ship_dir, owned=None) as tmp:
        for d in kept:
            rel = d.path.relative_to(ship_dir).as_posix()
            shutil.copytree(d.path, tmp / rel)
            index.append(old_index[rel])
        for spec in ship:
            dst = tmp / f"{spec.role}s" / str(spec.site)
            dst.mkdir(parents=True)
            index.append(ship_one(work / "dicts" / spec.resolved_name, dst, spec, evals))
        atomic_write_json(
            tmp / "index.json",
            {"model": "difract-ext/shapes-flux", "dictionaries": index, "splice": splice},
        )
        shutil.copy2(work / "eval" / "sparsity_faithfulness.png", tmp / "sparsity_faithfulness.png")
        report = (
            (work / "eval" / "eval.md").read_text().replace(f"{REPO}/", "")
        )  # repo-relative paths
        atomic_write_bytes(tmp / "EVAL.md", report.encode())
    size = sum(p.stat().st_size for p in ship_dir.rglob("*") if p.is_file())
    logger.info(
        "shipped %d dictionaries to %s (%.1f MB)", len(ship) + len(kept), ship_dir, size / 2**20
    )
    if size > 15 * 2**20:
        logger.warning("shipped size %.1f MB exceeds the 15 MB budget", size / 2**20)


def stage_add_saes(args: argparse.Namespace, work: Path, train_dir: Path, held_dir: Path) -> None:
    """``--add-saes``: SAEs of more layers, trained, evaluated and added to the shipped folder."""
    layers = sorted(set(args.add_saes))
    sites = [s for s in HarvestReader(train_dir).sites if s.layer in layers]
    if len(sites) != 2 * len(layers):
        raise SystemExit(f"--add-saes {layers}: the harvest has no double block of some layer")
    ship_dir = Path(args.ship_dir)
    index = json.loads((ship_dir / "index.json").read_text())
    have = {(e["site"], e["role"]) for e in index["dictionaries"]}
    if any((str(s), "sae") in have for s in sites):
        raise SystemExit(f"{ship_dir} already ships an SAE of a site in {[str(s) for s in sites]}")
    specs = [
        DictionarySpec(
            s,
            "sae",
            "relu",
            l1_coefficient=args.l1_sae,
            expansion_factor=args.expansion_site.get(
                str(s), {"img": args.expansion_img, "txt": args.expansion_txt}[s.stream]
            ),
            d_t_embed=args.d_t_embed,
            lr=args.lr,
        )
        for s in sites
    ]
    name = "saes-" + "-".join(map(str, layers))
    cfg = train_config(args)
    train_dictionaries(train_dir, specs, work / f"dicts-{name}", cfg, io=SAELENS_IO, resume=True)
    dicts = load_dictionaries(work / f"dicts-{name}", io=SAELENS_IO)
    summary_dir = work / f"eval-{name}"
    run_evaluation(dicts, held_dir, summary_dir, pipeline=None)
    evals = {e["name"]: e for e in json.loads((summary_dir / "eval.json").read_text())["evals"]}
    for spec in specs:
        with atomic_directory(ship_dir / "saes" / str(spec.site), owned=None) as tmp:
            entry = ship_one(work / f"dicts-{name}" / spec.resolved_name, tmp, spec, evals)
        index["dictionaries"].append(entry)
    atomic_write_json(ship_dir / "index.json", index)
    report = (summary_dir / "eval.md").read_text().replace(f"{REPO}/", "")
    text = (ship_dir / "EVAL.md").read_text()
    title = f"\n\n## SAEs of layers {', '.join(map(str, layers))} (added with --add-saes)\n\n"
    atomic_write_bytes(ship_dir / "EVAL.md", (text.rstrip() + title + report).encode())
    logger.info("added %d SAEs to %s", len(specs), ship_dir)


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    if args.retrain:
        for sub in ("dicts", "dicts-sweep", "eval"):
            shutil.rmtree(work / sub, ignore_errors=True)
    if args.quick:
        args.epochs, args.splice_prompts, args.sweep_l1, args.sweep_k = 1, 4, [1e-2], [8]
        args.sweep_sites = args.sweep_sites[:1]
    train_dir, held_dir = stage_harvest(args, work)
    if args.add_saes:
        stage_add_saes(args, work, train_dir, held_dir)
        return
    sites = HarvestReader(train_dir).sites
    ship, specs, other_sweep = ship_specs(args, sites)
    logger.info(
        "training %d dictionaries (%d shipped), and %d of the other streams' sweep",
        len(specs),
        len(ship),
        len(other_sweep),
    )
    cfg = train_config(args)
    t0 = time.time()
    train_dictionaries(train_dir, specs, work / "dicts", cfg, io=SAELENS_IO, resume=True)
    if other_sweep:  # a folder of its own: the run of --streams stays the same run
        train_dictionaries(
            train_dir, other_sweep, work / "dicts-sweep", cfg, io=SAELENS_IO, resume=True
        )
    logger.info("training took %.0f s", time.time() - t0)
    from difract_ext.toy.analyzer import accuracy_report

    loaded = load_pipeline(args.model)
    held_prompts = HarvestReader(held_dir).prompts
    step = max(1, len(held_prompts) // args.splice_prompts)
    kept = kept_dictionaries(args)
    dicts = load_dictionaries(work / "dicts", io=SAELENS_IO) + kept
    if other_sweep:
        dicts += load_dictionaries(work / "dicts-sweep", io=SAELENS_IO)
    run_evaluation(
        dicts,
        held_dir,
        work / "eval",
        pipeline=None if args.no_splice else loaded.pipe,
        call_kwargs=loaded.call_kwargs,
        splice_prompts=held_prompts[::step][: args.splice_prompts],
        splice_seeds=[2000],
        splice_variant=[s.resolved_name for s in ship if s.role == "transcoder"]
        + [d.name for d in kept if d.spec.role == "transcoder"],
        score_images=accuracy_report,
    )
    print((work / "eval" / "eval.md").read_text())
    if not args.no_ship:
        stage_ship(args, work, ship, kept)


if __name__ == "__main__":
    main()
