"""One attribution job: capture a step, attribute targets, validate, write graph files.

This is what ``difract attribute`` runs; every step is an ordinary function, importable from Python.

Target specs (``--target``), several allowed, each optionally weighted with ``=W``:

- ``x0:red@left`` / ``velocity:#ff8800@top``: the predicted clean latent (or velocity) over a
  region (``all``, ``left``, ``right``, ``top``, ``bottom``) projected on a colour's direction in
  latent space (palette names of the shapes world, or ``#rrggbb``);
- ``x0:circle@left``: the same over a shapes-world region, projected on a shape's per-patch
  direction (:func:`~difract_ext.toy.directions.shape_directions`: how much the object there
  looks like that shape rather than the others);
- ``feature:img_1:123`` / ``feature:txt_0:7@all`` / ``feature:img_1:123@argmax``: a transcoder
  feature's pre-activation (the site in its one string form, ``STREAM_LAYER``, then the feature
  index), summed over every position of the site's stream (``@all``, the default) or at the one
  position where it is largest on this step (``@argmax``: DifFRACT's rooting).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difract_ext.flux.directions import colour_directions, region_patches
from difract_ext.flux.sites import Site, check_stream
from difract_ext.toy.directions import shape_directions
from difract_ext.toy.world import POSITIONS, SHAPES
from difract_ext.util.atomic import atomic_write_json
from difract_ext.util.config import check_range

logger = logging.getLogger(__name__)

_OUTPUT = re.compile(
    r"^(?P<kind>x0|velocity):(?P<what>#[0-9a-fA-F]{6}|[a-z]+)@(?P<region>[a-z]+)(=(?P<w>[0-9.eE+-]+))?$"
)
_FEATURE = re.compile(
    r"^feature:(?P<site>[a-z]+_\d+):(?P<index>\d+)(@(?P<region>all|argmax))?(=(?P<w>[0-9.eE+-]+))?$"
)
_OLD_FEATURE = re.compile(
    r"^feature:(?P<layer>\d+)\.(?P<stream>[a-z]+)\.(?P<index>\d+)(?P<rest>.*)$"
)


@dataclass(frozen=True)
class TargetRequest:
    """A parsed ``--target``: ``kind`` is ``x0``, ``velocity`` or ``feature``."""

    kind: str
    weight: float = 1.0
    colour: str | None = None
    shape: str | None = None
    region: str = "all"
    site: Site | None = None
    feature: int | None = None
    text: str = ""

    def __post_init__(self) -> None:
        check_range(f"weight of --target {self.text!r}", self.weight, low=0.0, low_open=True)


def parse_target(spec: str) -> TargetRequest:
    """Parse a target spec (see the module docstring).

    Raises:
        ValueError: naming the spec and the accepted forms.
    """
    spec = spec.strip()
    m = _OUTPUT.match(spec)
    if m:
        shape = m["what"] if m["what"] in SHAPES else None
        if shape is not None and m["region"] not in POSITIONS:
            raise ValueError(
                f"target {spec!r}: a shape target needs the object's region, one of "
                f"{', '.join(POSITIONS)} (e.g. x0:{shape}@left)"
            )
        return TargetRequest(
            kind=m["kind"],
            weight=float(m["w"] or 1.0),
            colour=None if shape else m["what"],
            shape=shape,
            region=m["region"],
            text=spec,
        )
    m = _FEATURE.match(spec)
    if m:
        return TargetRequest(
            kind="feature",
            weight=float(m["w"] or 1.0),
            site=Site.parse(m["site"]),
            feature=int(m["index"]),
            region=m["region"] or "all",
            text=spec,
        )
    m = _OLD_FEATURE.match(spec)
    if m:
        site = Site(int(m["layer"]), check_stream(m["stream"]))
        raise ValueError(
            f"target {spec!r} uses the old feature:LAYER.STREAM.INDEX form; write it as "
            f"feature:{site}:{m['index']}{m['rest']} (feature:SITE:INDEX, the site as STREAM_LAYER)"
        )
    raise ValueError(
        f"cannot parse target {spec!r}; use KIND:COLOUR@REGION (KIND x0|velocity, COLOUR a palette "
        "name or #rrggbb, REGION all|left|right|top|bottom), e.g. x0:red@left, KIND:SHAPE@REGION "
        "(a shapes-world shape), e.g. x0:circle@left, or "
        "feature:SITE:INDEX[@all|@argmax], e.g. feature:img_1:123; append =W to weight it"
    )


def _rgb(colour: str, palette: Mapping[str, Any]) -> tuple[int, int, int]:
    if colour.startswith("#"):
        return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
    if colour not in palette:
        raise ValueError(f"unknown colour {colour!r}; use one of {sorted(palette)} or #rrggbb")
    return tuple(palette[colour])  # type: ignore[return-value]


def build_targets(
    requests: list[TargetRequest],
    pipeline: Any,
    dictionaries: Mapping[Site, Any],
    palette: Mapping[str, Any],
) -> Callable[[Any], list[Any]]:
    """A ``model -> [TargetSpec]`` factory for
    :func:`~difract_ext.adapters.attribution.attribute_step`.
    """
    from difract_ext.replacement.targets import feature_argmax, feature_target, output_target

    colours = {r.colour for r in requests if r.colour}
    named = {c: _rgb(c, palette) for c in colours}
    reference = {
        **{k: tuple(v) for k, v in palette.items()},
        **named,
    }  # directions relative to the palette
    directions = colour_directions(pipeline, reference) if named else {}
    for r in requests:
        if r.kind == "feature" and r.site not in dictionaries:
            have = ", ".join(str(s) for s in sorted(dictionaries)) or "none"
            raise ValueError(f"target {r.text!r}: no transcoder at {r.site} (transcoders: {have})")

    def make(model: Any) -> list[Any]:
        specs = []
        for r in requests:
            if r.kind == "feature":
                positions = None
                if r.region == "argmax":
                    mlp_in = model.clean["mlp_in"]
                    positions = [
                        feature_argmax(model.frozen, dictionaries, r.site, r.feature, mlp_in)  # type: ignore[arg-type]
                    ]
                specs.append(
                    feature_target(
                        model.frozen,
                        dictionaries,
                        r.site,  # type: ignore[arg-type]
                        r.feature,  # type: ignore[arg-type]
                        positions=positions,
                        weight=r.weight,
                        label=r.text,
                    )
                )
            else:
                patches = region_patches(r.region, model.step.grid)
                if r.shape is not None:
                    direction = shape_directions(pipeline, r.region, model.step.grid)[r.shape]
                else:
                    direction = directions[r.colour]
                specs.append(
                    output_target(
                        model.frozen,
                        patches,
                        direction,
                        kind=r.kind,
                        label=r.text,
                        weight=r.weight,
                    )
                )
        return specs

    return make


def run_attribution(
    pipeline: Any,
    prompt: str,
    step: int,
    targets: list[str],
    dictionaries: Mapping[Site, Any],
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_inference_steps: int | None = None,
    palette: Mapping[str, Any] | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    backward_batch: int | None = None,
    rank_entries: int | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    validate: bool = True,
    faithfulness: Any = None,
    scan: str = "flux",
    live: Sequence[str] = (),
    **call: Any,
) -> dict[str, Any]:
    """Capture ``step`` of ``prompt``, attribute ``targets``, validate and write graph files.

    ``num_inference_steps`` and the pipeline keywords in ``call`` (``height``, ``width``,
    ``max_sequence_length``...) default to the pipeline's own (see ``capture_step_input``).
    ``scan`` names the transcoder set: circuit-tracer's ``Graph.scan`` and the graph files'
    ``features/{scan}/`` folder. ``validate``: check conservation and measure the faithfulness
    report (:func:`~difract_ext.attribution.faithfulness.faithfulness_report` with
    ``faithfulness``, a ``FaithfulnessConfig``; default: its defaults, about 12 s on the shapes
    demo graph on 2 CPU cores). ``live``: freezes lifted from the edges (first-order graph,
    :func:`~difract_ext.adapters.attribution.attribute_step`); its rows do not sum to node values,
    so no conservation is checked (``conservation: null``).

    Returns a report (also written as ``{out_dir}/{slug}.report.json``): slug, graph path,
    node counts, replacement/completeness scores and, when validated, the conservation error,
    ``faithfulness`` (with its flat ``summary``) and ``unfrozen_ablation_spearman`` (its
    full-ablation Spearman of the first target, when full ablation is among its sizes).
    """
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.attribution import validation
    from difract_ext.graphs.files import write_graph_files
    from difract_ext.replacement.inputs import capture_step_input

    requests = [parse_target(t) for t in targets]
    if not requests:
        raise ValueError("give at least one --target")
    if palette is None:
        from difract_ext.toy.world import COLORS

        palette = COLORS
    make = build_targets(requests, pipeline, dictionaries, palette)
    captured = capture_step_input(
        pipeline,
        prompt,
        step,
        seed=seed,
        num_inference_steps=num_inference_steps,
        finish=True,
        **call,
    )
    result = attribute_step(
        pipeline.transformer,
        captured,
        dictionaries,
        make,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        backward_batch=backward_batch,
        rank_entries=rank_entries,
        scan=scan,
        live=live,
    )
    replacement, completeness = result.graph.scores()  # circuit-tracer's, on the rows
    report: dict[str, Any] = {
        "prompt": prompt,
        "seed": seed,
        "step": step,
        "timestep": captured.t,
        "targets": [t.label for t in result.targets],
        "live": list(result.meta.live),
        "target_values": [float(v) for v in result.target_values],
        "n_active_features": result.components.n_active,
        "n_feature_nodes": len(result.graph.selected_features) - result.n_residue,
        "n_residue_nodes": result.n_residue,
        "replacement_score": float(replacement),
        "completeness_score": float(completeness),
        "graph": {
            "nodes": result.graph.n_nodes,
            "rows": int(result.graph.rows.shape[0]),
            "rows_gib": result.graph.rows.numel() * 4 / 2**30,
            **{
                k: result.graph.info[k]
                for k in ("one_pass", "rank_entries", "backward_passes", "exact_passes", "seconds")
            },
        },
    }
    if validate:
        from difract_ext.attribution.faithfulness import faithfulness_report

        report["conservation"] = None if live else validation.conservation(result)
        faith = faithfulness_report(result, faithfulness)
        report["faithfulness"] = faith
        full = faith["targets"][0].get("ablation", {}).get("100%")
        if full is not None:
            report["unfrozen_ablation_spearman"] = full["spearman"]
            report["unfrozen_ablation_nodes"] = full["n"]
    image = captured.images[0]
    slug = _slug(prompt, seed, step, targets)
    path = write_graph_files(
        result.graph,
        result.meta,
        out_dir,
        slug,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        image=image,
        scan=scan,
        target_values=report["target_values"],  # shown in the targets' labels
    )
    report["slug"], report["graph_file"] = slug, str(path)
    atomic_write_json(Path(out_dir) / f"{slug}.report.json", report)
    logger.info(
        "graph %s: %s",
        slug,
        json.dumps({k: report[k] for k in ("replacement_score", "completeness_score")}),
    )
    return report


def estimate_attribution_job(
    pipeline: Any,
    prompt: str,
    step: int,
    n_targets: int,
    dictionaries: Mapping[Site, Any],
    *,
    seed: int = 0,
    num_inference_steps: int | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    backward_batch: int | None = None,
    rank_entries: int | None = None,
    **call: Any,
) -> dict[str, Any]:
    """What :func:`run_attribution` will take, before it runs: peak memory and backward passes
    (:func:`~difract_ext.attribution.memory.estimate_attribution`).

    Runs the prompt to ``step`` and encodes the transcoders there (one forward: that gives the
    number of active features ``N`` and the edge kernels' padding), then predicts from sizes.
    Returns the estimate's summary with the sizes it used.
    """
    from difract_ext.attribution.memory import (
        attribution_size,
        estimate_attribution,
        kernel_padding,
    )
    from difract_ext.attribution.step import AttributionStep
    from difract_ext.replacement.inputs import capture_step_input

    captured = capture_step_input(
        pipeline, prompt, step, seed=seed, num_inference_steps=num_inference_steps, **call
    )
    tf = pipeline.transformer
    c = AttributionStep(tf, captured, dictionaries).components
    cuda = next(tf.parameters()).is_cuda
    batch = batch_size or (256 if cuda else 128)  # attribute_step's defaults
    others = [
        m
        for name, m in vars(pipeline).items()
        if name != "transformer" and hasattr(m, "parameters") and callable(m.parameters)
    ]
    size = attribution_size(
        tf,
        dictionaries,
        captured.n_txt,
        captured.n_img,
        c.n_active,
        max_feature_nodes,
        n_targets=n_targets,
        batch_size=batch,
        backward_batch=backward_batch or (batch if cuda else 32),
        rank_entries=rank_entries,
        kernel_padding=kernel_padding(c.decoder_locations),
        resident_other=sum(p.numel() * p.element_size() for m in others for p in m.parameters()),
    )
    est = estimate_attribution(size)
    return {
        **est.summary(),
        "positions": size.n_pos,
        "layers": size.n_layers,
        "width": size.d_model,
        "n_active": size.n_active,
        "features": size.budget,
        "kernel_padding": round(size.kernel_padding, 3),
    }


def _slug(prompt: str, seed: int, step: int, targets: list[str]) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40]
    tgt = re.sub(r"[^a-z0-9]+", "-", "-".join(targets).lower()).strip("-")[:30]
    return f"{words}-s{seed}-step{step}-{tgt}"


DEMO_PROMPT = "a red circle on the left and a blue square on the right"


def demo_graph(
    out_dir: str | Path,
    prompt: str = DEMO_PROMPT,
    step: int = 1,
    targets: tuple[str, ...] = ("x0:red@left",),
) -> dict[str, Any]:
    """The demo's graph: the shapes model, its shipped transcoders, "how red is the left object"."""
    from difract_ext.adapters.checkpoints import load_shapes_dictionaries
    from difract_ext.toy import load_shapes_pipeline

    pipe = load_shapes_pipeline()  # carries its own call defaults (32 px, 16 tokens, 4 steps)
    dictionaries = load_shapes_dictionaries()
    return run_attribution(
        pipe,
        prompt,
        step,
        list(targets),
        dictionaries,
        out_dir,
        max_feature_nodes=1500,
        scan="shapes",  # the shipped transcoders: their dashboards' scan (nodes get labels)
    )
