"""Demo: a grid of images from the shipped shapes pipeline, each with the analyzer's verdict.

``python -m difract_ext.cli.demo [--out DIR]`` (what ``make demo`` runs) writes
``DIR/shapes_demo.png`` and prints its path. Offline; well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import textwrap
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DEMO_PROMPTS", "run_demo"]

DEMO_PROMPTS: tuple[str, ...] = (
    # held-out single-object prompts (never seen in training)
    "a red square on the right",
    "a red triangle on the left",
    "a green square on the left",
    # train-split single-object prompts
    "a blue circle at the top",
    "a purple triangle at the bottom",
    # held-out two-object prompts
    "a red circle on the left and a purple square on the right",
    "a red square on the left and a yellow square on the right",
    # train-split two-object prompts
    "a yellow triangle at the top and a blue circle at the bottom",
)
"""Prompts of the demo grid (one row each)."""


def _verdict(image: np.ndarray, prompt: str) -> tuple[str, bool]:
    """Short text of what the analyzer saw, and whether it matches the prompt exactly."""
    from difract_ext.toy.analyzer import analyze, score

    s = score(image, prompt)
    seen = ", ".join(f"{d.color} {d.shape} {d.position}" for d in analyze(image)) or "nothing"
    tag = "OK" if s.fully_correct else ("BINDING ERROR" if s.binding_error else "WRONG")
    return f"{tag}: {seen}", s.fully_correct


def run_demo(
    out_dir: str | Path = "outputs/demo",
    prompts: tuple[str, ...] | list[str] = DEMO_PROMPTS,
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    pipeline_path: str | Path | None = None,
) -> Path:
    """Generate ``len(prompts) × len(seeds)`` images and save an annotated grid.

    Args:
        out_dir: folder for ``shapes_demo.png`` (created).
        prompts: one grid row per prompt.
        seeds: one grid column per generation seed.
        pipeline_path: a ``save_pretrained`` folder (default: the shipped weights).

    Returns:
        the PNG path.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difract_ext.toy.pipeline import generate_images, load_shapes_pipeline

    pipe = load_shapes_pipeline(path=pipeline_path)
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    images = generate_images(pipe, ps, ss)
    rows, cols = len(prompts), len(seeds)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.95 * rows), squeeze=False)
    n_ok = 0
    for i, prompt in enumerate(prompts):
        for j in range(cols):
            img = images[i * cols + j]
            text, ok = _verdict(img, prompt)
            n_ok += ok
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if ok else "red")
                spine.set_linewidth(3)
            ax.set_xlabel(
                "\n".join(textwrap.wrap(text, 30)),
                fontsize=6.5,
                color="darkgreen" if ok else "darkred",
            )
            if j == 0:
                ax.set_title("\n".join(textwrap.wrap(prompt, 34)), fontsize=7, loc="left")
            else:
                ax.set_title(f"seed {seeds[j]}", fontsize=7)
    fig.suptitle(
        "shapes FLUX (4 Euler steps, no guidance): "
        f"{n_ok}/{rows * cols} fully correct per analyzer",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "shapes_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("demo grid: %d/%d fully correct -> %s", n_ok, rows * cols, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: write the grid and print its path."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"))
    ap.add_argument("--path", type=Path, default=None, help="pipeline folder (default: shipped)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = run_demo(args.out, pipeline_path=args.path)
    print(f"demo written to {path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
