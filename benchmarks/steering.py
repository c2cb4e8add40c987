#!/usr/bin/env python
"""Circuit-guided vs SAE steering on colour edits of the shapes model, scored by the analyzer.

    HF_HUB_OFFLINE=1 python benchmarks/steering.py                  # 30 tasks x 4 seeds (resumes)
    HF_HUB_OFFLINE=1 python benchmarks/steering.py --tasks 2 --seeds 0 --strengths 1 --out /tmp/s
    HF_HUB_OFFLINE=1 python benchmarks/steering.py --attribute shape --tasks 10 \
        --out benchmarks/results/steering-shape --no-diagnosis --no-binding   # shape edits

Tasks: colour edits ("make the left object blue") of prompts the model draws correctly at every
seed (24 two-object and 6 one-object prompts by default, chosen in a fixed random order; the new
colour differs from every object's). Methods (one ``Intervention`` API, both applied through
``FluxModel.run_intervention`` as deltas on the true MLP outputs):

- ``circuit``: graphs of ``x0·old @ pos`` (source prompt) and ``x0·new @ pos`` (concept prompt) at
  steps 0 and 1, seed 0; top-``k`` nodes of each: ablate the source's, set the concept's to their
  graph activation, at their position and step only; strength interpolates/extrapolates;
- ``sae``: the shipped SAEs (img_1, img_2, txt_1, txt_2); top-``k`` features per site by mean
  activation difference concept − source prompt (over the seeds, positions, steps), each added
  by its difference × strength at every position and step.

Also: an upper bound of MLP-feature steering on one edit (``OUT/diagnosis.json``: every text
feature at the colour word, or every image feature of the target's half, set to the concept
run's values) and the binding errors of 200 two-object prompts with a circuit-guided repair
(``x0·colour`` or ``x0·shape`` graphs of the failing seed and a correct one; ``OUT/binding.json``)
and the graph files of the first case (``OUT/binding_graphs/``). Writes ``OUT/results.json``,
``OUT/table.md``, ``OUT/success_vs_collateral.png`` and ``OUT/examples.png``; every stage is
cached in ``OUT`` (tasks, interventions, scores per method and strength, diagnosis, binding), so
a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "steering"
CIRCUIT_STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
SAE_STRENGTHS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
EXAMPLE_ROWS = (("circuit", 4.0), ("circuit", 32.0), ("sae", 32.0), ("sae", 64.0))
log = logging.getLogger("steering")


def select_tasks(
    flux, n_tasks: int, seeds: list[int], rng_seed: int = 0, attribute: str = "color"
) -> list:
    """Colour (or shape) edit tasks on prompts the model draws correctly at every seed; a new
    colour differs from every object's, a new shape from the edited object's."""
    from difract_ext.cli.steer_job import run_edits
    from difract_ext.intervene.metrics import EditTask
    from difract_ext.toy.analyzer import score
    from difract_ext.toy.world import COLORS, SHAPES, all_prompts, parse_prompt

    rng = np.random.default_rng(rng_seed)
    n_single = max(1, n_tasks // 5) if n_tasks > 1 else 0
    want = {2: n_tasks - n_single, 1: n_single}
    tasks: list = []
    for n_obj, n_want in want.items():
        pool = all_prompts(n_obj)
        order = [pool[i] for i in rng.permutation(len(pool))]
        found = 0
        for lo in range(0, len(order), 8):
            if found >= n_want:
                break
            cands = []
            for p in order[lo : lo + 8]:
                objs = parse_prompt(p).objects
                target = objs[int(rng.integers(len(objs)))]
                if attribute == "color":
                    free = [c for c in COLORS if c not in {o.color for o in objs}]
                else:
                    free = [s for s in SHAPES if s != target.shape]
                cands.append(
                    EditTask(p, target.position, attribute, free[int(rng.integers(len(free)))])
                )
            images, _, _ = run_edits(flux, cands, [None] * len(cands), seeds)
            for j, t in enumerate(cands):
                ims = images[j * len(seeds) : (j + 1) * len(seeds)]
                if found < n_want and all(score(im, t.prompt).fully_correct for im in ims):
                    tasks.append(t)
                    found += 1
    return tasks


def matched(curve: list[dict], level: float, key: str) -> float | None:
    """``key`` at success ``level`` on a method's strength curve (linear between the first two
    consecutive strengths whose success brackets ``level``; None if never reached)."""
    pts = sorted(curve, key=lambda r: r["strength"])
    if pts and pts[0]["success"] >= level:
        return pts[0][key]
    for a, b in zip(pts, pts[1:]):
        if a["success"] < level <= b["success"]:
            w = (level - a["success"]) / (b["success"] - a["success"])
            return a[key] + w * (b[key] - a[key])
    return None


def diagnose(flux, seeds: list[int]) -> dict:
    """Upper bounds of MLP-feature steering on one edit: set *every* transcoder feature of the
    text stream at the colour word's token, or of the image stream at every patch of the
    target's half, at every layer and step, to its value in the concept prompt's run (same seed).
    """
    import torch

    from difract_ext.cli.steer_job import run_edits, score_runs
    from difract_ext.flux.directions import region_patches
    from difract_ext.intervene.metrics import EditTask, summarize
    from difract_ext.intervene.spec import FeatureEdit, Intervention

    task = EditTask.parse(
        "a red circle on the left and a green square on the right", "left:color=blue"
    )
    words = task.prompt.split()
    token = 1 if task.target_index == 0 else words.index("and") + 2  # one T5 token per word
    n_layers = len(flux.pipeline.transformer.transformer_blocks)
    with flux.trace(
        [task.concept_prompt] * len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ) as tracer:
        rec = list().save()
        for _ in tracer.steps():
            for layer in range(n_layers):
                rec.append((layer, "img", flux.transcoders[layer].ff.features.output.clone()))
                rec.append(
                    (layer, "txt", flux.transcoders[layer].ff_context.features.output.clone())
                )
    cols = 8
    half = [r * cols + c for r, c in region_patches(task.position, (8, cols))]
    base, _, _ = run_edits(flux, [task], [None], seeds)
    out = {"task": str(task), "seeds": seeds}
    for name, stream, positions in (("text_token", "txt", [token]), ("image_half", "img", half)):
        edits = []
        for i, (layer, st, z) in enumerate(rec):
            if st != stream:
                continue
            step = i // (2 * n_layers)
            for row in range(len(seeds)):
                for p in positions:
                    for f in range(z.shape[-1]):
                        edits.append(
                            FeatureEdit(
                                f"{st}_{layer}",
                                f,
                                "set",
                                float(z[row, p, f]),
                                positions=[p],
                                steps=[step],
                                rows=[row],
                            )
                        )
        edited, _, _ = run_edits(flux, [task], [Intervention(tuple(edits))], seeds)
        out[name] = {"edits": len(edits), **summarize(score_runs([task], seeds, base, edited))}
        log.info("diagnosis %s: %s", name, out[name])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--k", type=int, default=8, help="features per graph / per SAE site")
    ap.add_argument("--graph-steps", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-feature-nodes", type=int, default=60)
    ap.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=None,
        help="one sweep for both methods (default: each its own)",
    )
    ap.add_argument(
        "--attribute",
        choices=("color", "shape"),
        default="color",
        help="what the tasks edit (shape: x0·shape graphs; write to another --out)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-diagnosis", action="store_true", help="skip the upper-bound check")
    ap.add_argument("--no-binding", action="store_true", help="skip the binding-error repairs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import difract_ext
    from difract_ext.adapters.tracing import FluxModel
    from difract_ext.cli.steer_job import (
        circuit_intervention,
        run_edits,
        sae_intervention,
        score_runs,
        write_grid,
    )
    from difract_ext.intervene.metrics import EditScore, EditTask, summarize
    from difract_ext.intervene.spec import Intervention
    from difract_ext.toy import load_shapes_pipeline
    from difract_ext.util.atomic import atomic_write_bytes, atomic_write_json

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_shapes_pipeline()
    tcs = difract_ext.load_shapes_dictionaries()
    saes = difract_ext.load_shapes_dictionaries(role="sae")
    flux = FluxModel(pipe, transcoders=tcs)
    seeds = list(args.seeds)
    t_start = time.time()

    tasks_file = out / "tasks.json"
    if tasks_file.exists():
        tasks = [EditTask(**d) for d in json.loads(tasks_file.read_text())]
    else:
        tasks = select_tasks(flux, args.tasks, seeds, attribute=args.attribute)
        atomic_write_json(tasks_file, [t.__dict__ for t in tasks])
    log.info("%d tasks", len(tasks))

    ivs: dict[str, list[Intervention]] = {"circuit": [], "sae": []}
    for i, task in enumerate(tasks):
        for method in ivs:
            f = out / "interventions" / f"{method}_{i:03d}.json"
            if f.exists():
                iv = Intervention.from_dict(json.loads(f.read_text()))
            elif method == "circuit":
                iv = circuit_intervention(
                    pipe,
                    tcs,
                    task,
                    seed=seeds[0],
                    steps=args.graph_steps,
                    k=args.k,
                    max_feature_nodes=args.max_feature_nodes,
                )
            else:
                iv = sae_intervention(flux, saes, task, seeds, k=args.k)
            if not f.exists():
                f.parent.mkdir(exist_ok=True)
                atomic_write_json(f, iv.to_dict())
            ivs[method].append(iv)
        log.info("interventions %d/%d (%.0f s)", i + 1, len(tasks), time.time() - t_start)

    base, _, _ = run_edits(flux, tasks, [None] * len(tasks), seeds)
    strengths = {
        "circuit": tuple(args.strengths or CIRCUIT_STRENGTHS),
        "sae": tuple(args.strengths or SAE_STRENGTHS),
    }
    scores: dict[str, dict[float, list[EditScore]]] = {"circuit": {}, "sae": {}}
    for method, sweep in strengths.items():
        for s in sweep:
            f = out / "scores" / f"{method}_{s:g}.json"
            if f.exists():
                scores[method][s] = [EditScore(**d) for d in json.loads(f.read_text())]
                continue
            edited, _, _ = run_edits(
                flux,
                tasks,
                [iv.with_strength(s) for iv in ivs[method]],
                seeds,
                dictionaries=saes if method == "sae" else None,
            )
            scores[method][s] = score_runs(tasks, seeds, base, edited)
            f.parent.mkdir(exist_ok=True)
            atomic_write_json(f, [sc.to_dict() for sc in scores[method][s]])
            log.info("%s x%g done (%.0f s)", method, s, time.time() - t_start)

    diag_file = out / "diagnosis.json"
    if not args.no_diagnosis and not diag_file.exists():
        atomic_write_json(diag_file, diagnose(flux, seeds))
    diagnosis = json.loads(diag_file.read_text()) if diag_file.exists() else None

    bind_file = out / "binding.json"
    if not args.no_binding and not bind_file.exists():
        from steering_binding import binding_repair

        atomic_write_json(bind_file, binding_repair(flux, pipe, tcs, out, seeds, k=args.k))
    binding = json.loads(bind_file.read_text()) if bind_file.exists() else None

    curves = {
        m: [{"strength": s, **summarize(v)} for s, v in sorted(by.items())]
        for m, by in scores.items()
    }
    # per item: the smallest strength that succeeds, and the collateral there
    per_item: dict[str, list[dict | None]] = {}
    for m, by in scores.items():
        items: list[dict | None] = []
        for j in range(len(tasks) * len(seeds)):
            hit = next(((s, by[s][j]) for s in sorted(by) if by[s][j].success), None)
            items.append(None if hit is None else {"strength": hit[0], **hit[1].to_dict()})
        per_item[m] = items
    both = [
        j
        for j in range(len(per_item["circuit"]))
        if per_item["circuit"][j] is not None and per_item["sae"][j] is not None
    ]
    item_cmp = {
        m: {
            k: float(np.mean([per_item[m][j][k] for j in both])) if both else None
            for k in ("attribute_collateral", "pixel_collateral")
        }
        for m in per_item
    }
    any_success = {m: float(np.mean([x is not None for x in per_item[m]])) for m in per_item}
    levels = [0.025, 0.05, 0.1, 0.25, 0.5, 0.9]
    at_level = {
        f"{lvl:g}": {
            m: {k: matched(curves[m], lvl, k) for k in ("attribute_collateral", "pixel_collateral")}
            for m in curves
        }
        for lvl in levels
    }
    # circuit colour edits: share of tasks where most seeds succeed with <= 5 % attribute collateral
    best_task_rate = 0.0
    for sc in scores["circuit"].values():
        n_s = len(seeds)
        ok = [
            np.mean(
                [x.success and x.attribute_collateral <= 0.05 for x in sc[i * n_s : (i + 1) * n_s]]
            )
            >= 0.5
            for i in range(len(tasks))
        ]
        best_task_rate = max(best_task_rate, float(np.mean(ok)))
    results = {
        "tasks": len(tasks),
        "seeds": seeds,
        "k": args.k,
        "graph_steps": args.graph_steps,
        "curves": curves,
        "matched_success": at_level,
        "per_item_matched": {"n_both_succeed": len(both), **item_cmp},
        "any_strength_success": any_success,
        "circuit_task_success_with_low_collateral": best_task_rate,
        "upper_bound_diagnosis": diagnosis,
        "binding": None
        if binding is None
        else {
            k: binding.get(k)
            for k in (
                "checked",
                "binding_errors",
                "repaired_items",
                "no_wrong_position",
                "by_attribute",
                "no_correct_seed",
                "repair_rate",
                "repair_rate_any_strength",
                "attributes_broken",
                "graph_files",
            )
        },
        "seconds": time.time() - t_start,
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "table.md", table(results).encode())
    plot(curves, out / "success_vs_collateral.png")
    # examples: the first 4 tasks at the first seed; rows: unedited, then EXAMPLE_ROWS
    first = tasks[:4]
    rows = [base[: 4 * len(seeds) : len(seeds)]]
    for method, s in EXAMPLE_ROWS:
        ims, _, _ = run_edits(
            flux,
            first,
            [iv.with_strength(s) for iv in ivs[method][:4]],
            seeds[:1],
            dictionaries=saes if method == "sae" else None,
        )
        rows.append(ims)
    write_grid(out / "examples.png", rows)
    print(table(results))
    return 0


def table(r: dict) -> str:
    lines = [
        "| method | strength | success | attribute collateral | other object changed | "
        "pixel collateral | sane |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, curve in r["curves"].items():
        for c in curve:
            lines.append(
                f"| {m} | {c['strength']:g} | {c['success']:.3f} | "
                f"{c['attribute_collateral']:.3f} | {c['other_object_changed']:.3f} | "
                f"{c['pixel_collateral']:.3f} | {c['sane']:.3f} |"
            )
    lines.append("")
    lines.append(
        "| success level | circuit attr. coll. | SAE attr. coll. | circuit pixel coll. | "
        "SAE pixel coll. |\n|---|---|---|---|---|"
    )

    def f(v):
        return "not reached" if v is None else f"{v:.3f}"

    for lvl, d in r["matched_success"].items():
        c, s = d["circuit"], d["sae"]
        lines.append(
            f"| {lvl} | {f(c['attribute_collateral'])} | {f(s['attribute_collateral'])} | "
            f"{f(c['pixel_collateral'])} | {f(s['pixel_collateral'])} |"
        )
    pm = r["per_item_matched"]
    lines.append("")
    lines.append(
        f"Items (task × seed) where both methods succeed at some strength: {pm['n_both_succeed']}; "
        f"there, at each method's smallest successful strength, attribute collateral circuit "
        f"{f(pm['circuit']['attribute_collateral'])} vs SAE "
        f"{f(pm['sae']['attribute_collateral'])}, "
        f"pixel collateral {f(pm['circuit']['pixel_collateral'])} vs "
        f"{f(pm['sae']['pixel_collateral'])}. Items succeeding at any strength: circuit "
        f"{r['any_strength_success']['circuit']:.3f}, SAE {r['any_strength_success']['sae']:.3f}. "
        f"Tasks where circuit steering succeeds on most seeds with <= 5 % attribute collateral "
        f"(best strength): {r['circuit_task_success_with_low_collateral']:.3f}."
    )
    b = r.get("binding")
    if b:
        rates = ", ".join(
            f"x{k}: {'-' if v is None else f'{v:.2f}'}" for k, v in b["repair_rate"].items()
        )
        lines.append("")
        broken = ", ".join(
            f"x{k}: {'-' if v is None else f'{v:.2f}'}"
            for k, v in (b.get("attributes_broken") or {}).items()
        )
        anyr = b.get("repair_rate_any_strength")
        lines.append(
            f"Binding errors: {b['binding_errors']} of {b['checked']} two-object images; "
            f"{b.get('repaired_items')} with a correct seed of the same prompt tried "
            f"({b.get('by_attribute')}; {b.get('no_correct_seed')} had no correct seed in 20, "
            f"{b.get('no_wrong_position')} no prompted position with a wrong attribute). "
            "Circuit-guided "
            f"repair (fully correct after the edit) by strength: {rates}; at any strength: "
            f"{'-' if anyr is None else f'{anyr:.2f}'}. Prompted attributes broken by the edit "
            f"(right before, wrong after; mean per image): {broken}. Graph files of the first "
            f"case (failing seed, correct seed): {b.get('graph_files')}."
        )
    d = r.get("upper_bound_diagnosis")
    if d:
        lines.append("")
        for name in ("text_token", "image_half"):
            lines.append(
                f"Upper bound, every {name.replace('_', ' ')} feature set to the concept run's "
                f"({d['task']}, {d[name]['edits']} edits): success {d[name]['success']:.2f}, "
                f"attribute collateral {d[name]['attribute_collateral']:.3f}."
            )
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difract_ext.util.atomic import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key in zip(axes, ("attribute_collateral", "pixel_collateral")):
        for m, curve in curves.items():
            xs = [c["success"] for c in curve]
            ys = [c[key] for c in curve]
            ax.plot(xs, ys, "o-", label=m)
            for c, x, y in zip(curve, xs, ys):
                ax.annotate(f"×{c['strength']:g}", (x, y), fontsize=7)
        ax.set_xlabel("success rate")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend()
    fig.suptitle("colour edits: success vs collateral over strength")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
