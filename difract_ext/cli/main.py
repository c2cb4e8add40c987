"""The ``difract`` command line. Argument parsing only; the work is done by library functions."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from difract_ext.cli.graphs import add_graph_commands


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
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert",
        help="convert DifFRACT .pt checkpoints to SAELens folders",
        description=(
            "Read every {transcoder,sae}_{img,txt}_{layer}.pt in SRC_DIR (weights-only, "
            "memory-mapped) and write DST_DIR/{transcoders,saes}/{stream}_{layer}/ (cfg.json + "
            "sae_weights.safetensors) plus DST_DIR/manifest.json (source file, sha256). Load the "
            "results with sae_lens.SAE.load_from_disk after `import difract_ext`."
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
        "--norm-atol", type=float, default=1e-4, help="tolerance of the unit-norm decoder check"
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
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument(
        "--no-graph", action="store_true", help="only the image grid, no attribution graph"
    )
    demo.set_defaults(func=_cmd_demo)
    _add_harvest(sub)
    _add_train(sub)
    _add_eval(sub)
    add_graph_commands(sub)
    return parser


class _FMT(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says where the value comes from)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _add_harvest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "harvest",
        help="record FLUX MLP inputs/outputs and timesteps to safetensors shards",
        formatter_class=_FMT,
        description=(
            "Generate every prompt once per seed (latent output) and store, for each chosen MLP, "
            "its input (normalised, AdaLN-modulated), its output before the gate and the "
            "transformer's timestep, per token and denoising step, in OUT/shards/*.safetensors "
            "with a manifest. Ctrl-C keeps every finished unit (a crash: every committed one, see "
            "--commit-seconds); --resume continues without duplicating rows. Under "
            "`accelerate launch` each process takes a share of the work."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help=(
            "pipeline: 'shapes' (shipped toy), 'tiny[:SEED]' (random toy), "
            "or a FluxPipeline folder / Hub id"
        ),
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file (one per line) or 'shapes:train' / 'shapes:held_out'",
    )
    p.add_argument("--out", required=True, help="harvest folder")
    p.add_argument(
        "--sites",
        nargs="+",
        default=["all"],
        help="MLPs: 'all', 'all:img', 'all:txt', or sites as STREAM_LAYER (e.g. img_3 txt_3)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="generation seeds per prompt")
    p.add_argument(
        "--batch-size", type=int, default=8, help="(prompt, seed) units per pipeline call"
    )
    p.add_argument(
        "--shard-rows",
        type=int,
        default=65536,
        help="write a shard once a stream has this many rows (bounds host memory)",
    )
    p.add_argument(
        "--commit-seconds",
        type=float,
        default=60.0,
        help="also commit the finished units at least this often (a partial shard, merged into "
        "the full one later), so that a crash loses at most this much work",
    )
    p.add_argument(
        "--text-padding",
        choices=["tag", "drop", "keep", "mask"],
        default="tag",
        help="T5 padding rows (FLUX attends to them; DifFRACT trains on them): keep them tagged "
        "in txt.valid so that evaluation reports them apart (tag), leave them out (drop), or keep "
        "them untagged (keep); 'mask' is the old name of 'tag'",
    )
    p.add_argument(
        "--subsample",
        type=int,
        default=1,
        help="keep ceil(n/N) random token positions per unit, step and stream (TIDE: 16)",
    )
    p.add_argument(
        "--text-subsample",
        type=int,
        default=None,
        help="the same for text tokens (default: --subsample)",
    )
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the token subsampling")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="storage dtype of the activations",
    )
    p.add_argument(
        "--model-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="float32",
        help="dtype the pipeline runs in",
    )
    p.add_argument(
        "--model-name", default=None, help="name recorded in the metadata (default: from --model)"
    )
    p.add_argument(
        "--device", default=None, help="device (default: the accelerate process's device)"
    )
    own = "(default: the pipeline's own: its difract_call_defaults.json, else diffusers')"
    p.add_argument(
        "--num-inference-steps",
        type=int,
        default=None,
        help="denoising steps (default: the pipeline's own; else 4 schnell-style, 28 dev-style)",
    )
    p.add_argument("--guidance-scale", type=float, default=None, help=f"guidance scale {own}")
    p.add_argument("--height", type=int, default=None, help=f"image height {own}; shapes: 32")
    p.add_argument("--width", type=int, default=None, help=f"image width {own}; shapes: 32")
    p.add_argument(
        "--max-sequence-length", type=int, default=None, help=f"T5 length {own}; shapes: 16"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest in OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_harvest)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from difract_ext.cli.train_job import recipe_values as rv

    p = sub.add_parser(
        "train",
        help="train conditioned transcoders / SAEs on a harvest",
        formatter_class=_FMT,
        description=(
            "Train every combination of --sites x --roles x --activation x sparsity level in one "
            "pass over the harvest (ReLU + L1 or TopK, variance-normalised MSE, AdamW, cosine "
            "schedule, unit-norm decoder rows). Options marked 'recipe' default to the --recipe's "
            "values. Each dictionary is saved in SAELens' layout under "
            "OUT/{transcoders,saes}/STREAM_LAYER/VARIANT/ with metrics.json and training.json. At "
            "the end, every dictionary's explained variance, L0, dead and dense fractions over its "
            "last training steps are printed, and dictionaries that fail the quality checks "
            "(EV < 0.5, or most features firing on > 30% of rows) are flagged. Checkpoints in "
            "OUT/checkpoint/ allow --resume (Ctrl-C writes one); they are removed when the run "
            "finishes unless --keep-checkpoint. Run under `accelerate launch` for data-parallel "
            "training."
        ),
    )
    p.add_argument("--data", required=True, help="harvest folder (from `difract harvest`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--recipe",
        choices=["auto", "difract", "tide", "shapes"],
        default="auto",
        help="defaults of every option marked 'recipe': difract (DifFRACT's published recipe for "
        "FLUX.1), tide (the same with TopK), shapes (the recipe of the shipped shapes-model "
        "dictionaries); auto: shapes for a harvest of the shapes model, else difract",
    )
    p.add_argument(
        "--sites",
        nargs="+",
        default=["all"],
        help="'all' (every harvested site) or sites such as img_3 txt_3",
    )
    p.add_argument(
        "--roles",
        nargs="+",
        choices=["transcoder", "sae"],
        default=["transcoder"],
        help="transcoder: MLP input -> output; sae: output -> output",
    )
    p.add_argument(
        "--activation",
        nargs="+",
        choices=["relu", "topk"],
        default=None,
        help=f"relu (with L1) and/or topk; recipe: {rv('activation')}",
    )
    p.add_argument(
        "--l1-img",
        nargs="+",
        type=float,
        default=None,
        help=f"L1 coefficients for image-stream ReLU dictionaries (several = a sweep; SAEs too "
        f"unless --l1-sae); recipe: {rv('l1')}, with per-site values for shapes (img_0 3e-3)",
    )
    p.add_argument(
        "--l1-txt",
        nargs="+",
        type=float,
        default=None,
        help="L1 coefficients for text-stream ReLU dictionaries "
        "(recipe: see --l1-img; shapes txt_0 2e-4)",
    )
    p.add_argument(
        "--l1-sae",
        nargs="+",
        type=float,
        default=None,
        help=f"L1 coefficients for ReLU SAEs of both streams; recipe: {rv('l1_sae')}",
    )
    p.add_argument(
        "--k",
        nargs="+",
        type=int,
        default=None,
        help=f"k values for TopK dictionaries; recipe: {rv('k')}",
    )
    p.add_argument(
        "--expansion",
        type=float,
        default=None,
        help=f"d_sae = expansion * d_model for both streams; recipe: {rv('expansion')}",
    )
    p.add_argument("--d-sae", type=int, default=None, help="explicit width (overrides --expansion)")
    p.add_argument(
        "--lr", type=float, default=None, help=f"AdamW learning rate; recipe: {rv('lr')}"
    )
    p.add_argument(
        "--d-t-embed",
        type=int,
        default=None,
        help=f"timestep embedding / time-MLP width; recipe: {rv('d_t_embed')}",
    )
    p.add_argument(
        "--dead-remedy",
        choices=["auto", "resample", "auxk", "none"],
        default="auto",
        help="auto: resample (ReLU) / auxiliary dead-latent loss (TopK)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"rows per step (global, all processes); recipe: {rv('batch_size')}",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"passes over the harvested rows; recipe: {rv('epochs')}",
    )
    p.add_argument(
        "--lr-warmup-steps",
        type=int,
        default=None,
        help=f"linear lr warm-up steps; recipe: {rv('lr_warmup_steps')}",
    )
    p.add_argument(
        "--lr-end-fraction",
        type=float,
        default=None,
        help=f"cosine schedule ends at lr * this; recipe: {rv('lr_end_fraction')}",
    )
    p.add_argument(
        "--l1-warmup-steps",
        type=int,
        default=None,
        help=f"L1 coefficient ramps up over these steps; recipe: {rv('l1_warmup_steps')}",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument(
        "--mix-shards", type=int, default=4, help="shards shuffled together (memory ~ this many)"
    )
    p.add_argument("--seed", type=int, default=0, help="init, data order and resampling seed")
    p.add_argument(
        "--dead-window",
        type=int,
        default=None,
        help=f"steps without firing after which a feature is dead; recipe: {rv('dead_window')}",
    )
    p.add_argument(
        "--resample-every",
        type=int,
        default=None,
        help=f"steps between resamplings (0: never); recipe: {rv('resample_every')}",
    )
    p.add_argument(
        "--resample-until",
        type=float,
        default=None,
        help=f"no resampling after this fraction of training; recipe: {rv('resample_until')}",
    )
    p.add_argument(
        "--resample-min-rate",
        type=float,
        default=None,
        help="also resample features active on fewer than this fraction of the rows seen since the "
        "previous resampling (rare training features are often never active on held-out data); "
        f"0: only features silent for --dead-window steps; recipe: {rv('resample_min_rate')}",
    )
    p.add_argument(
        "--no-padding",
        action="store_true",
        help="train on real T5 tokens only (default: tagged padding rows too, as DifFRACT; "
        "FLUX attends to every T5 position)",
    )
    p.add_argument(
        "--auxk-coefficient",
        type=float,
        default=1 / 32,
        help="weight of the auxiliary dead-latent loss",
    )
    p.add_argument(
        "--auxk-k",
        type=int,
        default=None,
        help="dead latents used by that loss (default d_model/2)",
    )
    p.add_argument(
        "--checkpoint-every-steps",
        type=int,
        default=0,
        help="checkpoint period in steps (0: time only)",
    )
    p.add_argument(
        "--checkpoint-every-seconds", type=float, default=300.0, help="checkpoint period in seconds"
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="stop (with a checkpoint) after this many steps",
    )
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint (or load a finished run without training again)",
    )
    p.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep OUT/checkpoint/trainer_state.pt (weights + optimizer state) "
        "after the run finishes",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out metrics, sparsity-faithfulness curves, spliced generation",
        formatter_class=_FMT,
        description=(
            "Evaluate trained dictionaries on a held-out harvest (prompts disjoint from training): "
            "FVU / explained variance, cosine, L0, dead and dense fractions per dictionary and "
            "timestep, transcoder-vs-SAE curves (PNG + table). With --model, also generate with "
            "MLPs replaced by transcoders (each site alone, then all; no error term) and compare "
            "final latents with the unmodified model. Writes OUT/eval.md, eval.json, "
            "sparsity_faithfulness.png and splice.json."
        ),
    )
    p.add_argument(
        "--dictionaries",
        required=True,
        help="folder of trained dictionaries (searched recursively)",
    )
    p.add_argument("--data", required=True, help="held-out harvest folder")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument(
        "--model",
        default=None,
        help="pipeline for spliced generation (as in harvest); omit to skip",
    )
    p.add_argument(
        "--model-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="float32",
        help="dtype the pipeline runs in",
    )
    p.add_argument(
        "--splice-prompts",
        default=None,
        help="prompt spec for splicing (default: the held-out harvest's prompts)",
    )
    p.add_argument(
        "--splice-seeds", nargs="+", type=int, default=[0], help="seeds per splice prompt"
    )
    p.add_argument(
        "--splice-max-prompts", type=int, default=64, help="at most this many splice prompts"
    )
    p.add_argument(
        "--splice-variant",
        default=None,
        help="transcoder variant to splice per site (default: best EV)",
    )
    p.add_argument(
        "--adherence",
        choices=["none", "shapes"],
        default="none",
        help="also score spliced images for prompt adherence (shapes analyzer)",
    )
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="do not fail if held-out prompts were trained on",
    )
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass")
    p.add_argument(
        "--dense-threshold",
        type=float,
        default=0.1,
        help="firing rate above which a feature is dense",
    )
    p.add_argument("--device", default="cpu", help="device for dictionaries and pipeline")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_eval)


#: What an interrupted command keeps, for commands that can resume.
_KEPT = {
    "harvest": "finished units are kept",
    "train": "training state up to the last finished step is kept in OUT/checkpoint",
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
    except (ValueError, FileNotFoundError, NotImplementedError) as err:  # HarvestFormatError too
        print(f"difract {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback, the shell's exit status for SIGINT
        print(f"difract {args.command}: {interrupted_message(args.command, argv)}", file=sys.stderr)
        return 130
