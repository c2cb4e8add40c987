#!/usr/bin/env python
"""Train (or resume) the shapes-world FLUX pipeline and optionally export it.

Reproduces the shipped model with the defaults::

    HF_HUB_OFFLINE=1 python scripts/train_shapes.py --out runs/shapes
    # after an interruption:
    HF_HUB_OFFLINE=1 python scripts/train_shapes.py --out runs/shapes --resume
    HF_HUB_OFFLINE=1 python scripts/train_shapes.py --out runs/shapes --export-only \
        --export difract_ext/toy/weights/shapes-flux

Every stage writes its files under ``--out`` atomically; ``--resume`` continues from them.
Without ``--resume`` an existing non-empty ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difract_ext.toy.train import TrainConfig, export_pipeline, train_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("runs/shapes"), help="run folder")
    ap.add_argument("--resume", action="store_true", help="continue from the files in --out")
    ap.add_argument(
        "--export", type=Path, default=None, help="save_pretrained the trained pipeline here"
    )
    ap.add_argument("--export-only", action="store_true", help="only export from --out")
    ap.add_argument(
        "--export-from",
        type=Path,
        default=None,
        help="checkpoint to export (default: --out/ckpt.pt; e.g. --out/snapshots/ema_002400.pt)",
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        kind = (
            (lambda v: v.lower() in ("1", "true", "yes"))
            if isinstance(value, bool)
            else type(value)
        )
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=value)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(args.out / "train_log.txt")],
    )
    if not args.export_only:
        if not args.resume and any(p.suffix not in (".log", ".txt") for p in args.out.iterdir()):
            ap.error(f"{args.out} is not empty; pass --resume to continue it")
        cfg = TrainConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
        )
        train_shapes(args.out, cfg)
    if args.export is not None:
        export_pipeline(args.out, args.export, args.export_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
