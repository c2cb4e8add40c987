"""Options of the long sub-commands (``harvest``, ``train``, ``eval``): argument parsing only."""

from __future__ import annotations

import argparse

from difract_ext.cli.argtypes import (
    device,
    fraction,
    nonnegative_int,
    nonnegative_number,
    number_in,
    output_folder,
    positive_int,
    positive_number,
    seed,
)


class _FMT(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says where the value comes from)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def add_harvest_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `difract harvest` sub-command's options (the caller sets its function)."""
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
    p.add_argument("--out", required=True, type=output_folder, help="harvest folder")
    p.add_argument(
        "--sites",
        nargs="+",
        default=["all"],
        help="MLPs: 'all', 'all:img', 'all:txt', or sites as STREAM_LAYER (e.g. img_3 txt_3)",
    )
    p.add_argument("--seeds", nargs="+", type=seed, default=[0], help="generation seeds per prompt")
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="(prompt, seed) units per pipeline call"
    )
    p.add_argument(
        "--shard-rows",
        type=positive_int,
        default=65536,
        help="write a shard once a stream has this many rows (bounds host memory)",
    )
    p.add_argument(
        "--commit-seconds",
        type=nonnegative_number,
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
        type=positive_int,
        default=1,
        help="keep ceil(n/N) random token positions per unit, step and stream (TIDE: 16)",
    )
    p.add_argument(
        "--text-subsample",
        type=positive_int,
        default=None,
        help="the same for text tokens (default: --subsample)",
    )
    p.add_argument("--sample-seed", type=seed, default=0, help="seed of the token subsampling")
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
        "--device",
        type=device,
        default=None,
        help="device (default: the accelerate process's device)",
    )
    own = "(default: the pipeline's own: its difract_call_defaults.json, else diffusers')"
    p.add_argument(
        "--num-inference-steps",
        type=positive_int,
        default=None,
        help="denoising steps (default: the pipeline's own; else 4 schnell-style, 28 dev-style)",
    )
    p.add_argument(
        "--guidance-scale", type=nonnegative_number, default=None, help=f"guidance scale {own}"
    )
    p.add_argument(
        "--height", type=positive_int, default=None, help=f"image height {own}; shapes: 32"
    )
    p.add_argument(
        "--width", type=positive_int, default=None, help=f"image width {own}; shapes: 32"
    )
    p.add_argument(
        "--max-sequence-length",
        type=positive_int,
        default=None,
        help=f"T5 length {own}; shapes: 16",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest in OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `difract train` sub-command's options (the caller sets its function)."""
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
    p.add_argument("--out", required=True, type=output_folder, help="output folder")
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
        type=nonnegative_number,
        default=None,
        help=f"L1 coefficients for image-stream ReLU dictionaries (several = a sweep; SAEs too "
        f"unless --l1-sae); recipe: {rv('l1')}, with per-site values for shapes (img_0 3e-3)",
    )
    p.add_argument(
        "--l1-txt",
        nargs="+",
        type=nonnegative_number,
        default=None,
        help="L1 coefficients for text-stream ReLU dictionaries "
        "(recipe: see --l1-img; shapes txt_0 2e-4)",
    )
    p.add_argument(
        "--l1-sae",
        nargs="+",
        type=nonnegative_number,
        default=None,
        help=f"L1 coefficients for ReLU SAEs of both streams; recipe: {rv('l1_sae')}",
    )
    p.add_argument(
        "--k",
        nargs="+",
        type=positive_int,
        default=None,
        help=f"k values for TopK dictionaries; recipe: {rv('k')}",
    )
    p.add_argument(
        "--expansion",
        type=positive_number,
        default=None,
        help=f"d_sae = expansion * d_model for both streams; recipe: {rv('expansion')}",
    )
    p.add_argument(
        "--d-sae", type=positive_int, default=None, help="explicit width (overrides --expansion)"
    )
    p.add_argument(
        "--lr", type=positive_number, default=None, help=f"AdamW learning rate; recipe: {rv('lr')}"
    )
    p.add_argument(
        "--d-t-embed",
        type=positive_int,
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
        type=positive_int,
        default=None,
        help=f"rows per step (global, all processes); recipe: {rv('batch_size')}",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"passes over the harvested rows; recipe: {rv('epochs')}",
    )
    p.add_argument(
        "--lr-warmup-steps",
        type=nonnegative_int,
        default=None,
        help=f"linear lr warm-up steps; recipe: {rv('lr_warmup_steps')}",
    )
    p.add_argument(
        "--lr-end-fraction",
        type=fraction,
        default=None,
        help=f"cosine schedule ends at lr * this; recipe: {rv('lr_end_fraction')}",
    )
    p.add_argument(
        "--l1-warmup-steps",
        type=nonnegative_int,
        default=None,
        help=f"L1 coefficient ramps up over these steps; recipe: {rv('l1_warmup_steps')}",
    )
    p.add_argument(
        "--weight-decay", type=nonnegative_number, default=0.0, help="AdamW weight decay"
    )
    p.add_argument(
        "--mix-shards",
        type=positive_int,
        default=4,
        help="shards shuffled together (memory ~ this many)",
    )
    p.add_argument("--seed", type=seed, default=0, help="init, data order and resampling seed")
    p.add_argument(
        "--dead-window",
        type=positive_int,
        default=None,
        help=f"steps without firing after which a feature is dead; recipe: {rv('dead_window')}",
    )
    p.add_argument(
        "--resample-every",
        type=nonnegative_int,
        default=None,
        help=f"steps between resamplings (0: never); recipe: {rv('resample_every')}",
    )
    p.add_argument(
        "--resample-until",
        type=fraction,
        default=None,
        help=f"no resampling after this fraction of training; recipe: {rv('resample_until')}",
    )
    p.add_argument(
        "--resample-min-rate",
        type=number_in(0, 1, high_open=True),
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
        type=nonnegative_number,
        default=1 / 32,
        help="weight of the auxiliary dead-latent loss",
    )
    p.add_argument(
        "--auxk-k",
        type=positive_int,
        default=None,
        help="dead latents used by that loss (default d_model/2)",
    )
    p.add_argument(
        "--checkpoint-every-steps",
        type=nonnegative_int,
        default=0,
        help="checkpoint period in steps (0: time only)",
    )
    p.add_argument(
        "--checkpoint-every-seconds",
        type=nonnegative_number,
        default=300.0,
        help="checkpoint period in seconds",
    )
    p.add_argument(
        "--stop-after-steps",
        type=positive_int,
        default=None,
        help="stop (with a checkpoint) after this many steps",
    )
    p.add_argument("--log-every", type=nonnegative_int, default=100, help="steps between log lines")
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
    return p


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `difract eval` sub-command's options (the caller sets its function)."""
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
    p.add_argument("--out", required=True, type=output_folder, help="report folder")
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
        "--splice-seeds", nargs="+", type=seed, default=[0], help="seeds per splice prompt"
    )
    p.add_argument(
        "--splice-max-prompts",
        type=positive_int,
        default=64,
        help="at most this many splice prompts",
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
    p.add_argument("--batch-size", type=positive_int, default=4096, help="rows per forward pass")
    p.add_argument(
        "--dense-threshold",
        type=number_in(0, 1, low_open=True),
        default=0.1,
        help="firing rate above which a feature is dense",
    )
    p.add_argument(
        "--device", type=device, default="cpu", help="device for dictionaries and pipeline"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


#: What an interrupted command keeps, for commands that can resume.
