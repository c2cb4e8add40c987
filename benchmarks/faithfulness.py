"""Faithfulness of attribution graphs on the shapes model, by target kind, budget and step.

    python benchmarks/faithfulness.py [--prompts 5] [--budgets 200 1500] [--steps 0 1 2 3]
        [--lives frozen layernorm layernorm+attention] [--out FILE.jsonl] [--table]
    python benchmarks/faithfulness.py --leftover [--prompts 2] [--budgets 1500]

For each held-out two-object prompt of the shapes world (``split_prompts(2)``, first
``--prompts``), each step and each budget it builds three graphs with the shipped transcoders
and measures each with :func:`~difract_ext.attribution.faithfulness.faithfulness_report` at
1 %, 10 % and 100 % ablation (with the breakdown, DifFRACT's pairwise check, and a
features-only protocol at 100 %):

- ``x0``: how much of the first object's colour its region of x0 holds (``x0:COLOUR@REGION``);
- ``feature@argmax``: the image feature of the last double block with the largest total effect on
  that x0 target, rooted at its argmax position (DifFRACT's rooting);
- ``feature summed``: the same feature summed over every image position.

``--lives`` adds graphs built with freezes lifted (first-order edges: ``layernorm``,
``layernorm+attention``). Results are appended to ``--out`` as JSON lines (one per graph; reruns
skip what is there); ``--table`` prints the medians as the Markdown tables of BENCHMARKS.md;
``--leftover`` measures what first-order x0 graphs still miss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = (0.01, 0.1, 1.0)
#: edges of the graphs: circuit-tracer's affine graph, or freezes lifted (first-order edges)
LIVES = ["frozen", "layernorm", "layernorm+attention"]
KINDS = ("x0", "feature@argmax", "feature summed")


def _graphs(pipe, dics, prompt: str, step: int, budget: int, live: tuple[str, ...] = ()):
    """Yield ``(kind, result)`` for the three targets of one prompt, step and budget (graphs
    built with the freezes ``live`` lifted; the feature is chosen by the affine x0 graph)."""
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.attribution.effects import total_effects
    from difract_ext.cli.attribution_job import build_targets, parse_target
    from difract_ext.flux.sites import Site
    from difract_ext.replacement.inputs import capture_step_input
    from difract_ext.replacement.targets import feature_argmax, feature_target
    from difract_ext.toy.world import COLORS, parse_prompt

    first = parse_prompt(prompt).objects[0]
    spec = f"x0:{first.color}@{first.position}"
    captured = capture_step_input(pipe, prompt, step, seed=0)
    make = build_targets([parse_target(spec)], pipe, dics, COLORS)
    x0 = attribute_step(pipe.transformer, captured, dics, make, max_feature_nodes=budget)
    if live:
        yield (
            "x0",
            attribute_step(
                pipe.transformer, captured, dics, make, max_feature_nodes=budget, live=live
            ),
        )
    else:
        yield "x0", x0
    g = x0.graph
    eff = total_effects(g).effects[0]
    feats = g.active_features[g.selected_features]
    last = max(s.layer for s in dics if s.stream == "img")
    site = Site(last, "img")
    ok = (feats[:, 0] == last) & (feats[:, 2] >= 0) & (feats[:, 2] < x0.meta.d_img[last])
    idx = ok.nonzero()[:, 0]
    best = idx[eff[idx].abs().argmax()]
    feature = int(feats[best, 2])

    def argmax_target(m):
        pos = feature_argmax(m.frozen, dics, site, feature, m.clean["mlp_in"])
        return [feature_target(m.frozen, dics, site, feature, positions=[pos])]

    summed = lambda m: [feature_target(m.frozen, dics, site, feature)]  # noqa: E731
    for kind, make_target in (("feature@argmax", argmax_target), ("feature summed", summed)):
        yield (
            kind,
            attribute_step(
                pipe.transformer, captured, dics, make_target, max_feature_nodes=budget, live=live
            ),
        )


def run(args: argparse.Namespace) -> None:
    from difract_ext.adapters.checkpoints import load_shapes_dictionaries
    from difract_ext.toy import load_shapes_pipeline
    from difract_ext.toy.world import split_prompts

    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["prompt"], r["step"], r["budget"], r["kind"], r.get("live", "frozen")))
    pipe = load_shapes_pipeline()
    dics = load_shapes_dictionaries()
    _, held = split_prompts(2)
    prompts = held[: args.prompts]
    for prompt in prompts:
        for step in args.steps:
            for budget in args.budgets:
                for live_name in args.lives:
                    key = (prompt, step, budget)
                    if all((*key, k, live_name) in done for k in KINDS):
                        continue
                    live = () if live_name == "frozen" else tuple(live_name.split("+"))
                    for kind, result in _graphs(pipe, dics, prompt, step, budget, live):
                        if (*key, kind, live_name) in done:
                            continue
                        row = _measure(result, live)
                        row.update(prompt=prompt, step=step, budget=budget, kind=kind)
                        row["live"] = live_name
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        logging.info(
                            "%s step %d budget %d %s %s done", prompt, step, budget, kind, live_name
                        )


def _measure(result, live: tuple[str, ...]) -> dict:
    """The report of one graph (an affine graph: with the breakdown, the selection check and a
    features-only protocol; a first-order one: the ablation agreement and its own-model check)."""
    from difract_ext.attribution.faithfulness import FaithfulnessConfig, faithfulness_report

    t0 = time.perf_counter()
    if live:
        rep = faithfulness_report(
            result, FaithfulnessConfig(sizes=SIZES, breakdown=False, select=0, pairwise=False)
        )
        feat = None
    else:
        rep = faithfulness_report(result, FaithfulnessConfig(sizes=SIZES))
        feat = faithfulness_report(
            result,
            FaithfulnessConfig(sizes=(1.0,), breakdown=False, select=0, features_only=True),
        )["targets"][0].get("ablation")
    return {
        "label": result.targets[0].label,
        "seconds": time.perf_counter() - t0,
        "report": rep["targets"][0],
        "features_only": feat,
        "pairwise": rep.get("pairwise"),
    }


def leftover(args: argparse.Namespace) -> str:
    """What first-order graphs still miss: Spearman at 1 % of an x0 graph built with LayerNorm and
    attention live (budget ``--budgets[-1]``) against its own model, the same with the
    transcoders recomputed, and the real model, per prompt and step (a Markdown table)."""
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.adapters.checkpoints import load_shapes_dictionaries
    from difract_ext.attribution.effects import total_effects
    from difract_ext.attribution.faithfulness import ablation_agreement, agreement, top_nodes
    from difract_ext.attribution.partial import UNFROZEN, Freeze
    from difract_ext.cli.attribution_job import build_targets, parse_target
    from difract_ext.replacement.inputs import capture_step_input
    from difract_ext.toy import load_shapes_pipeline
    from difract_ext.toy.world import COLORS, parse_prompt, split_prompts

    models = {
        "own model": Freeze(attention=False, layernorm=False),
        "transcoders recomputed": Freeze(attention=False, layernorm=False, mlp="transcoder"),
        "real model": UNFROZEN,
    }
    pipe, dics = load_shapes_pipeline(), load_shapes_dictionaries()
    lines = [
        "| prompt | step | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for prompt in split_prompts(2)[1][: args.prompts]:
        first = parse_prompt(prompt).objects[0]
        make = build_targets(
            [parse_target(f"x0:{first.color}@{first.position}")], pipe, dics, COLORS
        )
        for step in args.steps:
            captured = capture_step_input(pipe, prompt, step, seed=0)
            result = attribute_step(
                pipe.transformer,
                captured,
                dics,
                make,
                max_feature_nodes=args.budgets[-1],
                live=("layernorm", "attention"),
            )
            eff = total_effects(result.graph).effects
            nodes = top_nodes(result, eff[0], 30)
            cells = []
            for freeze in models.values():
                out = ablation_agreement(result, nodes, eff, (0.01,), freeze)
                a = agreement(out["measured"][0, :, 0], out["predicted"][0, :, 0])
                cells.append(f"{a['spearman']:.2f}")
            lines.append(f"| {prompt} | {step} | " + " | ".join(cells) + " |")
            logging.info(lines[-1])
    return "\n".join(lines)


def _median(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.2f}" if values else "–"


def table(path: Path) -> str:
    every = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in every if r.get("live", "frozen") == "frozen"]
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["budget"], r["step"]), []).append(r)
    head = (
        "| target | budget | step | graphs | Spearman 1% / 10% / 100% | Pearson 1% / 100% "
        "| signs 100% | features only: Spearman 100% | Spearman 1% with attention / LayerNorm "
        "live, transcoders live, real MLP | top-10 ablation vs act×dec / random "
        "| DifFRACT pairwise Spearman / Pearson |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for (kind, budget, step), rs in sorted(
        groups.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1], kv[0][2])
    ):
        abl = [r["report"].get("ablation", {}) for r in rs]
        br = [r["report"].get("breakdown", {}) for r in rs]
        sel = [r["report"].get("selection") or {} for r in rs]

        def get(dicts, size, key):
            return [d[size][key] for d in dicts if size in d]

        def brk(name, br=br):
            return _median([b[name]["1%"]["spearman"] for b in br if name in b])

        fo = [r["features_only"] or {} for r in rs]
        pw = [r.get("pairwise") or {} for r in rs]
        pw_s = _median([p["spearman"] for p in pw if p.get("spearman") is not None])
        pw_p = _median([p["pearson"] for p in pw if p.get("pearson") is not None])
        ratio_n = [
            s["graph"] / s["activation_x_decoder"] for s in sel if s.get("activation_x_decoder")
        ]
        ratio_r = [s["graph"] / s["random_mean"] for s in sel if s.get("random_mean")]
        lines.append(
            f"| {kind} | {budget} | {step} | {len(rs)} | "
            f"{_median(get(abl, '1%', 'spearman'))} / {_median(get(abl, '10%', 'spearman'))} / "
            f"{_median(get(abl, '100%', 'spearman'))} | {_median(get(abl, '1%', 'pearson'))} / "
            f"{_median(get(abl, '100%', 'pearson'))} | "
            f"{_median(get(abl, '100%', 'sign_agreement'))} | "
            f"{_median(get(fo, '100%', 'spearman'))} | "
            f"{brk('attention live')} / {brk('layernorm live')}, {brk('transcoders live')}, "
            f"{brk('real mlp')} | {_median(ratio_n)}× / {_median(ratio_r)}× | {pw_s} / {pw_p} |"
        )
    secs = [r["seconds"] for r in rows]
    lines.append("")
    lines.append(
        f"{len(rows)} graphs; report time per graph: median {statistics.median(secs):.1f} s"
    )
    lives = sorted({r.get("live", "frozen") for r in every}, key=LIVES.index)
    if len(lives) > 1:
        lines += ["", live_table(every, lives)]
    return "\n".join(lines)


def live_table(rows: list[dict], lives: list[str]) -> str:
    """Affine vs first-order graphs: median agreement by target kind, budget and edges."""
    lines = [
        "| target | budget | edges | graphs | Spearman 1% / 10% / 100% | Pearson 1% / 100% "
        "| signs 1% / 100% | own-model error (1%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["budget"], r.get("live", "frozen")), []).append(r)
    for (kind, budget, live), rs in sorted(
        groups.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1], lives.index(kv[0][2]))
    ):
        abl = [r["report"].get("ablation", {}) for r in rs]

        def get(size, key, abl=abl):
            return [d[size][key] for d in abl if size in d]

        own = [
            r["report"].get("own_model_rel_error", r["report"].get("frozen_max_rel_error"))
            for r in rs
        ]
        lines.append(
            f"| {kind} | {budget} | {live} | {len(rs)} | {_median(get('1%', 'spearman'))} / "
            f"{_median(get('10%', 'spearman'))} / {_median(get('100%', 'spearman'))} | "
            f"{_median(get('1%', 'pearson'))} / {_median(get('100%', 'pearson'))} | "
            f"{_median(get('1%', 'sign_agreement'))} / {_median(get('100%', 'sign_agreement'))} | "
            f"{_sci(own)} |"
        )
    return "\n".join(lines)


def _sci(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.0e}" if values else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--budgets", type=int, nargs="+", default=[200, 1500])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument(
        "--lives",
        nargs="+",
        choices=LIVES,
        default=["frozen"],
        help="graph edges to measure: the affine graph and/or first-order graphs",
    )
    ap.add_argument("--out", default="benchmarks/faithfulness.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    ap.add_argument(
        "--leftover",
        action="store_true",
        help="what first-order x0 graphs still miss (own model / transcoders recomputed / real "
        "model, Spearman at 1 %%) over --prompts x --steps at the last --budgets; prints a table",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table:
        print(table(Path(args.out)))
        return
    if args.leftover:
        print(leftover(args))
        return
    run(args)


if __name__ == "__main__":
    main()
