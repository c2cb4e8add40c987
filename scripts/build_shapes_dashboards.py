"""Build the shipped dashboards of the shapes model (every shipped transcoder and SAE).

Writes ``difract_ext/toy/dictionaries/dashboards/`` (transcoders, scan ``shapes``) and its
``saes/`` subfolder (SAEs, scan ``shapes-saes``) over the held-out prompts (seed 0, top 5 per
step), with concept labels, and ``dashboards/build.json`` (wall time, threads, sizes, the label
tables). Resumes an interrupted build (re-run it); ``--force`` rebuilds from scratch.

    .venv/bin/python scripts/build_shapes_dashboards.py [--threads 2] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from difract_ext.cli.dashboards_job import build_dashboards
from difract_ext.dashboards.shipped import SHIPPED_SCANS, shipped_dashboards_target
from difract_ext.util.atomic import atomic_write_json

TOP_K = 5


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def markdown_tables(report: dict) -> str:
    """The label tables of ``build.json`` as markdown: per stream, per dictionary, the number of
    features with F1 >= 0.9 and per concept the best feature's F1 pooled over steps / at its best
    single step; then the goal check (best transcoder F1 per colour, shape and position word)."""
    from difract_ext.toy.world import COLORS, POSITIONS, SHAPES

    words = [*COLORS, *SHAPES, *POSITIONS]
    lines = []
    for stream, prefix in (("img", None), ("txt", "word=")):
        cols = (
            ["background", "object"]
            + [f"colour={c}" for c in COLORS]
            + [f"shape={s}" for s in SHAPES]
            + [f"position={p}" for p in POSITIONS]
            if prefix is None
            else [f"word={w}" for w in words]
        )
        lines.append(
            f"| {stream} dictionary | F1 >= 0.9 | "
            + " | ".join(c.split("=")[-1] for c in cols)
            + " |"
        )
        lines.append("|---" * (len(cols) + 2) + "|")
        for role, entry in report["roles"].items():
            for site, table in entry["tables"].items():
                if not site.startswith(stream):
                    continue
                cells = [
                    f"{table['best'][c]['f1']:.2f} / {table['best_step'][c]['f1']:.2f}"
                    for c in cols
                ]
                lines.append(
                    f"| {role} {site} | {table['n_features_f1_ge_0.9']} | "
                    + " | ".join(cells)
                    + " |"
                )
        lines.append("")
    lines.append("| word | best transcoder F1 (pooled) | where | best at one step | where |")
    lines.append("|---|---|---|---|---|")
    tables = report["roles"]["transcoder"]["tables"]
    for w in words:
        kind = "colour" if w in COLORS else "shape" if w in SHAPES else "position"
        cands = [
            (t["best"][c], site, c)
            for site, t in tables.items()
            for c in (f"{kind}={w}", f"word={w}")
            if c in t["best"]
        ]
        steps = [
            (t["best_step"][c], site, c)
            for site, t in tables.items()
            for c in (f"{kind}={w}", f"word={w}")
            if c in t["best_step"]
        ]
        b, bs, bc = max(cands, key=lambda x: x[0]["f1"])
        s_, ss, sc = max(steps, key=lambda x: x[0]["f1"])
        lines.append(
            f"| {w} | {b['f1']:.3f} | {bs} #{b['feature']} ({bc}) | {s_['f1']:.3f} | "
            f"{ss} #{s_['feature']} step {s_['step']} ({sc}) |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="delete the built dashboards first")
    ap.add_argument("--table", action="store_true", help="only print build.json's tables")
    args = ap.parse_args()
    if args.table:
        report = json.loads((shipped_dashboards_target("transcoder") / "build.json").read_text())
        print(markdown_tables(report))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    root = shipped_dashboards_target("transcoder")
    if args.force and root.exists():
        shutil.rmtree(root)
    report: dict = {
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "note": "CPU shared with other jobs while it ran",
        "top_k": TOP_K,
        "roles": {},
    }
    old_file = root / "build.json"
    old = json.loads(old_file.read_text()) if old_file.is_file() else {"roles": {}}
    for role in ("transcoder", "sae"):
        out = shipped_dashboards_target(role)
        finished = (out / "index.json").is_file() and not (out / ".scan").is_dir()
        resume = (out / ".scan").is_dir() or (out / "index.json").is_file()
        t0 = time.perf_counter()
        build_dashboards(out, role=role, top_k=TOP_K, scan=SHIPPED_SCANS[role], resume=resume)
        concepts = json.loads((out / "concepts.json").read_text())
        seconds = round(time.perf_counter() - t0, 1)
        if finished and role in old["roles"]:  # already built: keep the time it took then
            seconds = old["roles"][role]["seconds"]
        report["roles"][role] = {"seconds": seconds, "tables": concepts}
    report["seconds_total"] = round(sum(r["seconds"] for r in report["roles"].values()), 1)
    report["bytes_total"] = _size(root)
    atomic_write_json(root / "build.json", report)
    print(
        f"built in {report['seconds_total']} s with {args.threads} threads; "
        f"{report['bytes_total'] / 1e6:.2f} MB in {root}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
