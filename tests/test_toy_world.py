"""Tests for the shapes-world grammar, split and renderer (difract_ext.toy.world)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from difract_ext.toy.world import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeObject,
    all_prompts,
    parse_prompt,
    render,
    sample_scene,
    split_prompts,
)

BG = np.array(BACKGROUND, dtype=np.uint8)


def _fg(image: np.ndarray) -> np.ndarray:
    return np.any(image != BG, axis=-1)


# ---------------------------------------------------------------- constants and validation


def test_palette_is_well_separated():
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange"}
    assert SHAPES == ("circle", "square", "triangle")
    assert POSITIONS == ("left", "right", "top", "bottom")
    assert max(BACKGROUND) <= 40
    rgb = {k: np.array(v, dtype=float) for k, v in COLORS.items()}
    for a, b in itertools.combinations(rgb, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) >= 100, (a, b)
    for k, v in rgb.items():
        assert np.linalg.norm(v - np.array(BACKGROUND)) >= 150, k


@pytest.mark.parametrize(
    "args, bad",
    [
        (("pink", "circle", "left"), "pink"),
        (("red", "hexagon", "left"), "hexagon"),
        (("red", "circle", "middle"), "middle"),
    ],
)
def test_shape_object_rejects_bad_values(args, bad):
    with pytest.raises(ValueError) as err:
        ShapeObject(*args)
    assert bad in str(err.value) and "allowed" in str(err.value)


def test_scene_validation():
    a = ShapeObject("red", "circle", "left")
    with pytest.raises(ValueError, match="1 or 2"):
        Scene(())
    with pytest.raises(ValueError, match="1 or 2"):
        Scene((a, ShapeObject("blue", "square", "right"), ShapeObject("green", "circle", "top")))
    for pos in ("left", "top", "bottom"):
        with pytest.raises(ValueError, match="opposite"):
            Scene((a, ShapeObject("blue", "square", pos)))
    assert Scene([a]).objects == (a,)  # a list is accepted and stored as a tuple


# ---------------------------------------------------------------- grammar


def test_prompt_strings_exact():
    def one(c, s, p):
        return Scene((ShapeObject(c, s, p),)).prompt

    assert one("red", "circle", "left") == "a red circle on the left"
    assert one("red", "circle", "right") == "a red circle on the right"
    assert one("red", "circle", "top") == "a red circle at the top"
    assert one("red", "circle", "bottom") == "a red circle at the bottom"
    two = Scene((ShapeObject("blue", "square", "top"), ShapeObject("yellow", "triangle", "bottom")))
    assert two.prompt == "a blue square at the top and a yellow triangle at the bottom"
    rev = parse_prompt("a yellow triangle at the bottom and a blue square at the top")
    assert rev.objects == (two.objects[1], two.objects[0])


def test_all_prompts_counts_and_round_trip():
    p1, p2 = all_prompts(1), all_prompts(2)
    assert len(p1) == 6 * 3 * 4
    # 4 ordered opposite position pairs x (18 looks for the first object) x (17 other looks).
    assert len(p2) == 4 * (6 * 3) * (6 * 3 - 1)
    assert len(set(p1)) == len(p1) and len(set(p2)) == len(p2)
    for n, prompts in ((1, p1), (2, p2)):
        for p in prompts:
            scene = parse_prompt(p)
            assert len(scene.objects) == n
            assert scene.prompt == p
    assert all_prompts(2) == p2  # deterministic order
    assert "a red circle on the left and a red circle on the right" not in p2
    assert "a red circle on the left and a red square on the right" in p2
    assert "a red circle on the left and a blue circle on the right" in p2
    with pytest.raises(ValueError):
        all_prompts(3)


@pytest.mark.parametrize(
    "prompt, part",
    [
        ("a pink circle on the left", "pink"),
        ("a red hexagon on the left", "hexagon"),
        ("a red circle in the middle", "in the middle"),
        ("red circle on the left", "red circle on the left"),
        ("a red circle on the left and", "and"),
        ("a red circle on the left and a blue square at the top", "opposite"),
        (
            "a red circle on the left and a blue square on the right and a red square at the top",
            "3 phrases",
        ),
    ],
)
def test_parse_prompt_errors_name_the_bad_part(prompt, part):
    with pytest.raises(ValueError) as err:
        parse_prompt(prompt)
    assert part in str(err.value)


# ---------------------------------------------------------------- split


def _attrs(prompts):
    out = {0: set(), 1: set(), 2: set()}
    for p in prompts:
        for o in parse_prompt(p).objects:
            out[0].add(o.color)
            out[1].add(o.shape)
            out[2].add(o.position)
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_split_disjoint_covering_deterministic(n):
    train, held = split_prompts(n)
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(all_prompts(n))
    assert (train, held) == split_prompts(n)
    assert split_prompts(n, seed=1) != (train, held)
    attrs = _attrs(train)
    assert attrs[0] == set(COLORS) and attrs[1] == set(SHAPES) and attrs[2] == set(POSITIONS)
    if n == 1:
        assert len(held) == round(0.15 * 72)
    else:
        # The two mention orders of a scene are never split apart; 612 scenes, 15 % held out.
        for p in held:
            a, b = p.split(" and ")
            assert f"{b} and {a}" in held
        assert len(held) == 2 * round(0.15 * 612)


def test_split_edge_cases():
    assert split_prompts(1, 0.0) == (all_prompts(1), [])
    train, held = split_prompts(1, 0.5, seed=3)
    assert len(held) == 36 and _attrs(train)[0] == set(COLORS)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="held_out_fraction"):
            split_prompts(1, bad)


# ---------------------------------------------------------------- render


def test_render_canonical_geometry():
    # size 32: side 12, centred in the left half (cols 0-15 -> 2..13), vertically centred
    # in 0-31 (rows 10..21).
    img = render(parse_prompt("a red square on the left"))
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    rows, cols = np.nonzero(_fg(img))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 21, 2, 13)
    assert len(rows) == 144
    assert np.all(img[10:22, 2:14] == np.array(COLORS["red"], dtype=np.uint8))
    img = render(parse_prompt("a blue circle at the bottom"), size=64)
    assert img.shape == (64, 64, 3)
    rows, cols = np.nonzero(_fg(img))
    # side 24 centred in rows 32-63 (-> 36..59) and cols 0-63 (-> 20..43)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (36, 59, 20, 43)


def test_render_shapes_geometry():
    for size in (32, 64):
        fills = {}
        for shape in SHAPES:
            img = render(Scene((ShapeObject("green", shape, "top"),)), size=size)
            fg = _fg(img)
            rows, cols = np.nonzero(fg)
            box = fg[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.shape[0] == box.shape[1]  # as tall as wide
            assert np.array_equal(box, box[:, ::-1])  # left-right symmetric
            fills[shape] = box.mean()
            widths = box.sum(axis=1)
            if shape == "triangle":
                assert np.all(np.diff(widths) >= 0) and widths[0] <= 2 and widths[-1] == len(widths)
            if shape == "circle":
                assert np.array_equal(box, box[::-1])
                assert widths[0] < widths[len(widths) // 2] == len(widths)
        assert fills["square"] == 1.0
        assert abs(fills["circle"] - math.pi / 4) < 0.05
        assert 0.45 < fills["triangle"] < 0.65


def test_render_determinism_and_jitter():
    # The grammar always uses "a", also before "orange".
    scene = parse_prompt("a purple triangle at the top and a orange circle at the bottom")
    assert np.array_equal(render(scene, seed=5), render(scene, seed=5))
    assert np.array_equal(render(scene), render(scene, seed=None))
    variants = {render(scene, seed=s).tobytes() for s in range(20)}
    assert len(variants) > 5
    rows, cols = np.nonzero(_fg(render(Scene(scene.objects[:1]))))
    canon = (rows.mean(), cols.mean())
    for s in range(50):
        rows, cols = np.nonzero(_fg(render(Scene(scene.objects[:1]), seed=s)))
        # ±2 px offset plus at most 1 px from the size jitter of the triangle's centroid
        assert abs(rows.mean() - canon[0]) <= 3.5 and abs(cols.mean() - canon[1]) <= 3.0


@pytest.mark.parametrize("size", [32, 64])
def test_render_objects_separate_inside_and_flat(size):
    rng = np.random.default_rng(0)
    half, lo, hi = size // 2, 10 * size // 32, 13 * size // 32
    for i in range(150):
        scene = sample_scene(rng)
        img = render(scene, size=size, seed=i)
        fg = _fg(img)
        # never touches the border
        assert not (fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())
        # flat colours: only background and the scene's palette colours
        colours = {tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)}
        assert colours == {BACKGROUND} | {COLORS[o.color] for o in scene.objects}
        for obj in scene.objects:
            region = {
                "left": (slice(None), slice(0, half)),
                "right": (slice(None), slice(half, None)),
                "top": (slice(0, half), slice(None)),
                "bottom": (slice(half, None), slice(None)),
            }[obj.position]
            part = img[region]
            mask = np.all(part == np.array(COLORS[obj.color], dtype=np.uint8), axis=-1)
            assert mask.sum() == _fg(part).sum() > 0  # the half holds exactly this object
            rows, cols = np.nonzero(mask)
            assert lo <= rows.max() - rows.min() + 1 <= hi
            assert lo <= cols.max() - cols.min() + 1 <= hi
        if len(scene.objects) == 1:
            assert _fg(part).sum() == fg.sum()  # nothing outside the named half
        else:
            # the two lines around the middle stay background: objects never touch
            axis_lr = scene.objects[0].position in ("left", "right")
            mid = fg[:, half - 1 : half + 1] if axis_lr else fg[half - 1 : half + 1, :]
            assert not mid.any()


def test_render_and_sample_errors():
    scene = parse_prompt("a red circle on the left")
    for bad in (15, 33, 8):
        with pytest.raises(ValueError, match="size"):
            render(scene, size=bad)
    with pytest.raises(ValueError, match="Scene"):
        render("a red circle on the left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no prompts"):
        sample_scene(np.random.default_rng(0), prompts=[])
    with pytest.raises(ValueError, match="n_objects"):
        sample_scene(np.random.default_rng(0), n_objects=3)


def test_sample_scene():
    a = [sample_scene(np.random.default_rng(7)).prompt for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = np.random.default_rng(0)
    counts = [len(sample_scene(rng).objects) for _ in range(400)]
    assert 150 < counts.count(1) < 250 and counts.count(1) + counts.count(2) == 400
    assert all(len(sample_scene(rng, n_objects=2).objects) == 2 for _ in range(20))
    pool = ["a red circle on the left", "a blue square at the top and a red circle at the bottom"]
    drawn = {sample_scene(rng, prompts=pool).prompt for _ in range(50)}
    assert drawn == set(pool)
    assert {sample_scene(rng, n_objects=1, prompts=pool).prompt for _ in range(10)} == {pool[0]}
