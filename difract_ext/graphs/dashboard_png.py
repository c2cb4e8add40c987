"""One feature's dashboard as a PNG (matplotlib): for papers, issues and slides.

The figure holds the feature's title (site, index, concept label and its F1), its statistics
(max, density, quantiles), the activation profile over the denoising steps, the histogram of its
positive activations, and per step its top examples: the generated image with the patch
heat-map over it (activation / the feature's max, image-stream features) and the prompt with its
tokens highlighted the same way (text-stream features).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from difract_ext.graphs.dashlinks import open_dashboards
from difract_ext.util.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from difract_ext.dashboards.store import DashboardStore
    from difract_ext.flux.sites import Site

logger = logging.getLogger(__name__)

__all__ = ["dashboard_figure", "heat_rgba", "write_dashboard_png"]


def heat_rgba(share: np.ndarray) -> np.ndarray:
    """``[..., 4]`` RGBA in [0, 1] for activation shares ``share`` in [0, 1] (0: transparent;
    then orange to red), the colours of the frontend's heat-maps."""
    s = np.clip(np.asarray(share, dtype=np.float64), 0.0, 1.0)
    rgba = np.empty((*s.shape, 4))
    rgba[..., 0] = 1.0
    rgba[..., 1] = 160.0 * (1.0 - s) / 255.0
    rgba[..., 2] = 0.0
    rgba[..., 3] = np.where(s > 0, 0.15 + 0.7 * s, 0.0)
    return rgba


def _title(p: dict[str, Any]) -> str:
    text = f"{p['site']} #{p['index']}"
    if p.get("label"):
        text += f' "{p["label"]}"'
        if p.get("label_f1") is not None:
            text += f" (F1 {p['label_f1']:.2f})"
    return text


def dashboard_figure(payload: dict[str, Any], dash_dir: str | Path, max_per_step: int = 4) -> Any:
    """The matplotlib ``Figure`` of one ``feature_payload`` (images read from ``dash_dir``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    examples = payload.get("examples") or []
    steps = sorted({int(ex["step"]) for ex in examples})
    n_cols = max(max_per_step, 2)
    n_rows = 1 + max(len(steps), 1)
    fig = plt.figure(figsize=(2.2 * n_cols, 2.0 + 2.4 * max(len(steps), 1)), dpi=100)
    grid = fig.add_gridspec(n_rows, n_cols, height_ratios=[1.0] + [1.35] * (n_rows - 1))
    q = payload.get("quantiles") or {}
    fig.suptitle(
        f"{_title(payload)}\n{payload.get('kind', '')} · max {payload['act_max']:.3g} · fires at "
        f"{100 * payload.get('activation_frequency', 0.0):.2f}% of positions · median "
        f"{q.get('0.5', 0.0):.3g} · q99 {q.get('0.99', 0.0):.3g}",
        fontsize=10,
    )
    half = n_cols // 2
    prof = payload.get("profile") or {}
    ax = fig.add_subplot(grid[0, :half])
    if prof.get("mean"):
        xs = prof.get("t") or prof.get("step")
        ax.plot(xs, prof["mean"], "o-", color="#d0400b")
        ax.set_xlabel("t" if prof.get("t") else "step", fontsize=8)
        if prof.get("t"):
            ax.invert_xaxis()  # denoising runs from t = 1 to 0
    ax.set_title("mean activation per position, by step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[0, half:])
    hist = payload.get("histogram") or {}
    if hist.get("counts"):
        edges = np.asarray(hist["bin_edges"], dtype=np.float64)
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#888")
        ax.set_xscale("log")
    ax.set_title("positive activations", fontsize=8)
    ax.tick_params(labelsize=7)
    act_max = float(payload["act_max"]) or 1.0
    for r, step in enumerate(steps):
        chosen = [ex for ex in examples if int(ex["step"]) == step][:max_per_step]
        for c, ex in enumerate(chosen):
            ax = fig.add_subplot(grid[1 + r, c])
            rows, cols = ex["grid"]
            extent = (0.0, float(cols), float(rows), 0.0)
            image_path = Path(dash_dir) / ex["image"] if ex.get("image") else None
            if image_path is not None and image_path.is_file():
                with Image.open(image_path) as im:
                    ax.imshow(np.asarray(im.convert("RGB")), extent=extent)
            patch = np.asarray(ex.get("patch_acts") or [0.0] * (rows * cols), dtype=np.float64)
            if patch.max(initial=0.0) > 0:
                ax.imshow(
                    heat_rgba(patch.reshape(rows, cols) / act_max),
                    extent=extent,
                    interpolation="nearest",
                )
            ax.set_xlim(0, cols)
            ax.set_ylim(rows, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            t = f" t={ex['t']:.2f}" if ex.get("t") is not None else ""
            ax.set_title(f"step {step}{t} · act {ex['act']:.3g}", fontsize=7)
            tokens = [
                (tok, a)
                for tok, a in zip(ex.get("tokens") or [], ex.get("token_acts") or [], strict=False)
                if tok != "<pad>"
            ]
            _token_strip(ax, tokens, act_max)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def _token_strip(ax: Any, tokens: list[tuple[str, float]], act_max: float) -> None:
    """The prompt under an example, active tokens highlighted by their share of the max."""
    x, y = 0.0, -0.04
    for tok, act in tokens:
        share = max(0.0, float(act)) / act_max
        box = None
        if share > 0:
            box = {"facecolor": tuple(heat_rgba(np.array(share))), "edgecolor": "none", "pad": 1}
        ax.text(
            x,
            y,
            tok,
            transform=ax.transAxes,
            fontsize=6,
            va="top",
            ha="left",
            bbox=box,
            color="black" if share > 0 else "#888",
        )
        x += 0.06 + 0.045 * len(tok)
        if x > 0.95:
            x, y = 0.0, y - 0.09


def write_dashboard_png(
    dashboards: DashboardStore | str | Path,
    site: Site | str,
    feature: int,
    out: str | Path,
    max_per_step: int = 4,
) -> Path:
    """Write one feature's dashboard as a PNG at ``out`` (atomically); returns ``out``."""
    import matplotlib.pyplot as plt

    store = open_dashboards(dashboards)
    if store is None:
        raise ValueError("give a dashboard folder or a DashboardStore")
    if max_per_step < 1:
        raise ValueError(f"max_per_step must be >= 1, got {max_per_step}")
    fig = dashboard_figure(store.feature_payload(site, feature), store.path, max_per_step)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    path = atomic_write_bytes(out, buf.getvalue())
    logger.info("dashboard PNG written: %s", path)
    return path
