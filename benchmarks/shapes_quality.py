#!/usr/bin/env python
"""Prompt adherence of the shipped shapes FLUX pipeline, measured by the shapes analyzer.

Evaluates HELD-OUT prompts (``split_prompts(n, 0.15, seed=0)``; never seen in training) with
generation seeds ``0 .. seeds-1`` (training renders use seeds >= 1,000,000 and training noise
its own per-step generators). Optionally also the train prompts, for the generalisation gap.

    HF_HUB_OFFLINE=1 python benchmarks/shapes_quality.py                 # shipped weights
    HF_HUB_OFFLINE=1 python benchmarks/shapes_quality.py --path runs/shapes/export --train

Prints per-attribute accuracy, fully-correct rate and (two objects) binding-error rate, plus a
JSON line for BENCHMARKS.md. About 2 minutes on 2 idle CPU cores (4 with --train).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from difract_ext.toy.analyzer import accuracy_report  # noqa: E402
from difract_ext.toy.pipeline import generate_images, load_shapes_pipeline  # noqa: E402
from difract_ext.toy.world import split_prompts  # noqa: E402


def _expand(
    prompts: list[str], seeds_per_prompt: int, max_prompts: int | None = None
) -> tuple[list[str], list[int]]:
    """(prompt, seed) pairs: seeds 0..k-1 for each prompt (an optional fixed random subset of
    prompts).
    """
    if max_prompts is not None and len(prompts) > max_prompts:
        pick = np.random.default_rng(0).choice(len(prompts), max_prompts, replace=False)
        prompts = [prompts[i] for i in sorted(pick)]
    return [p for p in prompts for _ in range(seeds_per_prompt)], [
        s for _ in prompts for s in range(seeds_per_prompt)
    ]


def evaluate(
    pipe,
    single: list[str],
    double: list[str],
    single_seeds: int,
    double_seeds: int,
    max_double: int | None = None,
) -> dict[str, float]:
    """Generate images for one- and two-object prompts and aggregate the analyzer's scores."""
    p1, s1 = _expand(single, single_seeds)
    p2, s2 = _expand(double, double_seeds, max_double)
    images = generate_images(pipe, p1 + p2, s1 + s2)
    return accuracy_report(list(images), p1 + p2)


def _fmt(name: str, rep: dict[str, float]) -> str:
    lines = [f"{name}"]
    for group in ("single", "double"):
        if rep.get(f"{group}/n", 0) == 0:
            continue
        parts = [f"n={int(rep[f'{group}/n'])}"]
        for k in ("color", "shape", "position", "count", "fully_correct"):
            parts.append(f"{k}={rep[f'{group}/{k}']:.3f}")
        if group == "double":
            parts.append(f"binding_error={rep['double/binding_error']:.3f}")
        lines.append(f"  {group:6s} " + "  ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--path", type=Path, default=None, help="pipeline folder (default: shipped)")
    ap.add_argument(
        "--single-seeds", type=int, default=20, help="seeds per held-out single-object prompt"
    )
    ap.add_argument(
        "--double-seeds", type=int, default=2, help="seeds per held-out two-object prompt"
    )
    ap.add_argument(
        "--train", action="store_true", help="also evaluate (a sample of) train prompts"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = load_shapes_pipeline(path=args.path)
    _, ho1 = split_prompts(1)
    _, ho2 = split_prompts(2)
    results = {"held_out": evaluate(pipe, ho1, ho2, args.single_seeds, args.double_seeds)}
    print(_fmt("held-out prompts (seeds 0..k-1)", results["held_out"]))
    if args.train:
        tr1, _ = split_prompts(1)
        tr2, _ = split_prompts(2)
        results["train"] = evaluate(pipe, tr1, tr2, 4, 1, max_double=200)
        print(_fmt("train prompts", results["train"]))
    print(f"({time.time() - t0:.0f} s)")
    print(
        "JSON "
        + json.dumps({g: {k: round(v, 4) for k, v in r.items()} for g, r in results.items()})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
