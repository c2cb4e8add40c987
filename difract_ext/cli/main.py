"""The ``difract`` command line. Argument parsing only; the work is done by library functions."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from difract_ext.cli.argtypes import (
    nonnegative_number,
    output_folder,
)
from difract_ext.cli.dashboards_job import add_dashboards_parser, copy_shipped_dashboards
from difract_ext.cli.errors import error_line, foreseen
from difract_ext.cli.graphs import add_graph_commands
from difract_ext.cli.options import add_eval_parser, add_harvest_parser, add_train_parser
from difract_ext.cli.steer_job import add_steer_parser


def _cmd_convert(args: argparse.Namespace) -> int:
    from difract_ext.adapters.checkpoints import convert_difract_dir

    manifest = convert_difract_dir(
        args.src,
        args.dst,
        prefixes=tuple(args.roles),
        streams=tuple(args.streams),
        model_name=args.model_name,
        decoder_norm_atol=None if args.no_norm_check else args.norm_atol,
    )
    print(f"converted checkpoints into {args.dst}; manifest: {manifest}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from difract_ext.cli.demo import run_demo

    path = run_demo(Path(args.out))
    print(f"images: {path}")
    if args.no_graph:
        return 0
    from difract_ext.cli.attribution_job import DEMO_PROMPT, demo_graph

    graphs = Path(args.out) / "graphs"
    dash = copy_shipped_dashboards(graphs / "dashboards" / "shapes")
    print(f"feature dashboards: {dash}" if dash else "no shipped dashboards to copy")
    report = demo_graph(graphs)
    print(
        f"attribution graph of step 1 of {DEMO_PROMPT!r}, "
        "target x0:red@left (how red is the left object):"
    )
    print(f"  {report['graph_file']}")
    print(
        f"  nodes: {report['n_feature_nodes']} features + {report['n_residue_nodes']} residue; "
        f"replacement score {report['replacement_score']:.3f}, "
        f"completeness {report['completeness_score']:.3f}, "
        f"conservation error {report['conservation']['max_rel_error']:.1e}, "
        f"unfrozen ablation Spearman {report['unfrozen_ablation_spearman']:.2f}"
    )
    print(f"view it with:  .venv/bin/difract serve {graphs}   (then open http://127.0.0.1:8041/)")
    return 0


def _cmd_harvest(args: argparse.Namespace) -> int:
    from difract_ext.capture import HarvestConfig, harvest
    from difract_ext.capture.processes import process_state
    from difract_ext.cli.sources import load_pipeline, load_prompts, parse_sites
    from difract_ext.flux.defaults import CALL_KEYS, resolve

    device = args.device or str(process_state().device)
    loaded = load_pipeline(args.model, device=device, dtype=args.model_dtype)
    # the pipeline's own defaults, overridden by the flags given; warns outside the trained range
    call = resolve(loaded.pipe, **{key: getattr(args, key) for key in CALL_KEYS})
    config = HarvestConfig(
        sites=parse_sites(args.sites, loaded.pipe.transformer),
        seeds=args.seeds,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        commit_seconds=args.commit_seconds,
        text_padding=args.text_padding,
        subsample=args.subsample,
        text_subsample=args.text_subsample,
        sample_seed=args.sample_seed,
        dtype=args.dtype,
        call_kwargs=call,
        model_name=args.model_name or loaded.model_name,
    )
    result = harvest(
        loaded.pipe,
        load_prompts(args.prompts),
        args.out,
        config,
        resume=args.resume,
        progress=not args.no_progress,
    )
    if process_state().is_main_process:
        print(
            f"harvested {result.units_done}/{result.units_total} (prompt, seed) units into "
            f"{result.root}: {result.shards} shards, rows {result.rows}"
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from difract_ext.cli.train_job import run_train

    return run_train(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from difract_ext.cli.eval_job import run_evaluation
    from difract_ext.cli.sources import load_pipeline, load_prompts

    pipe, call, scorer = None, None, None
    if args.model:
        loaded = load_pipeline(args.model, device=args.device, dtype=args.model_dtype)
        pipe, call = loaded.pipe, loaded.call_kwargs
    if args.adherence == "shapes":
        from difract_ext.toy.analyzer import accuracy_report

        scorer = accuracy_report
    summary = run_evaluation(
        args.dictionaries,
        args.data,
        args.out,
        pipeline=pipe,
        call_kwargs=call,
        splice_prompts=load_prompts(args.splice_prompts) if args.splice_prompts else None,
        splice_seeds=args.splice_seeds,
        splice_max_prompts=args.splice_max_prompts,
        splice_variant=args.splice_variant,
        score_images=scorer,
        allow_overlap=args.allow_overlap,
        batch_size=args.batch_size,
        dense_threshold=args.dense_threshold,
        device=args.device,
        progress=not args.no_progress,
    )
    for e in summary.evals:
        m = e.groups["all"]
        problems = summary.failing.get(e.name)
        split = (
            f"(real {e.groups['real']['explained_variance']:.4f}, "
            f"padding {e.groups['padding']['explained_variance']:.4f})  "
            if "padding" in e.groups
            else ""
        )
        print(
            f"{e.name}: EV {m['explained_variance']:.4f}  {split}L0 {m['l0']:.2f}  "
            f"dead {m['dead_fraction']:.1%}  dense {m['dense_fraction']:.1%}  "
            + ("FAIL: " + "; ".join(problems) if problems else "ok")
        )
    if summary.failing:
        from difract_ext.training.quality import ADVICE

        print(
            f"WARNING: {len(summary.failing)} of {len(summary.evals)} dictionaries FAIL the "
            f"quality checks: {', '.join(summary.failing)}; {ADVICE}"
        )
    for r in summary.splice:
        print(
            f"splice {r['spliced']}: latent cosine {r['latent_cosine']:.4f}  "
            f"mse {r['latent_mse']:.3g}"
        )
    print(f"report: {summary.files['markdown']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difract",
        description="Timestep-conditioned transcoders, tracing and attribution for FLUX models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert",
        help="convert DifFRACT .pt checkpoints to SAELens folders",
        description=(
            "Read every {transcoder,sae}_{img,txt}_{layer}.pt in SRC_DIR (weights-only, "
            "memory-mapped) and write DST_DIR/{transcoders,saes}/{stream}_{layer}/ (cfg.json + "
            "sae_weights.safetensors) plus DST_DIR/manifest.json (source file, sha256). Load the "
            "results with sae_lens.SAE.load_from_disk after `import difract_ext`. DST_DIR must be "
            "new, empty or an earlier conversion's output: files it did not write are never "
            "replaced or deleted."
        ),
    )
    conv.add_argument("src", metavar="SRC_DIR", help="folder with DifFRACT .pt files")
    conv.add_argument("dst", metavar="DST_DIR", help="output folder (created if absent)")
    conv.add_argument(
        "--roles",
        nargs="+",
        default=["transcoder", "sae"],
        choices=["transcoder", "sae"],
        help="which file prefixes to convert",
    )
    conv.add_argument(
        "--streams",
        nargs="+",
        default=["img", "txt"],
        choices=["img", "txt"],
        help="which streams to convert (img = `ff`, txt = `ff_context`)",
    )
    conv.add_argument(
        "--model-name",
        default="black-forest-labs/FLUX.1-schnell",
        help="model recorded in the SAELens metadata",
    )
    conv.add_argument(
        "--norm-atol",
        type=nonnegative_number,
        default=1e-4,
        help="tolerance of the unit-norm decoder check",
    )
    conv.add_argument(
        "--no-norm-check", action="store_true", help="skip the unit-norm decoder check"
    )
    conv.set_defaults(func=_cmd_convert)

    demo = sub.add_parser(
        "demo",
        help="run the main job on the shipped shapes model",
        description="Generate images with the shipped toy FLUX model and write a PNG grid "
        "with the analyzer's verdicts, then build an attribution graph of one step for the "
        "colour of the left object and print the command that serves it.",
    )
    demo.add_argument("--out", default="outputs/demo", type=output_folder, help="output folder")
    demo.add_argument(
        "--no-graph", action="store_true", help="only the image grid, no attribution graph"
    )
    demo.set_defaults(func=_cmd_demo)
    add_harvest_parser(sub).set_defaults(func=_cmd_harvest)
    add_train_parser(sub).set_defaults(func=_cmd_train)
    add_eval_parser(sub).set_defaults(func=_cmd_eval)
    add_graph_commands(sub)
    add_dashboards_parser(sub)
    add_steer_parser(sub)
    for command in sub.choices.values():  # `difract CMD ... --debug` works too
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
    return parser


_DEBUG_HELP = "show the full traceback of an error instead of one line"


_KEPT = {
    "harvest": "finished units are kept",
    "train": "training state up to the last finished step is kept in OUT/checkpoint",
    "dashboards": "finished chunks are kept in OUT/.scan",
}


def interrupted_message(command: str, argv: Sequence[str]) -> str:
    """The one line ``difract`` prints on Ctrl-C: what was kept and how to go on."""
    if command not in _KEPT:
        return f"interrupted; nothing to resume: run `difract {shlex.join(argv)}` again"
    again = list(argv) if "--resume" in argv else [*argv, "--resume"]
    return f"interrupted: {_KEPT[command]}; resume with: difract {shlex.join(again)}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback, the shell's exit status for SIGINT
        print(f"difract {args.command}: {interrupted_message(args.command, argv)}", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug or not foreseen(err):
            raise  # a bug: the traceback is what to report
        print(f"difract {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
