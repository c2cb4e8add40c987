"""Binding errors of the shapes model, explained and repaired by circuit-guided edits (the
``OUT/binding.json`` stage of ``benchmarks/steering.py``, which runs it).

Two-object prompts are generated at several seeds; each binding error (the analyzer's) is given a
correct image of the same prompt, a graph of the failing seed (``x0·drawn @ position``) beside
one of the correct seed (``x0·asked @ position``), and the circuit-guided edit from the pair
(:func:`~difract_ext.intervene.metrics.binding_repair` names what to repair), scored at ×1–×8.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("steering")


def binding_repair(
    flux,
    pipe,
    tcs,
    out: Path,
    seeds: list[int],
    n_prompts: int = 200,
    max_items: int = 30,
    k: int = 8,
) -> dict:
    """Binding errors of two-object prompts: find them (``n_prompts`` random prompts × ``seeds``),
    give each a correct seed of the same prompt (from ``seeds``, else seeds 100-115), explain the
    first with graphs (the failing seed beside the correct one) and try a circuit-guided repair of
    up to ``max_items`` of them (colour or shape: :func:`repair_one`)."""
    from difract_ext.cli.attribution_job import run_attribution
    from difract_ext.toy.analyzer import analyze, score
    from difract_ext.toy.pipeline import generate_images
    from difract_ext.toy.world import all_prompts

    rng = np.random.default_rng(1)
    pool = all_prompts(2)
    prompts = [pool[i] for i in rng.permutation(len(pool))[:n_prompts]]
    images = generate_images(
        flux.pipeline,
        [p for p in prompts for _ in seeds],
        [sd for _ in prompts for sd in seeds],
        32,
    )
    n_s = len(seeds)
    items, correct_seed = [], {}
    for i, p in enumerate(prompts):
        for j, sd in enumerate(seeds):
            sc = score(images[i * n_s + j], p)
            if sc.fully_correct:
                correct_seed.setdefault(p, sd)
            elif sc.binding_error:
                items.append((p, sd, images[i * n_s + j]))
    missing = sorted({p for p, _, _ in items if p not in correct_seed})
    extra = list(range(100, 116))
    more = generate_images(
        flux.pipeline,
        [p for p in missing for _ in extra],
        [sd for _ in missing for sd in extra],
        32,
    )
    for i, p in enumerate(missing):
        for j, sd in enumerate(extra):
            if score(more[i * len(extra) + j], p).fully_correct:
                correct_seed[p] = sd
                break
    n_checked = len(prompts) * n_s
    graphs: dict = {}
    repairs, nothing_wrong, no_correct = [], 0, 0
    for p, sd, img in items:
        if len(repairs) >= max_items:
            break
        if p not in correct_seed:
            no_correct += 1
            continue
        row = repair_one(flux, pipe, tcs, p, sd, correct_seed[p], img, k)
        if row is None:
            nothing_wrong += 1
            continue
        repairs.append(row)
        if not graphs:  # graph files of the first failing case beside a correct one
            for name, seed_, colour in (
                ("failing", sd, row["drawn"]),
                ("correct", correct_seed[p], row["asked"]),
            ):  # colour or shape targets
                rep = run_attribution(
                    pipe,
                    p,
                    0,
                    [f"x0:{colour}@{row['position']}"],
                    tcs,
                    out / "binding_graphs",
                    seed=seed_,
                    max_feature_nodes=60,
                    validate=False,
                    scan="shapes",  # the shipped transcoders: their dashboards label the nodes
                )
                graphs[name] = str(Path(rep["graph_file"]).relative_to(out))
    strengths = ("1", "2", "4", "8")
    rates = {
        st: float(np.mean([r["strengths"][st]["repaired"] for r in repairs])) if repairs else None
        for st in strengths
    }
    breaks = {
        st: float(np.mean([r["strengths"][st]["broken"] for r in repairs])) if repairs else None
        for st in strengths
    }
    any_rate = (
        float(np.mean([any(v["repaired"] for v in r["strengths"].values()) for r in repairs]))
        if repairs
        else None
    )
    found = [
        {
            "prompt": p,
            "seed": sd,
            "correct_seed": correct_seed.get(p),
            "drawn": [[d.color, d.shape, d.position] for d in analyze(img)],
        }
        for p, sd, img in items
    ]
    return {
        "checked": n_checked,
        "binding_errors": len(items),
        "repaired_items": len(repairs),
        "no_wrong_position": nothing_wrong,
        "by_attribute": {a: sum(r["attribute"] == a for r in repairs) for a in ("color", "shape")},
        "no_correct_seed": no_correct,
        "found": found,
        "repairs": repairs,
        "repair_rate": rates,
        "repair_rate_any_strength": any_rate,
        "attributes_broken": breaks,
        "graph_files": graphs,
    }


def _graph(pipe, tcs, prompt: str, seed: int, target: str):
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.cli.attribution_job import build_targets, parse_target
    from difract_ext.replacement.inputs import capture_step_input
    from difract_ext.toy.world import COLORS

    make = build_targets([parse_target(target)], pipe, tcs, COLORS)
    step = capture_step_input(pipe, prompt, 0, seed=seed)
    res = attribute_step(pipe.transformer, step, tcs, make, max_feature_nodes=60)
    return res.graph, res.meta


def _token_shares(g, meta) -> dict[str, float]:
    """The 5 text tokens whose feature nodes carry most of the graph's feature influence."""
    from difract_ext.intervene.spec import row_graph_nodes

    by_tok: dict[str, float] = {}
    refs = row_graph_nodes(g, meta)
    for n in refs:
        if n.site.stream == "txt":
            key = f"{n.position}:{meta.text_tokens[n.position]}"
            by_tok[key] = by_tok.get(key, 0.0) + n.influence
    total = sum(max(0.0, n.influence) for n in refs) or 1.0
    return dict(sorted(((t, v / total) for t, v in by_tok.items()), key=lambda kv: -kv[1])[:5])


def repair_one(flux, pipe, tcs, prompt: str, seed: int, correct: int, image, k: int = 8):
    """Circuit-guided repair of a binding error at ``seed``: at the first position whose drawn
    colour (else shape) is not the asked one, graphs of ``x0·drawn @ position`` at ``seed`` and
    ``x0·asked @ position`` at the ``correct`` seed give the edit; None when every detected
    object at a prompted position has its asked colour and shape."""
    from difract_ext.intervene.metrics import binding_repair
    from difract_ext.intervene.steering import circuit_steering
    from difract_ext.toy.analyzer import score

    before = score(image, prompt)
    repair = binding_repair(prompt, image)
    if repair is None:
        return None
    pos, drawn, asked = repair.position, repair.drawn, repair.asked
    src = _graph(pipe, tcs, prompt, seed, f"x0:{drawn}@{pos}")
    con = _graph(pipe, tcs, prompt, correct, f"x0:{asked}@{pos}")
    iv = circuit_steering([src], [con], k=k)
    row = {
        "prompt": prompt,
        "seed": seed,
        "correct_seed": correct,
        "position": pos,
        "attribute": repair.attribute,
        "drawn": drawn,
        "asked": asked,
        "failing_graph_token_shares": _token_shares(*src),
        "correct_graph_token_shares": _token_shares(*con),
        "strengths": {},
    }
    for st in (1.0, 2.0, 4.0, 8.0):
        ims = flux.run_intervention(
            [prompt], iv.with_strength(st), seeds=[seed], output_type="np"
        ).images
        fixed = score(np.asarray(ims[0], np.float32), prompt)
        was = [*before.color_ok, *before.shape_ok, *before.position_ok]
        now = [*fixed.color_ok, *fixed.shape_ok, *fixed.position_ok]
        row["strengths"][f"{st:g}"] = {
            "repaired": fixed.fully_correct,
            "n_detected": fixed.n_detected,
            # prompted attributes right before the edit and wrong after it
            "broken": sum(a and not b for a, b in zip(was, now, strict=True)),
        }
    log.info("binding repair %s seed %d: %s", prompt, seed, row["strengths"])
    return row
