"""The shapes world: a closed prompt grammar and a deterministic renderer.

A scene holds one or two flat-coloured objects on a near-black background. Each object has a
colour (:data:`COLORS`), a shape (:data:`SHAPES`) and a position (:data:`POSITIONS`); a
position names a half of the image, and a two-object scene fills opposite halves
(left + right or top + bottom).

Prompt grammar (exact)::

    phrase := "a " COLOR " " SHAPE " " WHERE
    WHERE  := "on the left" | "on the right" | "at the top" | "at the bottom"
    prompt := phrase | phrase " and " phrase

Geometry of :func:`render` at ``size`` px (``s = size / 32``): each object fills a square box
of side ``d`` (canonical ``round(12 s)``; jittered ``round(12 s) + [-round(2 s), +round(s)]``,
i.e. 10–13 px at 32 px), centred in its half and in the full extent of the other axis; a seed
shifts it by up to ``round(2 s)`` px per axis, clipped so that at least ``max(1, round(s))``
background pixels separate it from the border and from the middle line of the image. Two
objects are therefore at least two pixels apart. Pixels are exactly the palette colour or
:data:`BACKGROUND` (no anti-aliasing).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "OPPOSITE",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "ShapeObject",
    "all_prompts",
    "object_box",
    "parse_prompt",
    "render",
    "sample_scene",
    "shape_mask",
    "split_prompts",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 240, 40),
    "purple": (150, 50, 220),
    "orange": (255, 140, 0),
}
"""Palette (RGB, uint8 values). Smallest pairwise distance ~109 (orange/yellow)."""

BACKGROUND: tuple[int, int, int] = (16, 16, 16)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

_WHERE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_WHERE_INV: dict[str, str] = {v: k for k, v in _WHERE.items()}
# Ordered position pairs for two-object scenes (first-mentioned object first).
_PAIR_ORDER: tuple[tuple[str, str], ...] = (
    ("left", "right"),
    ("right", "left"),
    ("top", "bottom"),
    ("bottom", "top"),
)


def _check_choice(kind: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"invalid {kind} {value!r}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``color`` in :data:`COLORS`, ``shape`` in :data:`SHAPES`, ``position``
    in :data:`POSITIONS`."""

    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        _check_choice("color", self.color, tuple(COLORS))
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("position", self.position, POSITIONS)

    @property
    def phrase(self) -> str:
        """E.g. ``"a red circle on the left"``."""
        return f"a {self.color} {self.shape} {_WHERE[self.position]}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; two objects must sit at opposite positions (left/right or
    top/bottom). Two identical-looking objects (same colour and shape) are valid scenes but
    are left out of :func:`all_prompts`."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        objs = tuple(self.objects) if isinstance(self.objects, (list, tuple)) else None
        if objs is None or not all(isinstance(o, ShapeObject) for o in objs):
            raise ValueError(f"Scene.objects must be a tuple of ShapeObject, got {self.objects!r}")
        object.__setattr__(self, "objects", objs)
        if len(objs) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(objs)}")
        if len(objs) == 2 and OPPOSITE[objs[0].position] != objs[1].position:
            raise ValueError(
                f"two objects must be at opposite positions (left+right or top+bottom), got "
                f"{objs[0].position!r} and {objs[1].position!r}"
            )

    @property
    def prompt(self) -> str:
        """The prompt of this scene (phrases joined with ``" and "``, in object order)."""
        return " and ".join(o.phrase for o in self.objects)


_PHRASE_RE = re.compile(r"a (\S+) (\S+) (.+)")


def _parse_phrase(phrase: str, prompt: str) -> ShapeObject:
    m = _PHRASE_RE.fullmatch(phrase)
    if m is None:
        raise ValueError(
            f"cannot parse {phrase!r} in prompt {prompt!r}: expected 'a <color> <shape> <where>'"
        )
    color, shape, where = m.groups()
    if color not in COLORS:
        raise ValueError(
            f"unknown color {color!r} in prompt {prompt!r}; allowed: {', '.join(COLORS)}"
        )
    if shape not in SHAPES:
        raise ValueError(
            f"unknown shape {shape!r} in prompt {prompt!r}; allowed: {', '.join(SHAPES)}"
        )
    if where not in _WHERE_INV:
        raise ValueError(
            f"unknown location {where!r} in prompt {prompt!r}; allowed: "
            + ", ".join(repr(w) for w in _WHERE_INV)
        )
    return ShapeObject(color, shape, _WHERE_INV[where])


def parse_prompt(prompt: str) -> Scene:
    """Inverse of :attr:`Scene.prompt` (outer whitespace is ignored).

    Raises:
        ValueError: naming the part of ``prompt`` that does not follow the grammar, or when
            two objects are not at opposite positions.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    text = prompt.strip()
    phrases = text.split(" and ")
    if len(phrases) > 2:
        raise ValueError(f"prompt {prompt!r} has {len(phrases)} phrases; at most 2 are allowed")
    return Scene(tuple(_parse_phrase(p, prompt) for p in phrases))


@lru_cache(maxsize=8192)
def _parse_cached(prompt: str) -> Scene:
    """:func:`parse_prompt` memoised (scenes are immutable)."""
    return parse_prompt(prompt)


def _check_n_objects(n_objects: object) -> int:
    if n_objects not in (1, 2) or isinstance(n_objects, bool):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects!r}")
    return int(n_objects)  # type: ignore[call-overload]


@cache
def _all_prompts(n_objects: int) -> tuple[str, ...]:
    looks = [(c, s) for c in COLORS for s in SHAPES]
    if n_objects == 1:
        return tuple(ShapeObject(c, s, p).phrase for c, s in looks for p in POSITIONS)
    out = []
    for p0, p1 in _PAIR_ORDER:
        for look0 in looks:
            for look1 in looks:
                if look0 != look1:
                    out.append(Scene((ShapeObject(*look0, p0), ShapeObject(*look1, p1))).prompt)
    return tuple(out)


def all_prompts(n_objects: int) -> list[str]:
    """Every valid prompt with ``n_objects`` (1 or 2) objects, in a fixed order.

    One object: colour-major, then shape, then position (72 prompts). Two objects: for each
    ordered position pair (left/right, right/left, top/bottom, bottom/top), every ordered
    pair of (colour, shape) looks except two identical looks (1224 prompts).
    """
    return list(_all_prompts(_check_n_objects(n_objects)))


def _scene_key(prompt: str) -> tuple[tuple[str, str, str], ...]:
    """Order-free identity of a prompt's scene (both mention orders share one key)."""
    return tuple(sorted((o.color, o.shape, o.position) for o in _parse_cached(prompt).objects))


def split_prompts(
    n_objects: int, held_out_fraction: float = 0.15, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic disjoint ``(train, held_out)`` split of :func:`all_prompts`.

    Prompts are grouped by scene (the two mention orders of a two-object scene stay
    together), ``round(held_out_fraction * n_groups)`` groups are held out, chosen in a
    ``numpy.random.default_rng(seed)`` order, skipping any group whose removal would leave a
    colour, shape or position absent from train. Both lists keep :func:`all_prompts` order.

    Raises:
        ValueError: for a fraction outside [0, 1) or when the coverage constraint cannot be met.
    """
    n = _check_n_objects(n_objects)
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction!r}")
    prompts = all_prompts(n)
    groups: dict[tuple[tuple[str, str, str], ...], list[str]] = {}
    for p in prompts:
        groups.setdefault(_scene_key(p), []).append(p)
    keys = list(groups)
    n_held = int(round(held_out_fraction * len(keys)))
    counts: dict[tuple[int, str], int] = {}
    for key in keys:
        for obj in key:
            for i, value in enumerate(obj):
                counts[(i, value)] = counts.get((i, value), 0) + len(groups[key])
    held: set[int] = set()
    for idx in np.random.default_rng(seed).permutation(len(keys)):
        if len(held) == n_held:
            break
        key, k = keys[int(idx)], len(groups[keys[int(idx)]])
        need: dict[tuple[int, str], int] = {}
        for obj in key:
            for i, value in enumerate(obj):
                need[(i, value)] = need.get((i, value), 0) + k
        if all(counts[v] > c for v, c in need.items()):
            for v, c in need.items():
                counts[v] -= c
            held.add(int(idx))
    if len(held) < n_held:
        raise ValueError(f"cannot hold out {n_held} scenes while keeping every attribute in train")
    held_prompts = {p for i in held for p in groups[keys[i]]}
    train = [p for p in prompts if p not in held_prompts]
    held_out = [p for p in prompts if p in held_prompts]
    logger.debug("split_prompts(%d): %d train, %d held out", n, len(train), len(held_out))
    return train, held_out


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Filled ``shape`` inscribed in a ``[height, width]`` box, as bool ``[height, width]``.

    Pixel (i, j) is tested at its centre ``(i + .5, j + .5)``: circle = ellipse inscribed in
    the box; square = whole box; triangle = upward isosceles (apex at the top middle, base on
    the bottom row; row i spans ``|x - w/2| <= (i + 1) / h * w / 2``). Every shape touches
    all four sides of the box.
    """
    _check_choice("shape", shape, SHAPES)
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    y = (np.arange(height, dtype=np.float64) + 0.5)[:, None]
    x = (np.arange(width, dtype=np.float64) + 0.5)[None, :]
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        ry, rx = height / 2.0, width / 2.0
        return ((y - ry) / ry) ** 2 + ((x - rx) / rx) ** 2 <= 1.0 + 1e-9
    half = (y + 0.5) / height * (width / 2.0)
    return np.abs(x - width / 2.0) <= half + 1e-9


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an int, got {type(size).__name__}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even int >= 16, got {size}")
    return int(size)


def object_box(
    position: str, size: int, rng: np.random.Generator | None = None
) -> tuple[int, int, int]:
    """Box ``(row0, col0, d)`` of an object at ``position`` in a ``size`` px image.

    ``rng=None`` gives the canonical box; otherwise draws the side jitter, then the row and
    column offsets (three ``rng.integers`` calls), see the module docstring.
    """
    _check_choice("position", position, POSITIONS)
    size = _check_size(size)
    s = size / 32.0
    d = int(round(12 * s))
    max_shift, margin, half = max(1, int(round(2 * s))), max(1, int(round(s))), size // 2
    dr = dc = 0
    if rng is not None:
        d += int(rng.integers(-int(round(2 * s)), int(round(s)) + 1))
        dr = int(rng.integers(-max_shift, max_shift + 1))
        dc = int(rng.integers(-max_shift, max_shift + 1))
    starts = []
    for axis, shift in ((0, dr), (1, dc)):
        split = (axis == 1) == (position in ("left", "right"))
        if split:  # the half named by position along this axis
            lo_edge = half if position in ("right", "bottom") else 0
            length = half
        else:
            lo_edge, length = 0, size
        canonical = lo_edge + (length - d) // 2
        lo, hi = lo_edge + margin, lo_edge + length - margin - d
        starts.append(int(min(max(canonical + shift, lo), hi)))
    return starts[0], starts[1], d


def render(scene: Scene, size: int = 32, seed: int | None = None) -> np.ndarray:
    """Render ``scene`` as uint8 ``[size, size, 3]`` (RGB).

    ``seed=None`` is the canonical placement; an int seeds ``numpy.random.default_rng`` for
    per-object jitter (objects drawn in scene order). Deterministic in (scene, size, seed).
    """
    if not isinstance(scene, Scene):
        raise ValueError(f"render expects a Scene, got {type(scene).__name__}")
    size = _check_size(size)
    rng = None if seed is None else np.random.default_rng(seed)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        r0, c0, d = object_box(obj.position, size, rng)
        mask = shape_mask(obj.shape, d, d)
        image[r0 : r0 + d, c0 : c0 + d][mask] = COLORS[obj.color]
    return image


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, prompts: list[str] | None = None
) -> Scene:
    """Draw a random scene.

    Without ``prompts``: ``n_objects`` (None → 1 or 2 with equal probability), then a
    uniform choice from :func:`all_prompts`. With ``prompts``: a uniform choice from that
    list (restricted to ``n_objects`` objects when given).

    Raises:
        ValueError: if ``prompts`` is empty (after the restriction) or holds an invalid prompt.
    """
    if prompts is not None:
        pool = list(prompts)
        if n_objects is not None:
            n = _check_n_objects(n_objects)
            pool = [p for p in pool if len(_parse_cached(p).objects) == n]
        if not pool:
            raise ValueError(f"no prompts to sample from (n_objects={n_objects!r})")
        return _parse_cached(pool[int(rng.integers(len(pool)))])
    n = int(rng.integers(1, 3)) if n_objects is None else _check_n_objects(n_objects)
    pool_t = _all_prompts(n)
    return _parse_cached(pool_t[int(rng.integers(len(pool_t)))])
