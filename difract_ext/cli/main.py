"""The ``difract`` command line. Argument parsing only; the work is done by library functions."""

from __future__ import annotations

import argparse
import logging
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
    print(f"attribution graph of step 1 of {DEMO_PROMPT!r}, target x0:red@left (how red is the left object):")
    print(f"  {report['graph_file']}")
    print(f"  nodes: {report['n_feature_nodes']} features + {report['n_residue_nodes']} residue; replacement "
          f"score {report['replacement_score']:.3f}, completeness {report['completeness_score']:.3f}, "
          f"conservation error {report['conservation']['max_rel_error']:.1e}, unfrozen ablation Spearman "
          f"{report['unfrozen_ablation_spearman']:.2f}")
    print(f"view it with:  .venv/bin/difract serve {graphs}   (then open http://127.0.0.1:8041/)")
    return 0


def _cmd_harvest(args: argparse.Namespace) -> int:
    from difract_ext.capture import HarvestConfig, harvest
    from difract_ext.capture.processes import process_state
    from difract_ext.cli.sources import load_pipeline, load_prompts, parse_sites

    device = args.device or str(process_state().device)
    loaded = load_pipeline(args.model, device=device, dtype=args.model_dtype)
    call = dict(loaded.call_kwargs)
    for key in ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)
    config = HarvestConfig(
        sites=parse_sites(args.sites, loaded.pipe.transformer),
        seeds=args.seeds,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        text_padding=args.text_padding,
        subsample=args.subsample,
        text_subsample=args.text_subsample,
        sample_seed=args.sample_seed,
        dtype=args.dtype,
        call_kwargs=call,
        model_name=args.model_name or loaded.model_name,
    )
    result = harvest(loaded.pipe, load_prompts(args.prompts), args.out, config,
                     resume=args.resume, progress=not args.no_progress)
    if process_state().is_main_process:
        print(f"harvested {result.units_done}/{result.units_total} (prompt, seed) units into "
              f"{result.root}: {result.shards} shards, rows {result.rows}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from difract_ext.capture import HarvestReader
    from difract_ext.capture.processes import process_state
    from difract_ext.cli.sources import parse_sites
    from difract_ext.training import TrainConfig, train_dictionaries
    from difract_ext.training.specs import specs_from_options

    reader = HarvestReader(args.data)
    sites = parse_sites(args.sites, available=reader.sites)
    specs = specs_from_options(
        sites, roles=args.roles, activations=args.activation, l1_img=args.l1_img, l1_txt=args.l1_txt,
        ks=args.k, expansion_factor=args.expansion, d_sae=args.d_sae, lr=args.lr,
        d_t_embed=args.d_t_embed, dead_remedy=args.dead_remedy,
    )
    config = TrainConfig(
        batch_size=args.batch_size, epochs=args.epochs, lr_warmup_steps=args.lr_warmup_steps,
        lr_end_fraction=args.lr_end_fraction, l1_warmup_steps=args.l1_warmup_steps,
        weight_decay=args.weight_decay, mix_shards=args.mix_shards, seed=args.seed,
        dead_window=args.dead_window, resample_every=args.resample_every,
        resample_until=args.resample_until, resample_min_rate=args.resample_min_rate,
        auxk_coefficient=args.auxk_coefficient,
        auxk_k=args.auxk_k, checkpoint_every_steps=args.checkpoint_every_steps,
        checkpoint_every_seconds=args.checkpoint_every_seconds,
        stop_after_steps=args.stop_after_steps, log_every=args.log_every,
    )
    result = train_dictionaries(reader, specs, args.out, config, resume=args.resume,
                                progress=not args.no_progress)
    if process_state().is_main_process:
        if not result.finished:
            print(f"stopped at global step {result.global_step}; continue with --resume")
        for name, metrics in result.metrics.items():
            f = metrics["final"]
            print(f"{name}: nmse {f.get('nmse', float('nan')):.4f}  L0 {f.get('l0', float('nan')):.1f}  "
                  f"dead {f['dead_fraction']:.1%}")
        print(f"dictionaries written under {result.out_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from difract_ext.cli.sources import load_pipeline, load_prompts
    from difract_ext.training import run_evaluation

    pipe, call, scorer = None, None, None
    if args.model:
        loaded = load_pipeline(args.model, device=args.device, dtype=args.model_dtype)
        pipe, call = loaded.pipe, loaded.call_kwargs
    if args.adherence == "shapes":
        from difract_ext.toy.analyzer import accuracy_report

        scorer = accuracy_report
    summary = run_evaluation(
        args.dictionaries, args.data, args.out, pipeline=pipe, call_kwargs=call,
        splice_prompts=load_prompts(args.splice_prompts) if args.splice_prompts else None,
        splice_seeds=args.splice_seeds, splice_max_prompts=args.splice_max_prompts,
        splice_variant=args.splice_variant, score_images=scorer, allow_overlap=args.allow_overlap,
        batch_size=args.batch_size, dense_threshold=args.dense_threshold, device=args.device,
        progress=not args.no_progress,
    )
    for e in summary.evals:
        m = e.groups["all"]
        print(f"{e.name}: EV {m['explained_variance']:.4f}  L0 {m['l0']:.2f}  "
              f"dead {m['dead_fraction']:.1%}  dense {m['dense_fraction']:.1%}")
    for r in summary.splice:
        print(f"splice {r['spliced']}: latent cosine {r['latent_cosine']:.4f}  mse {r['latent_mse']:.3g}")
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
            "Read every {transcoder,sae}_{img,txt}_{layer}.pt in SRC_DIR (weights-only, memory-mapped) "
            "and write DST_DIR/{transcoders,saes}/{stream}_{layer}/ (cfg.json + "
            "sae_weights.safetensors) plus DST_DIR/manifest.json (source file, sha256). Load the "
            "results with sae_lens.SAE.load_from_disk after `import difract_ext`."
        ),
    )
    conv.add_argument("src", metavar="SRC_DIR", help="folder with DifFRACT .pt files")
    conv.add_argument("dst", metavar="DST_DIR", help="output folder (created if absent)")
    conv.add_argument("--roles", nargs="+", default=["transcoder", "sae"],
                      choices=["transcoder", "sae"], help="which file prefixes to convert")
    conv.add_argument("--streams", nargs="+", default=["img", "txt"], choices=["img", "txt"],
                      help="which streams to convert (img = `ff`, txt = `ff_context`)")
    conv.add_argument("--model-name", default="black-forest-labs/FLUX.1-schnell",
                      help="model recorded in the SAELens metadata")
    conv.add_argument("--norm-atol", type=float, default=1e-4,
                      help="tolerance of the unit-norm decoder check")
    conv.add_argument("--no-norm-check", action="store_true",
                      help="skip the unit-norm decoder check")
    conv.set_defaults(func=_cmd_convert)

    demo = sub.add_parser(
        "demo",
        help="run the main job on the shipped shapes model",
        description="Generate images with the shipped toy FLUX model and write a PNG grid "
        "with the analyzer's verdicts, then build an attribution graph of one step for the "
        "colour of the left object and print the command that serves it.",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--no-graph", action="store_true", help="only the image grid, no attribution graph")
    demo.set_defaults(func=_cmd_demo)
    _add_harvest(sub)
    _add_train(sub)
    _add_eval(sub)
    add_graph_commands(sub)
    return parser


_FMT = argparse.ArgumentDefaultsHelpFormatter


def _add_harvest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "harvest", help="record FLUX MLP inputs/outputs and timesteps to safetensors shards",
        formatter_class=_FMT,
        description=(
            "Generate every prompt once per seed (latent output) and store, for each chosen MLP, "
            "its input (normalised, AdaLN-modulated), its output before the gate and the "
            "transformer's timestep, per token and denoising step, in OUT/shards/*.safetensors "
            "with a manifest. Interrupting loses no committed shard; --resume continues without "
            "duplicating rows. Under `accelerate launch` each process takes a share of the work."
        ),
    )
    p.add_argument("--model", required=True,
                   help="pipeline: 'shapes' (shipped toy), 'tiny[:SEED]' (random toy), or a FluxPipeline folder / Hub id")
    p.add_argument("--prompts", required=True,
                   help="prompt file (one per line) or 'shapes:train' / 'shapes:held_out'")
    p.add_argument("--out", required=True, help="harvest folder")
    p.add_argument("--sites", nargs="+", default=["all"],
                   help="MLPs: 'all', 'all:img', 'all:txt', or LAYER:STREAM / STREAM_LAYER (e.g. 3:img txt_3)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="generation seeds per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="(prompt, seed) units per pipeline call")
    p.add_argument("--shard-rows", type=int, default=65536,
                   help="write a shard once a stream has this many rows (bounds host memory)")
    p.add_argument("--text-padding", choices=["drop", "mask", "keep"], default="drop",
                   help="T5 padding rows: drop them, keep them flagged in txt.valid, or keep them unflagged")
    p.add_argument("--subsample", type=int, default=1,
                   help="keep ceil(n/N) random token positions per unit, step and stream (TIDE: 16)")
    p.add_argument("--text-subsample", type=int, default=None,
                   help="the same for text tokens (default: --subsample)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the token subsampling")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="storage dtype of the activations")
    p.add_argument("--model-dtype", choices=["bfloat16", "float16", "float32"], default="float32",
                   help="dtype the pipeline runs in")
    p.add_argument("--model-name", default=None, help="name recorded in the metadata (default: from --model)")
    p.add_argument("--device", default=None, help="device (default: the accelerate process's device)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="override the pipeline's default steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="override the guidance scale")
    p.add_argument("--height", type=int, default=None, help="override the image height")
    p.add_argument("--width", type=int, default=None, help="override the image width")
    p.add_argument("--max-sequence-length", type=int, default=None, help="override the T5 length")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest in OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_harvest)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train conditioned transcoders / SAEs on a harvest", formatter_class=_FMT,
        description=(
            "Train every combination of --sites x --roles x --activation x sparsity level in one "
            "pass over the harvest (DifFRACT recipe: ReLU + L1, variance-normalised MSE, AdamW, "
            "cosine schedule, unit-norm decoder rows; TIDE recipe: TopK). Each dictionary is saved "
            "in SAELens' layout under OUT/{transcoders,saes}/STREAM_LAYER/VARIANT/ with "
            "metrics.json and training.json; checkpoints in OUT/checkpoint/ allow --resume. Run "
            "under `accelerate launch` for data-parallel training."
        ),
    )
    p.add_argument("--data", required=True, help="harvest folder (from `difract harvest`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sites", nargs="+", default=["all"], help="'all' (every harvested site) or LAYER:STREAM ...")
    p.add_argument("--roles", nargs="+", choices=["transcoder", "sae"], default=["transcoder"],
                   help="transcoder: MLP input -> output; sae: output -> output")
    p.add_argument("--activation", nargs="+", choices=["relu", "topk"], default=["relu"],
                   help="relu (DifFRACT, with L1) and/or topk (TIDE)")
    p.add_argument("--l1-img", nargs="+", type=float, default=[3e-4],
                   help="L1 coefficients for image-stream ReLU dictionaries (several = a sweep)")
    p.add_argument("--l1-txt", nargs="+", type=float, default=[5e-5],
                   help="L1 coefficients for text-stream ReLU dictionaries")
    p.add_argument("--k", nargs="+", type=int, default=[32], help="k values for TopK dictionaries")
    p.add_argument("--expansion", type=float, default=16.0, help="d_sae = expansion * d_model")
    p.add_argument("--d-sae", type=int, default=None, help="explicit width (overrides --expansion)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--d-t-embed", type=int, default=256, help="timestep embedding / time-MLP width")
    p.add_argument("--dead-remedy", choices=["auto", "resample", "auxk", "none"], default="auto",
                   help="auto: resample (ReLU) / auxiliary dead-latent loss (TopK)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per step (global, all processes)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the harvested rows")
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear lr warm-up steps")
    p.add_argument("--lr-end-fraction", type=float, default=0.0, help="cosine schedule ends at lr * this")
    p.add_argument("--l1-warmup-steps", type=int, default=0, help="L1 coefficient ramps up over these steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--mix-shards", type=int, default=4, help="shards shuffled together (memory ~ this many)")
    p.add_argument("--seed", type=int, default=0, help="init, data order and resampling seed")
    p.add_argument("--dead-window", type=int, default=1000, help="steps without firing after which a feature is dead")
    p.add_argument("--resample-every", type=int, default=2000, help="steps between resamplings (0: never)")
    p.add_argument("--resample-until", type=float, default=0.75, help="no resampling after this fraction of training")
    p.add_argument("--resample-min-rate", type=float, default=0.0,
                   help="also resample features active on fewer than this fraction of the rows seen since the "
                        "previous resampling (rare training features are often never active on held-out data; "
                        "the shapes dictionaries use 2e-4); 0: only features silent for --dead-window steps")
    p.add_argument("--auxk-coefficient", type=float, default=1 / 32, help="weight of the auxiliary dead-latent loss")
    p.add_argument("--auxk-k", type=int, default=None, help="dead latents used by that loss (default d_model/2)")
    p.add_argument("--checkpoint-every-steps", type=int, default=0, help="checkpoint period in steps (0: time only)")
    p.add_argument("--checkpoint-every-seconds", type=float, default=300.0, help="checkpoint period in seconds")
    p.add_argument("--stop-after-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="held-out metrics, sparsity-faithfulness curves, spliced generation",
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
    p.add_argument("--dictionaries", required=True, help="folder of trained dictionaries (searched recursively)")
    p.add_argument("--data", required=True, help="held-out harvest folder")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--model", default=None, help="pipeline for spliced generation (as in harvest); omit to skip")
    p.add_argument("--model-dtype", choices=["bfloat16", "float16", "float32"], default="float32",
                   help="dtype the pipeline runs in")
    p.add_argument("--splice-prompts", default=None, help="prompt spec for splicing (default: the held-out harvest's prompts)")
    p.add_argument("--splice-seeds", nargs="+", type=int, default=[0], help="seeds per splice prompt")
    p.add_argument("--splice-max-prompts", type=int, default=64, help="at most this many splice prompts")
    p.add_argument("--splice-variant", default=None, help="transcoder variant to splice per site (default: best EV)")
    p.add_argument("--adherence", choices=["none", "shapes"], default="none",
                   help="also score spliced images for prompt adherence (shapes analyzer)")
    p.add_argument("--allow-overlap", action="store_true", help="do not fail if held-out prompts were trained on")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass")
    p.add_argument("--dense-threshold", type=float, default=0.1, help="firing rate above which a feature is dense")
    p.add_argument("--device", default="cpu", help="device for dictionaries and pipeline")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_eval)


def main(argv: Sequence[str] | None = None) -> int:
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

