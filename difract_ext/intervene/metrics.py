"""Did an edit of a shapes-world image do what was asked, and nothing else? Scored by the analyzer.

An :class:`EditTask` asks to change one attribute (``"color"`` or ``"shape"``) of the object at
one position of a prompt's scene, e.g. ``EditTask.parse("a red circle on the left and a green
square on the right", "left:color=blue")``. :func:`score_edit` compares the image generated
without the edit (the *base*, same seed) and with it:

- **success**: the target object (matched to the base objects by nearest centroids) has the
  asked value;
- **attribute collateral**: the fraction of every other attribute of every base object (the
  target's other attributes, and all three of the other object's) that changed; an object that
  disappeared changed all of its attributes;
- **other object changed**: any attribute of a non-target object changed;
- **pixel collateral**: the fraction of pixels outside the target object's mask (foreground of
  the target's half in either image, dilated by one pixel) that changed by more than
  ``pixel_tol`` (in [0, 1], any channel);
- **sane**: the analyzer finds as many objects as in the base, at the same positions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from difract_ext.toy.analyzer import DetectedObject, analyze, to_uint8
from difract_ext.toy.world import BACKGROUND, COLORS, SHAPES, Scene, ShapeObject, parse_prompt

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")
EDITABLE: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES}
#: Least RGB distance (uint8) from the background of a foreground pixel for the target mask.
FOREGROUND_DISTANCE = 40.0
_EDIT_RE = re.compile(r"^(?P<pos>[a-z]+):(?P<attr>[a-z]+)=(?P<value>[a-z]+)$")


@dataclass(frozen=True)
class EditTask:
    """Change ``attribute`` of the object at ``position`` in ``prompt``'s scene to ``value``."""

    prompt: str
    position: str
    attribute: str
    value: str

    def __post_init__(self) -> None:
        if self.attribute not in EDITABLE:
            raise ValueError(
                f"attribute must be one of {', '.join(EDITABLE)}, got {self.attribute!r}"
            )
        if self.value not in EDITABLE[self.attribute]:
            raise ValueError(
                f"unknown {self.attribute} {self.value!r}; allowed: "
                + ", ".join(EDITABLE[self.attribute])
            )
        if self.source_value == self.value:
            raise ValueError(
                f"the object at {self.position!r} in {self.prompt!r} is already {self.value}"
            )

    @classmethod
    def parse(cls, prompt: str, edit: str) -> EditTask:
        """``edit`` is ``POSITION:ATTRIBUTE=VALUE``, e.g. ``left:color=blue``."""
        m = _EDIT_RE.match(edit.strip())
        if m is None:
            raise ValueError(
                f"cannot parse edit {edit!r}; write POSITION:ATTRIBUTE=VALUE, e.g. left:color=blue"
            )
        return cls(prompt, m["pos"], m["attr"], m["value"])

    @property
    def scene(self) -> Scene:
        return parse_prompt(self.prompt)

    @property
    def target_index(self) -> int:
        """Index of the target object in the prompt's scene."""
        objs = self.scene.objects
        for i, o in enumerate(objs):
            if o.position == self.position:
                return i
        have = ", ".join(o.position for o in objs)
        raise ValueError(f"no object at {self.position!r} in {self.prompt!r} (objects at: {have})")

    @property
    def source_value(self) -> str:
        return str(getattr(self.scene.objects[self.target_index], self.attribute))

    @property
    def concept_prompt(self) -> str:
        """The prompt with the edit made (what a successful edit should look like)."""
        objs = list(self.scene.objects)
        i = self.target_index
        objs[i] = replace(objs[i], **{self.attribute: self.value})
        return Scene(tuple(objs)).prompt

    @property
    def name(self) -> str:
        return f"{self.position}:{self.attribute}={self.value}"

    def __str__(self) -> str:
        return f"{self.prompt!r} {self.name}"


@dataclass(frozen=True)
class EditScore:
    """What :func:`score_edit` measured (see the module docstring)."""

    success: bool
    attribute_collateral: float
    other_object_changed: bool
    pixel_collateral: float
    sane: bool
    base_ok: bool
    n_base: int
    n_edited: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _match(base: Sequence[DetectedObject], edited: Sequence[DetectedObject]) -> list[int | None]:
    """For each base object, the index of its edited object (nearest centroids, one-to-one,
    minimal total distance; None when there are fewer edited objects)."""
    import itertools

    best: tuple[float, list[int | None]] = (math.inf, [None] * len(base))
    slots: list[int | None] = list(range(len(edited))) + [None] * len(base)
    for perm in itertools.permutations(slots, len(base)):
        if len({p for p in perm if p is not None}) != sum(p is not None for p in perm):
            continue
        if sum(p is not None for p in perm) != min(len(base), len(edited)):
            continue
        cost = sum(
            math.dist(base[i].centroid, edited[p].centroid)
            for i, p in enumerate(perm)
            if p is not None
        )
        if cost < best[0]:
            best = (cost, list(perm))
    return best[1]


def _half(position: str, h: int, w: int) -> np.ndarray:
    rr, cc = np.mgrid[0:h, 0:w]
    return {
        "left": cc < w // 2,
        "right": cc >= w - w // 2,
        "top": rr < h // 2,
        "bottom": rr >= h - h // 2,
    }[position]


def _dilate(mask: np.ndarray) -> np.ndarray:
    pad = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            out |= pad[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]
    return out


def foreground(image: np.ndarray) -> np.ndarray:
    """bool ``[H, W]``: pixels farther than :data:`FOREGROUND_DISTANCE` from the background."""
    img = to_uint8(image).astype(np.float32)
    return np.linalg.norm(img - np.array(BACKGROUND, np.float32), axis=-1) > FOREGROUND_DISTANCE


def target_mask(base: np.ndarray, edited: np.ndarray, position: str) -> np.ndarray:
    """bool ``[H, W]``: foreground of the ``position`` half in either image, dilated by 1 px."""
    h, w = to_uint8(base).shape[:2]
    return _dilate((foreground(base) | foreground(edited)) & _half(position, h, w))


def score_edit(
    base: np.ndarray, edited: np.ndarray, task: EditTask, pixel_tol: float = 0.1
) -> EditScore:
    """Score ``edited`` against ``base`` (same prompt and seed, unedited) for ``task``.

    Images as for :func:`~difract_ext.toy.analyzer.analyze` (uint8, or float in [0, 1]).
    ``base_ok`` says whether the base image shows the prompt's scene exactly; the other fields
    are measured against what the base shows (its detected objects), whatever that is.
    """
    b_img, e_img = to_uint8(base), to_uint8(edited)
    if b_img.shape != e_img.shape:
        raise ValueError(f"base {b_img.shape} and edited {e_img.shape} images differ in shape")
    b_obj, e_obj = analyze(b_img), analyze(e_img)
    want = sorted((o.color, o.shape, o.position) for o in task.scene.objects)
    base_ok = sorted((o.color, o.shape, o.position) for o in b_obj) == want
    match = _match(b_obj, e_obj)
    target = next((i for i, o in enumerate(b_obj) if o.position == task.position), None)
    success = False
    changed, total, other_changed = 0, 0, False
    for i, o in enumerate(b_obj):
        j = match[i]
        e = e_obj[j] if j is not None else None
        if i == target:
            success = e is not None and getattr(e, task.attribute) == task.value
        for attr in ATTRIBUTES:
            if i == target and attr == task.attribute:
                continue
            total += 1
            diff = e is None or getattr(e, attr) != getattr(o, attr)
            changed += diff
            if diff and i != target:
                other_changed = True
    mask = target_mask(b_img, e_img, task.position)
    outside = ~mask
    moved = np.abs(b_img.astype(np.int16) - e_img.astype(np.int16)).max(-1) > pixel_tol * 255
    pixel = float((moved & outside).sum() / max(1, outside.sum()))
    sane = len(e_obj) == len(b_obj) and sorted(o.position for o in e_obj) == sorted(
        o.position for o in b_obj
    )
    return EditScore(
        success=success,
        attribute_collateral=changed / total if total else 0.0,
        other_object_changed=other_changed,
        pixel_collateral=pixel,
        sane=sane,
        base_ok=base_ok,
        n_base=len(b_obj),
        n_edited=len(e_obj),
    )


def summarize(scores: Sequence[EditScore]) -> dict[str, float]:
    """Means over scores: ``success``, ``attribute_collateral``, ``other_object_changed``,
    ``pixel_collateral``, ``sane``, and ``n``."""
    n = len(scores)
    if not n:
        return {"n": 0.0}
    keys = ("success", "attribute_collateral", "other_object_changed", "pixel_collateral", "sane")
    out = {k: float(np.mean([float(getattr(s, k)) for s in scores])) for k in keys}
    out["n"] = float(n)
    return out


def concept_object(task: EditTask) -> ShapeObject:
    """The target object as it should look after the edit."""
    return parse_prompt(task.concept_prompt).objects[task.target_index]


@dataclass(frozen=True)
class Repair:
    """What to repair in an image of a prompt: the object at ``position`` was drawn with
    ``attribute`` = ``drawn`` where the prompt asks for ``asked``."""

    position: str
    attribute: str
    drawn: str
    asked: str


def binding_repair(prompt: str, image: np.ndarray) -> Repair | None:
    """The first wrong attribute of ``image`` (as for :func:`~difract_ext.toy.analyzer.analyze`)
    at a prompted position: colours first (in prompt order), then shapes; None when every object
    the analyzer finds at a prompted position has the prompt's colour and shape there."""
    want = {o.position: o for o in parse_prompt(prompt).objects}
    found = {d.position: d for d in analyze(image)}
    for attribute in ("color", "shape"):
        for position, obj in want.items():
            det = found.get(position)
            if det is not None and getattr(det, attribute) != getattr(obj, attribute):
                return Repair(position, attribute, getattr(det, attribute), getattr(obj, attribute))
    return None
