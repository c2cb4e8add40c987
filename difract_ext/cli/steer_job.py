"""``difract steer``: edit generated shapes-world images by circuit-guided or SAE steering, scored.

Every step is an ordinary function, importable from Python (``benchmarks/steering.py`` uses
them):

- :func:`edit_graphs` builds the attribution graphs of an edit (the source colour or shape at the
  target position on the source prompt, the new one there on the concept prompt; one per step);
- :func:`circuit_intervention` turns them into a circuit-guided intervention;
- :func:`mean_activations` and :func:`sae_intervention` give the SAE-steering baseline (mean
  activation difference between concept and contrast prompts);
- :func:`run_edits` generates base and edited images (batched over tasks and seeds through
  ``FluxModel.run_intervention``) and :func:`score_runs` scores them
  (:func:`~difract_ext.intervene.metrics.score_edit`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difract_ext.flux.sites import STREAM_MODULES, Site, as_site
from difract_ext.intervene.metrics import EditScore, EditTask, score_edit
from difract_ext.intervene.spec import Intervention
from difract_ext.intervene.steering import GraphPair, circuit_steering, mean_difference_steering

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("circuit", "sae")


def edit_graphs(
    pipeline: Any,
    transcoders: Mapping[Site, Any],
    task: EditTask,
    seed: int,
    steps: Sequence[int] = (0, 1),
    max_feature_nodes: int = 100,
) -> tuple[list[GraphPair], list[GraphPair]]:
    """``(source graphs, concept graphs)`` of a colour or shape edit, one per step in ``steps``.

    Source: ``x0·{old value} @ {position}`` on the task's prompt; concept: ``x0·{new value} @
    {position}`` on its concept prompt (both at ``seed``), the value a colour (its latent
    direction) or a shape (:func:`~difract_ext.toy.directions.shape_directions`).
    """
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.cli.attribution_job import build_targets, parse_target
    from difract_ext.replacement.inputs import capture_step_input
    from difract_ext.toy.world import COLORS

    out: tuple[list[GraphPair], list[GraphPair]] = ([], [])
    for graphs, prompt, value in (
        (out[0], task.prompt, task.source_value),
        (out[1], task.concept_prompt, task.value),
    ):
        make = build_targets(
            [parse_target(f"x0:{value}@{task.position}")], pipeline, transcoders, COLORS
        )
        for step in steps:
            captured = capture_step_input(pipeline, prompt, step, seed=seed)
            res = attribute_step(
                pipeline.transformer,
                captured,
                transcoders,
                make,
                max_feature_nodes=max_feature_nodes,
            )
            graphs.append((res.graph, res.meta))
    return out


def circuit_intervention(
    pipeline: Any,
    transcoders: Mapping[Site, Any],
    task: EditTask,
    seed: int = 0,
    steps: Sequence[int] = (0, 1),
    k: int = 8,
    max_feature_nodes: int = 100,
) -> Intervention:
    """Circuit-guided intervention for ``task`` from graphs at ``seed`` (see
    :func:`~difract_ext.intervene.steering.circuit_steering`)."""
    source, concept = edit_graphs(pipeline, transcoders, task, seed, steps, max_feature_nodes)
    return circuit_steering(source, concept, k=k, label=f"circuit {task}")


@torch.no_grad()
def mean_activations(
    flux: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    dictionaries: Mapping[Any, Any],
) -> dict[Site, torch.Tensor]:
    """``{site: [d_sae]}`` mean activation of SAEs over MLP outputs (over prompts × seeds,
    positions and steps), read in one ``flux.trace`` per prompt list."""
    dicts = {as_site(k): v for k, v in dictionaries.items()}
    order = sorted(dicts, key=lambda s: (s.layer, s.stream != "img"))
    plist = [p for p in prompts for _ in seeds]
    slist = [s for _ in prompts for s in seeds]
    gens = [torch.Generator(flux.pipeline.device).manual_seed(int(s)) for s in slist]
    with flux.trace(plist, generator=gens) as tracer:
        acc = {}.save()
        for _ in tracer.steps():
            t = flux.timestep
            for site in order:
                block = flux.transformer.transformer_blocks[site.layer]
                y = getattr(block, STREAM_MODULES[site.stream]).output
                sae = dicts[site]
                z = sae.encode(y.to(sae.W_dec.dtype), t=t.to(y.device))
                acc.setdefault(site, []).append(z.double().mean(dim=(0, 1)))
    return {s: torch.stack(v).mean(0).float() for s, v in acc.items()}


def sae_intervention(
    flux: Any,
    saes: Mapping[Any, Any],
    task: EditTask,
    seeds: Sequence[int],
    k: int = 8,
) -> Intervention:
    """Mean-difference (SAE-steering) intervention: concept = the task's concept prompt,
    contrast = its prompt, means over ``seeds``."""
    concept = mean_activations(flux, [task.concept_prompt], seeds, saes)
    contrast = mean_activations(flux, [task.prompt], seeds, saes)
    return mean_difference_steering(concept, contrast, k=k, role="sae", label=f"sae {task}")


def run_edits(
    flux: Any,
    tasks: Sequence[EditTask],
    interventions: Sequence[Intervention | None],
    seeds: Sequence[int],
    dictionaries: Mapping[Any, Any] | None = None,
    batch_tasks: int = 8,
) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Generate every ``(task, seed)`` with its task's intervention (None: unedited); the
    interventions of up to ``batch_tasks`` tasks run in one batch (rows restricted per task).

    Returns ``(images [H, W, 3] float in [0, 1], prompts, seeds)`` in task-major order.
    """
    if len(tasks) != len(interventions):
        raise ValueError(f"{len(tasks)} tasks but {len(interventions)} interventions")
    images: list[np.ndarray] = []
    n_s = len(seeds)
    for lo in range(0, len(tasks), batch_tasks):
        chunk = list(range(lo, min(lo + batch_tasks, len(tasks))))
        prompts = [tasks[i].prompt for i in chunk for _ in seeds]
        seed_list = [int(s) for _ in chunk for s in seeds]
        combined: Intervention | None = None
        for j, i in enumerate(chunk):
            iv = interventions[i]
            if iv is None or not iv.edits:
                continue
            part = iv.on_rows(range(j * n_s, (j + 1) * n_s))
            combined = part if combined is None else combined + part
        out = flux.run_intervention(
            prompts, combined, seeds=seed_list, dictionaries=dictionaries, output_type="np"
        )
        images += [np.asarray(im, dtype=np.float32) for im in out.images]
    prompts_all = [t.prompt for t in tasks for _ in seeds]
    seeds_all = [int(s) for _ in tasks for s in seeds]
    return images, prompts_all, seeds_all


def score_runs(
    tasks: Sequence[EditTask],
    seeds: Sequence[int],
    base: Sequence[np.ndarray],
    edited: Sequence[np.ndarray],
) -> list[EditScore]:
    """:func:`score_edit` of each ``(task, seed)`` (task-major, as :func:`run_edits` returns)."""
    n_s = len(seeds)
    return [score_edit(base[i], edited[i], tasks[i // n_s]) for i in range(len(base))]


def write_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], scale: int = 4) -> Path:
    """A PNG grid of float ``[H, W, 3]`` images (one list per row), ``scale``× nearest."""
    from PIL import Image

    from difract_ext.toy.analyzer import to_uint8
    from difract_ext.util.atomic import atomic_write_bytes

    h, w = rows[0][0].shape[:2]
    n_c = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + 2), n_c * (w + 2), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            canvas[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = to_uint8(im)
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), 0)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def run_steer(
    prompt: str,
    edit: str,
    out_dir: str | Path,
    *,
    methods: Sequence[str] = METHODS,
    strengths: Sequence[float] = (1.0, 4.0),
    seeds: Sequence[int] = (0, 1, 2, 3),
    k: int = 8,
    graph_steps: Sequence[int] = (0, 1),
    max_feature_nodes: int = 100,
) -> dict[str, Any]:
    """Steer the shapes model's images of ``prompt`` by ``edit`` (``POSITION:color=VALUE`` or
    ``POSITION:shape=VALUE``) with each method at each strength; write ``{out_dir}/steer.json``
    (the interventions and the scores) and ``{out_dir}/steer.png`` (row 1: unedited, then one
    row per method × strength, one column per seed). Returns the JSON's content."""
    import difract_ext
    from difract_ext.adapters.tracing import FluxModel
    from difract_ext.intervene.metrics import summarize
    from difract_ext.toy import load_shapes_pipeline
    from difract_ext.util.atomic import atomic_write_json

    task = EditTask.parse(prompt, edit)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if not seeds or not strengths:
        raise ValueError("give at least one seed and one strength")
    pipe = load_shapes_pipeline()
    tcs = difract_ext.load_shapes_dictionaries()
    saes = difract_ext.load_shapes_dictionaries(role="sae")
    flux = FluxModel(pipe, transcoders=tcs)
    seeds = [int(s) for s in seeds]
    base, _, _ = run_edits(flux, [task], [None], seeds)
    report: dict[str, Any] = {"task": task.__dict__, "seeds": seeds, "methods": {}}
    grid = [base]
    for method in methods:
        if method == "circuit":
            iv = circuit_intervention(pipe, tcs, task, seeds[0], graph_steps, k, max_feature_nodes)
        else:
            iv = sae_intervention(flux, saes, task, seeds, k)
        runs = []
        for s in strengths:
            edited, _, _ = run_edits(flux, [task], [iv.with_strength(s)], seeds, dictionaries=saes)
            scores = score_runs([task], seeds, base, edited)
            runs.append(
                {"strength": s, **summarize(scores), "items": [x.to_dict() for x in scores]}
            )
            grid.append(edited)
            logger.info("%s x%g: %s", method, s, summarize(scores))
        report["methods"][method] = {"intervention": iv.to_dict(), "runs": runs}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "steer.json", report)
    write_grid(out / "steer.png", grid)
    return report


def add_steer_parser(sub: Any) -> Any:
    """Add ``difract steer`` to the subcommands ``sub``."""
    from difract_ext.cli.argtypes import (
        nonnegative_int,
        nonnegative_number,
        output_folder,
        positive_int,
        seed,
    )

    p = sub.add_parser(
        "steer",
        help="edit shapes-model images by circuit-guided or SAE steering, scored by the analyzer",
        description=(
            "Generate PROMPT with the shipped shapes model at each seed, then again with a "
            "colour or shape edit (--edit POSITION:color=VALUE or POSITION:shape=VALUE) made by "
            "circuit-guided steering (features of largest influence in attribution graphs of the "
            "old and new colour or shape at that "
            "position, edited only where and when the graphs say) and/or SAE steering (mean "
            "activation difference, added everywhere), at each strength; write OUT/steer.json "
            "(interventions, success and collateral per run) and OUT/steer.png."
        ),
    )
    p.add_argument("--prompt", required=True, help="a shapes-world prompt")
    p.add_argument(
        "--edit",
        required=True,
        help="POSITION:color=VALUE or POSITION:shape=VALUE, e.g. left:color=blue",
    )
    p.add_argument("--out", required=True, type=output_folder, help="output folder")
    p.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--strength", type=nonnegative_number, nargs="+", default=[1.0, 4.0])
    p.add_argument("--seeds", type=seed, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--k", type=positive_int, default=8, help="features per graph / SAE site")
    p.add_argument("--graph-steps", type=nonnegative_int, nargs="+", default=[0, 1])
    p.add_argument("--max-feature-nodes", type=positive_int, default=100)
    p.set_defaults(func=_cmd_steer)
    return p


def _cmd_steer(args: Any) -> int:
    report = run_steer(
        args.prompt,
        args.edit,
        args.out,
        methods=args.method,
        strengths=args.strength,
        seeds=args.seeds,
        k=args.k,
        graph_steps=args.graph_steps,
        max_feature_nodes=args.max_feature_nodes,
    )
    for method, r in report["methods"].items():
        for run in r["runs"]:
            print(
                f"{method} x{run['strength']:g}: success {run['success']:.2f}  attribute "
                f"collateral {run['attribute_collateral']:.3f}  pixel collateral "
                f"{run['pixel_collateral']:.3f}  sane {run['sane']:.2f}"
            )
    print(f"wrote {Path(args.out) / 'steer.json'} and {Path(args.out) / 'steer.png'}")
    return 0
