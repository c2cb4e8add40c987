"""``difract attribute`` and ``difract serve``: argument parsing only (see ``attribution_job``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from difract_ext.cli.argtypes import (
    nonnegative_int,
    number_in,
    output_folder,
    port,
    positive_int,
    seed,
)
from difract_ext.cli.pages_job import add_pages_commands

#: ``replacement.frozen.LIVE_PARTS``, spelled here so parsing imports no torch (a test checks)
LIVE_CHOICES = ("layernorm", "attention")


def _cmd_attribute(args: argparse.Namespace) -> int:
    from difract_ext.adapters.checkpoints import load_dictionary_dir
    from difract_ext.cli.attribution_job import run_attribution
    from difract_ext.cli.sources import load_pipeline
    from difract_ext.flux.defaults import resolve

    pipe = load_pipeline(args.model).pipe
    # the pipeline's own defaults, overridden by the flags given; warns outside the trained range
    call = resolve(
        pipe,
        height=args.height,
        width=args.width,
        max_sequence_length=args.max_sequence_length,
        num_inference_steps=args.steps,
    )
    scan = "flux"  # names the transcoder set (feature files, dashboards)
    if args.transcoders:
        dictionaries = load_dictionary_dir(args.transcoders, role="transcoder")
    elif args.model == "shapes":
        from difract_ext.adapters.checkpoints import load_shapes_dictionaries

        dictionaries = load_shapes_dictionaries()
        scan = "shapes"  # the shipped transcoders: their shipped dashboards label the nodes
    else:
        raise ValueError("give --transcoders DIR for a model other than the shipped shapes model")
    if args.estimate:
        from difract_ext.cli.attribution_job import estimate_attribution_job, parse_target

        estimate = estimate_attribution_job(
            pipe,
            args.prompt,
            args.step,
            len([parse_target(t) for t in args.target]),
            dictionaries,
            seed=args.seed,
            max_feature_nodes=args.max_feature_nodes,
            batch_size=args.batch_size,
            backward_batch=args.backward_batch,
            rank_entries=args.rank_entries,
            **call,
        )
        print(json.dumps(estimate, indent=2))
        return 0
    report = run_attribution(
        pipe,
        args.prompt,
        args.step,
        args.target,
        dictionaries,
        args.out,
        seed=args.seed,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        backward_batch=args.backward_batch,
        rank_entries=args.rank_entries,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        validate=not args.no_validate,
        scan=scan,
        live=args.live,
        **call,
    )
    print(json.dumps(report, indent=2, default=str))
    print(f"graph written to {report['graph_file']}\nview it with:  difract serve {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from difract_ext.graphs.server import serve_forever

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(
            f"{args.dir}: no such graph folder (write one with `difract attribute --out DIR`)"
        )
    # an empty folder: `serve` logs a warning saying so
    serve_forever(
        args.dir,
        port=args.port,
        ready=lambda server: print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)"),
        dashboards=args.dashboards or (),
    )
    return 0


def add_graph_commands(sub: Any) -> None:
    """Register ``attribute`` and ``serve`` on the ``difract`` sub-parser."""
    p = sub.add_parser(
        "attribute",
        help="attribution graph of one denoising step (circuit-tracer), written for its frontend",
        description=(
            "Run the prompt up to --step, build the local replacement model there "
            "(frozen attention and LayerNorms, transcoders folded at the step's t, error nodes), "
            "attribute the targets with circuit-tracer's algorithm (graph stored by rows; "
            "--estimate predicts memory first), validate (conservation, "
            "faithfulness report), and write OUT/{slug}.json, OUT/{slug}.png, "
            "OUT/{slug}.report.json and OUT/graph-metadata.json."
        ),
    )
    p.add_argument("--prompt", required=True, help="one prompt (graphs are per prompt and seed)")
    p.add_argument(
        "--step",
        type=nonnegative_int,
        default=1,
        help="0-based denoising step to explain (default 1)",
    )
    p.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="SPEC",
        help="KIND:COLOUR@REGION (KIND x0|velocity; COLOUR a shapes-world colour or #rrggbb; "
        "REGION all|left|right|top|bottom), or feature:SITE:INDEX (e.g. feature:img_1:123); "
        "=W weights it. "
        "Repeat for several targets. Example: --target x0:red@left",
    )
    p.add_argument("--out", required=True, type=output_folder, help="output folder for graph files")
    p.add_argument(
        "--model",
        default="shapes",
        help="'shapes' (the shipped toy model), 'shapes:FOLDER', or a FluxPipeline folder/hub id",
    )
    p.add_argument(
        "--transcoders",
        help="folder of SAELens transcoder folders or DifFRACT .pt files "
        "(default for the shapes model: its shipped transcoders)",
    )
    p.add_argument("--seed", type=seed, default=0, help="generator seed")
    p.add_argument(
        "--steps",
        type=positive_int,
        help="num_inference_steps of the run (default: the model's; shapes: 4)",
    )
    p.add_argument("--height", type=positive_int, help="image height (default: the model's)")
    p.add_argument("--width", type=positive_int, help="image width (default: the model's)")
    p.add_argument(
        "--max-sequence-length", type=positive_int, help="T5 length (default: the model's)"
    )
    p.add_argument(
        "--max-feature-nodes",
        type=positive_int,
        help="expand at most this many features; the rest become residue nodes (default: all)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help=(
            "circuit-tracer's batch: rows per compute_batch call (default: 128 on CPU, 256 on GPU)"
        ),
    )
    p.add_argument(
        "--backward-batch",
        type=positive_int,
        help="rows per backward pass; larger batches are sorted by layer into these "
        "(default: 32 on CPU, the batch size on GPU)",
    )
    p.add_argument(
        "--rank-entries",
        type=positive_int,
        help="feature entries each ranking row keeps (default: all when the rows fit 1 GiB, "
        "else as many as fit; the chosen rows are then recomputed exactly)",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="print the predicted peak memory and backward passes (JSON) and stop: runs the "
        "prompt to --step and encodes the transcoders there, but builds no graph",
    )
    p.add_argument(
        "--node-threshold",
        type=number_in(0, 1, low_open=True),
        default=0.8,
        help="pruning: cumulative node influence kept",
    )
    p.add_argument(
        "--edge-threshold",
        type=number_in(0, 1, low_open=True),
        default=0.98,
        help="pruning: cumulative edge influence kept",
    )
    p.add_argument(
        "--live",
        nargs="+",
        choices=LIVE_CHOICES,
        default=[],
        metavar="PART",
        help="lift these freezes from the edges (layernorm, attention): a first-order graph "
        "whose total effects predict small perturbations of the real model better, but whose "
        "edges no longer sum to node values (default: circuit-tracer's affine graph)",
    )
    p.add_argument(
        "--no-validate", action="store_true", help="skip conservation and faithfulness checks"
    )
    p.set_defaults(func=_cmd_attribute)

    s = sub.add_parser(
        "serve",
        help="serve graph files to the (patched, offline) circuit-tracer frontend",
        description=(
            "Serve DIR on 127.0.0.1 only; no file outside DIR or the frontend assets can be read."
        ),
    )
    s.add_argument("dir", metavar="DIR", help="folder written by `difract attribute`")
    s.add_argument("--port", type=port, default=8041, help="port on 127.0.0.1 (default 8041)")
    s.add_argument(
        "--dashboards",
        action="append",
        metavar="DASH",
        help="a feature-dashboard folder (`difract dashboards`) to show in the feature pane; "
        "repeatable (default: DIR/dashboards/* and the shipped shapes dashboards)",
    )
    s.set_defaults(func=_cmd_serve)
    add_pages_commands(sub)  # dashboards-page, dashboard-png
