"""Sparsity–faithfulness curves: transcoders vs SAEs, one panel per site (PNG + markdown table).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from difract_ext.training.evaluation import ALL, DictionaryEval

_STYLE = {
    ("transcoder", "relu"): ("tab:blue", "o", "-"),
    ("transcoder", "topk"): ("tab:cyan", "s", "-"),
    ("sae", "relu"): ("tab:red", "o", "--"),
    ("sae", "topk"): ("tab:orange", "s", "--"),
}


def curve_points(
    evals: Sequence[DictionaryEval], group: str = ALL
) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """``{(site, role, activation): [(L0, FVU), ...]}`` sorted by L0."""
    pts: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for e in evals:
        m = e.groups.get(group)
        if m is not None:
            pts.setdefault((e.site, e.role, e.activation), []).append((m["l0"], m["fvu"]))
    return {k: sorted(v) for k, v in pts.items()}


def plot_sparsity_faithfulness(
    evals: Sequence[DictionaryEval], path: str | Path, group: str = ALL
) -> Path:
    """Write a PNG: per site, FVU (log scale) against mean L0, one line per (role, activation)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = curve_points(evals, group)
    sites = sorted({k[0] for k in pts})
    if not sites:
        raise ValueError("no evaluation results to plot")
    cols = min(4, len(sites))
    rows = math.ceil(len(sites) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), dpi=110)
    FigureCanvasAgg(fig)
    for i, site in enumerate(sites):
        ax = fig.add_subplot(rows, cols, i + 1)
        for (s, role, act), p in sorted(pts.items()):
            if s != site:
                continue
            color, marker, ls = _STYLE.get((role, act), ("gray", "x", ":"))
            ax.plot(
                [a for a, _ in p],
                [max(b, 1e-6) for _, b in p],
                marker=marker,
                linestyle=ls,
                color=color,
                label=f"{role} ({act})",
            )
        ax.set_yscale("log")
        ax.set_title(site)
        ax.set_xlabel("mean L0 (active features per row)")
        ax.set_ylabel("FVU (held out)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Sparsity vs faithfulness (lower-left is better)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def curves_table(evals: Sequence[DictionaryEval], group: str = ALL) -> str:
    """Markdown table of the curve points: site, role, activation, sparsity knob, L0, FVU, EV."""
    head = (
        "| site | role | act. | sparsity | d_sae | L0 | FVU | EV |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = sorted(
        (e for e in evals if group in e.groups),
        key=lambda e: (e.site, e.role, e.activation, e.groups[group]["l0"]),
    )
    lines = [
        f"| {e.site} | {e.role} | {e.activation} | {e.sparsity:g} | {e.d_sae} | "
        f"{e.groups[group]['l0']:.2f} | {e.groups[group]['fvu']:.4f} | "
        f"{e.groups[group]['explained_variance']:.4f} |"
        for e in rows
    ]
    return head + "\n".join(lines) + "\n"
