"""Read shapes-world images back into objects, and score images against prompts.

Pipeline of :func:`analyze`:

1. Pixels: each pixel ``p`` is explained as ``BACKGROUND + alpha * (c - BACKGROUND)`` for
   every palette colour ``c`` of :data:`~difract_ext.toy.world.COLORS` (least-squares
   ``alpha``); the colour with the smallest RGB residual wins when ``alpha >= 0.5`` and the
   residual is ``<= 60``, else the pixel is background. So dark pixels and blurred edges
   below half coverage are background, and the half-coverage contour of a blurred edge is
   kept where the sharp edge was (objects do not shrink under blur).
2. Clean-up: a pixel whose 8 neighbours agree on another class in at least 7 places takes
   that class (one-pixel holes, isolated speckles and pixels hanging on by one neighbour
   go; corners and triangle apexes stay).
3. 8-connected components per colour; components smaller than ``min_area`` (default
   ``max(2, round(8 * H * W / 32**2))``, i.e. 8 px at 32 px) are ignored.
4. Shape: the component is compared with a disc, an axis-aligned square and an upward
   isosceles triangle having the component's centroid and per-axis pixel variance (moment
   matching is robust to stray edge pixels and rounded corners); the best
   intersection-over-union wins and is reported as ``confidence``.
5. Position: with exactly two objects the pair decides: if their centroids are farther apart
   in columns than in rows they are left/right (smaller column = left), otherwise top/bottom.
   Otherwise each object gets the side of its larger centroid offset from the image centre.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from difract_ext.toy.world import BACKGROUND, COLORS, OPPOSITE, SHAPES, Scene, parse_prompt

logger = logging.getLogger(__name__)

__all__ = ["DetectedObject", "PromptScore", "accuracy_report", "analyze", "score", "to_uint8"]

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_BG = np.array(BACKGROUND, dtype=np.float32)
_DIRS = np.array(list(COLORS.values()), dtype=np.float32) - _BG  # [K, 3], COLORS order
_DIR_NORM2 = np.sum(_DIRS**2, axis=-1)  # [K]
_NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


@dataclass
class DetectedObject:
    """An object found by :func:`analyze`. ``centroid`` is (row, col) in pixel indices,
    ``area`` the pixel count, ``confidence`` the shape-template IoU in [0, 1]."""

    color: str
    shape: str
    position: str
    centroid: tuple[float, float]
    area: int
    confidence: float


@dataclass
class PromptScore:
    """Score of one image against one prompt; the lists have one entry per prompted object.

    ``color_ok[i]`` / ``shape_ok[i]`` / ``position_ok[i]``: some detected object has the
    colour / shape / position of prompted object ``i`` (each attribute checked on its own).
    ``fully_correct``: the detected objects equal the prompted ones as a multiset of
    (colour, shape, position); hence the same count. ``binding_error``: see :func:`score`.
    """

    color_ok: list[bool]
    shape_ok: list[bool]
    position_ok: list[bool]
    n_detected: int
    fully_correct: bool
    binding_error: bool


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as uint8 ``[H, W, 3]``.

    Accepts uint8 ``[H, W, 3]`` or float ``[H, W, 3]`` with values in [0, 1] (scaled by 255
    and rounded); anything array-like (e.g. a PIL image) is passed through ``np.asarray``.

    Raises:
        ValueError: naming the shape / dtype / value range found otherwise.
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an image of shape [H, W, 3], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"float images must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}] "
                f"(dtype {arr.dtype}); map [-1, 1] outputs with x / 2 + 0.5 first"
            )
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"expected a uint8 or float image, got dtype {arr.dtype}")


def _classify_pixels(image: np.ndarray, min_alpha: float, max_residual: float) -> np.ndarray:
    """int ``[H, W]``: -1 background, k >= 0 index into :data:`COLORS`.

    Each pixel is explained as ``BACKGROUND + alpha * (colour - BACKGROUND)`` for every
    palette colour (``alpha`` = least-squares coverage, clipped to [0, 1.5]); the colour with
    the smallest residual wins if its ``alpha >= min_alpha`` and residual ``<= max_residual``.
    """
    px = image.astype(np.float32) - _BG  # [H, W, 3]
    alpha = np.clip(np.einsum("hwc,kc->hwk", px, _DIRS) / _DIR_NORM2, 0.0, 1.5)  # [H, W, K]
    resid = np.linalg.norm(px[:, :, None, :] - alpha[..., None] * _DIRS, axis=-1)  # [H, W, K]
    best = np.argmin(resid, axis=-1)
    a = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
    r = np.take_along_axis(resid, best[..., None], axis=-1)[..., 0]
    return np.where((a >= min_alpha) & (r <= max_residual), best, -1)


def _components(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative class; int ``[H, W]`` ids, -1 outside.

    Min-label propagation with pointer jumping (numpy only); an id is the flat index of a
    pixel of its component.
    """
    h, w = classes.shape
    big = h * w
    fg = classes >= 0
    ids = np.where(fg, np.arange(big).reshape(h, w), big)
    cls_pad = np.pad(classes, 1, constant_values=-1)
    same = [cls_pad[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] == classes for dr, dc in _NEIGHBOURS]
    while True:
        ids_pad = np.pad(ids, 1, constant_values=big)
        new = ids.copy()
        for (dr, dc), ok in zip(_NEIGHBOURS, same):
            nb = ids_pad[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]
            new = np.where(ok & fg, np.minimum(new, nb), new)
        flat = np.append(new.ravel(), big)
        new = flat[new]  # pointer jumping: a label's own label is in the same component
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(fg, ids, -1)


def _smooth(classes: np.ndarray, votes: int = 7) -> np.ndarray:
    """Relabel a pixel when at least ``votes`` of its 8 neighbours share another class
    (outside the image counts as background): fills one-pixel holes, drops isolated
    speckles and pixels attached by a single neighbour, keeps corners and triangle apexes."""
    h, w = classes.shape
    k = len(_COLOR_NAMES) + 1
    onehot = np.eye(k, dtype=np.int16)[classes + 1]  # [H, W, K+1], class 0 = background
    pad = np.pad(onehot, ((1, 1), (1, 1), (0, 0)))
    pad[0, :, 0] = pad[-1, :, 0] = pad[:, 0, 0] = pad[:, -1, 0] = 1
    counts = sum(pad[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for dr, dc in _NEIGHBOURS)
    top = np.argmax(counts, axis=-1)
    flip = (np.max(counts, axis=-1) >= votes) & (top != classes + 1)
    return np.where(flip, top - 1, classes)


def _shape_templates(
    rows: np.ndarray, cols: np.ndarray, grid_r: np.ndarray, grid_c: np.ndarray
) -> dict[str, np.ndarray]:
    """Circle / square / triangle with the component's centroid and per-axis variance,
    evaluated at pixel indices ``grid_r`` [h, 1], ``grid_c`` [1, w] -> bool [h, w] each."""
    cy, cx = rows.mean(), cols.mean()
    # + 1/12: variance of a continuous shape vs. of its pixel centres.
    vy, vx = rows.var() + 1 / 12, cols.var() + 1 / 12
    y, x = grid_r - cy, grid_c - cx
    tri_h, tri_b = math.sqrt(18 * vy), math.sqrt(24 * vx)
    depth = y + 2 * tri_h / 3  # distance below the apex
    return {
        "circle": (y / (2 * math.sqrt(vy))) ** 2 + (x / (2 * math.sqrt(vx))) ** 2 <= 1.0,
        "square": (np.abs(y) <= math.sqrt(3 * vy)) & (np.abs(x) <= math.sqrt(3 * vx)),
        "triangle": (depth >= 0) & (depth <= tri_h) & (np.abs(x) <= depth / tri_h * tri_b / 2),
    }


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best shape for a bool ``[H, W]`` component mask and its IoU with the moment-matched
    template (same centroid and per-axis variance; robust to stray edge pixels)."""
    rows, cols = np.nonzero(mask)
    pad = 2 + int(max(np.ptp(rows), np.ptp(cols)) + 1) // 3
    r0, r1 = rows.min() - pad, rows.max() + pad + 1
    c0, c1 = cols.min() - pad, cols.max() + pad + 1
    grid_r = np.arange(r0, r1, dtype=np.float64)[:, None]
    grid_c = np.arange(c0, c1, dtype=np.float64)[None, :]
    local = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    local[rows - r0, cols - c0] = True
    best, best_iou = SHAPES[0], -1.0
    for shape, tmpl in _shape_templates(rows, cols, grid_r, grid_c).items():
        iou = float(np.sum(local & tmpl)) / float(np.sum(local | tmpl))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def _side(d_row: float, d_col: float) -> str:
    if abs(d_col) >= abs(d_row):
        return "left" if d_col < 0 else "right"
    return "top" if d_row < 0 else "bottom"


def analyze(
    image: np.ndarray,
    *,
    min_alpha: float = 0.5,
    max_residual: float = 60.0,
    min_area: int | None = None,
) -> list[DetectedObject]:
    """Detect the objects of a shapes-world image.

    Args:
        image: uint8 ``[H, W, 3]`` RGB, or float ``[H, W, 3]`` in [0, 1] (see :func:`to_uint8`).
        min_alpha: least colour coverage of a foreground pixel (0.5 keeps the half-intensity
            contour of a blurred edge, so blur does not shrink objects).
        max_residual: largest RGB distance from the background→colour line.
        min_area: smallest component kept; None → ``max(2, round(8 * H * W / 1024))``.

    Returns:
        Detected objects sorted by (row, col) of the centroid.
    """
    img = to_uint8(image)
    h, w = img.shape[:2]
    if min_area is None:
        min_area = max(2, int(round(8 * h * w / 1024)))
    classes = _smooth(_classify_pixels(img, min_alpha, max_residual))
    comp = _components(classes)
    found: list[tuple[str, str, tuple[float, float], int, float]] = []
    for cid in np.unique(comp[comp >= 0]):
        mask = comp == cid
        area = int(mask.sum())
        if area < min_area:
            continue
        rows, cols = np.nonzero(mask)
        shape, iou = _classify_shape(mask)
        color = _COLOR_NAMES[int(classes.flat[int(cid)])]
        found.append((color, shape, (float(rows.mean()), float(cols.mean())), area, iou))
    found.sort(key=lambda f: f[2])
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    if len(found) == 2:
        (r0, c0), (r1, c1) = found[0][2], found[1][2]
        if abs(c1 - c0) > abs(r1 - r0):
            first = "left" if c0 <= c1 else "right"
        else:
            first = "top" if r0 <= r1 else "bottom"
        positions = [first, OPPOSITE[first]]
    else:
        positions = [_side(r - cy, c - cx) for _, _, (r, c), _, _ in found]
    out = [
        DetectedObject(color, shape, pos, centroid, area, iou)
        for (color, shape, centroid, area, iou), pos in zip(found, positions)
    ]
    logger.debug("analyze: %d components kept -> %s", len(out), out)
    return out


def score(image: np.ndarray, prompt: str | Scene) -> PromptScore:
    """Score ``image`` (as for :func:`analyze`) against ``prompt``.

    ``binding_error`` (two-object prompts only; False otherwise) is True iff
      (a) every prompted colour and every prompted shape occurs among the detected objects, and
      (b) some detected object D is not exactly a prompted object but has the colour of a
          prompted object X and takes the shape or the position of the other prompted object
          Y where that attribute differs from X's (D.shape == Y.shape != X.shape, or
          D.position == Y.position != X.position).
    So "red circle left + blue square right" shown as "blue circle left + red square right"
    or as "red square left + ..." or "red circle right + ..." is a binding error; a missing
    colour/shape, or a red circle at the top, is not.
    """
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(scene, Scene):
        raise ValueError(f"prompt must be a str or Scene, got {type(prompt).__name__}")
    det = analyze(image)
    want = [(o.color, o.shape, o.position) for o in scene.objects]
    got = [(d.color, d.shape, d.position) for d in det]
    color_ok = [any(g[0] == c for g in got) for c, _, _ in want]
    shape_ok = [any(g[1] == s for g in got) for _, s, _ in want]
    position_ok = [any(g[2] == p for g in got) for _, _, p in want]
    fully_correct = sorted(got) == sorted(want)
    binding_error = False
    if len(want) == 2 and all(color_ok) and all(shape_ok):
        for g in got:
            if g in want:
                continue
            for x, y in ((want[0], want[1]), (want[1], want[0])):
                if g[0] != x[0]:
                    continue
                if (g[1] == y[1] != x[1]) or (g[2] == y[2] != x[2]):
                    binding_error = True
    return PromptScore(color_ok, shape_ok, position_ok, len(det), fully_correct, binding_error)


def accuracy_report(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    """Aggregate :func:`score` over paired ``images`` and ``prompts``.

    Keys, for group in ``single`` (1-object prompts), ``double`` (2-object) and ``all``:
    ``{group}/n`` (number of images), ``{group}/color``, ``{group}/shape``,
    ``{group}/position`` (fraction of prompted objects whose attribute is found, see
    :class:`PromptScore`), ``{group}/count`` (fraction of images with the prompted number of
    objects), ``{group}/fully_correct`` (fraction of images), plus ``double/binding_error``
    (fraction of 2-object images). Rates of an empty group are NaN.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    rows: dict[str, list[tuple[PromptScore, int]]] = {"single": [], "double": [], "all": []}
    for image, prompt in zip(images, prompts):
        scene = parse_prompt(prompt)
        s = score(image, scene)
        n = len(scene.objects)
        rows["single" if n == 1 else "double"].append((s, n))
        rows["all"].append((s, n))
    report: dict[str, float] = {}
    for group, items in rows.items():
        report[f"{group}/n"] = float(len(items))
        n_obj = sum(n for _, n in items)
        for attr in ("color", "shape", "position"):
            hits = sum(sum(getattr(s, f"{attr}_ok")) for s, _ in items)
            report[f"{group}/{attr}"] = _rate(hits, n_obj)
        k = len(items)
        report[f"{group}/count"] = _rate(sum(s.n_detected == n for s, n in items), k)
        report[f"{group}/fully_correct"] = _rate(sum(s.fully_correct for s, _ in items), k)
    binding = sum(s.binding_error for s, _ in rows["double"])
    report["double/binding_error"] = _rate(binding, len(rows["double"]))
    return report


def _rate(hits: int, total: int) -> float:
    return hits / total if total else math.nan
