"""``difract eval`` as a function: held-out metrics, curves, spliced generation, one report.

Writes into ``out_dir``: ``eval.json`` (everything), ``eval.md`` (tables),
``sparsity_faithfulness.png`` (transcoder vs SAE curves) and, with a pipeline, ``splice.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difract_ext.adapters.dictionaries import SAELENS_IO
from difract_ext.capture.format import HarvestReader
from difract_ext.flux.sites import Site
from difract_ext.intervene.generation import ImageScorer, splice_table, spliced_generation
from difract_ext.training.evaluation import (
    ALL,
    DictionaryEval,
    check_disjoint,
    eval_table,
    evaluate_dictionaries,
    padding_table,
    per_timestep_table,
)
from difract_ext.training.plots import curves_table, plot_sparsity_faithfulness
from difract_ext.training.quality import ADVICE, quality_problems
from difract_ext.training.store import TrainedDictionary, load_dictionaries
from difract_ext.util.atomic import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)


@dataclass
class EvalSummary:
    """Results of :func:`run_evaluation` and the files written."""

    evals: list[DictionaryEval]
    splice: list[dict[str, Any]] = field(default_factory=list)
    #: failing dictionaries only: name -> why (:mod:`~difract_ext.training.quality`)
    failing: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def select_for_splice(
    dictionaries: Sequence[TrainedDictionary],
    evals: Sequence[DictionaryEval],
    variant: str | Sequence[str] | None = None,
) -> dict[Site, Any]:
    """One transcoder per site: the best held-out EV among those whose variant or name is in
    ``variant`` (a string or several; None: all)."""
    wanted = None if variant is None else ({variant} if isinstance(variant, str) else set(variant))
    best: dict[Site, tuple[float, Any]] = {}
    for d, e in zip(dictionaries, evals):
        if d.spec.role != "transcoder":
            continue
        if wanted is not None and not wanted & {d.spec.variant, d.name}:
            continue
        ev = e.groups[ALL]["explained_variance"]
        if d.spec.site not in best or ev > best[d.spec.site][0]:
            best[d.spec.site] = (ev, d.module)
    return {s: m for s, (_, m) in sorted(best.items())}


def run_evaluation(
    dictionaries: str | Path | Sequence[TrainedDictionary],
    data: str | Path,
    out_dir: str | Path,
    *,
    pipeline: Any = None,
    call_kwargs: dict[str, Any] | None = None,
    splice_prompts: Sequence[str] | None = None,
    splice_seeds: Sequence[int] = (0,),
    splice_max_prompts: int = 64,
    splice_variant: str | Sequence[str] | None = None,
    score_images: ImageScorer | None = None,
    allow_overlap: bool = False,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    device: str = "cpu",
    progress: bool = True,
) -> EvalSummary:
    """Evaluate trained dictionaries on held-out data and (optionally) by spliced generation.

    Args:
        dictionaries: a folder of trained dictionaries (searched recursively) or loaded ones.
        data: held-out harvest folder (prompts disjoint from the training harvest's).
        out_dir: where the report goes.
        pipeline: the FLUX pipeline for spliced generation (None: skip it).
        call_kwargs: its call keywords (e.g. ``SHAPES_CALL_DEFAULTS``).
        splice_prompts: prompts for spliced generation (default: the held-out harvest's prompts,
            at most ``splice_max_prompts``), each generated once per seed in ``splice_seeds``.
        splice_variant: which transcoder variant(s) or name(s) may be spliced (per site the best
            EV among them; default: any).
        score_images: optional image scorer (e.g. the shapes analyzer's ``accuracy_report``).
        allow_overlap: do not fail when held-out prompts were used in training.

    Raises:
        ValueError: the evaluation prompts overlap the training prompts (unless allowed).
    """
    dicts = list(
        load_dictionaries(dictionaries, device, io=SAELENS_IO)
        if isinstance(dictionaries, (str, Path))
        else dictionaries
    )
    reader = HarvestReader(data)
    overlap = check_disjoint(reader, dicts)
    if overlap and not allow_overlap:
        raise ValueError(
            f"{len(overlap)} evaluation prompts were also training prompts (e.g. {overlap[:3]}); "
            "harvest held-out prompts, or pass allow_overlap=True (--allow-overlap)"
        )
    evals = evaluate_dictionaries(
        dicts,
        reader,
        batch_size=batch_size,
        dense_threshold=dense_threshold,
        device=device,
        progress=progress,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = EvalSummary(evals)
    for e in evals:
        problems = quality_problems(e.groups.get(ALL, {}))
        if problems:
            summary.failing[e.name] = problems
            logger.warning(
                "%s FAILS the quality checks on held-out data: %s; %s",
                e.name,
                "; ".join(problems),
                ADVICE,
            )
    verdict = (
        f"**{len(summary.failing)} of {len(evals)} dictionaries FAIL the quality checks** "
        f"({', '.join(summary.failing)}): {ADVICE}."
        if summary.failing
        else f"All {len(evals)} dictionaries pass the quality checks."
    )
    md = [
        "# Held-out evaluation",
        "",
        f"Data: `{reader.root}` ({len(reader.prompts)} prompts, "
        f"rows {dict((s, reader.n_rows(s)) for s in reader.streams)}); "
        f"overlap with training prompts: {len(overlap)}.",
        "",
        "## All timesteps",
        "",
        eval_table(evals),
        verdict,
        "",
    ]
    split = padding_table(evals)
    if split:
        md += [
            "## Text positions: real tokens and T5 padding",
            "",
            "FLUX attends to every T5 position; 'EV all' (the table above) includes padding.",
            "",
            split,
        ]
    md += [
        "## Per timestep",
        "",
        per_timestep_table(evals),
        "## Sparsity–faithfulness points",
        "",
        curves_table(evals),
    ]
    if len(evals):
        summary.files["plot"] = plot_sparsity_faithfulness(evals, out / "sparsity_faithfulness.png")
        md += ["![sparsity-faithfulness](sparsity_faithfulness.png)", ""]
    if pipeline is not None:
        chosen = select_for_splice(dicts, evals, splice_variant)
        if not chosen:
            logger.warning("no transcoder to splice")
        else:
            prompts = list(splice_prompts or reader.prompts)[:splice_max_prompts]
            pairs = [(p, s) for p in prompts for s in splice_seeds]
            summary.splice = spliced_generation(
                pipeline,
                [p for p, _ in pairs],
                [s for _, s in pairs],
                chosen,
                call_kwargs or {},
                score_images=score_images,
                progress=progress,
            )
            keys = sorted(
                {
                    k[len("adherence/") :]
                    for r in summary.splice
                    for k in r
                    if k.startswith("adherence/")
                }
            )
            keys = [
                k
                for k in keys
                if k.endswith("fully_correct") or k in ("all/color", "all/shape", "all/position")
            ]
            md += [
                "## Spliced generation (MLP output replaced, no error term)",
                "",
                f"{len(pairs)} generations; transcoders: "
                + ", ".join(str(s) for s in chosen)
                + ".",
                "",
                splice_table(summary.splice, keys),
            ]
            summary.files["splice"] = atomic_write_json(out / "splice.json", summary.splice)
    summary.files["json"] = atomic_write_json(
        out / "eval.json",
        {
            "data": str(reader.root),
            "overlap": overlap,
            "evals": [{**e.to_json(), "problems": summary.failing.get(e.name, [])} for e in evals],
            "splice": summary.splice,
        },
    )
    summary.files["markdown"] = atomic_write_bytes(out / "eval.md", "\n".join(md).encode())
    return summary
