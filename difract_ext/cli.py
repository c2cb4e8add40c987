"""The ``difract`` command line. Argument parsing only; the work is done by library functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


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
    from difract_ext.toy.demo import run_demo

    path = run_demo(Path(args.out))
    print(f"demo written to {path}")
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
        "with the analyzer's verdicts.",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"difract {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
