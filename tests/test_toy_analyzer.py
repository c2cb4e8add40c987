"""Tests for the shapes-world analyzer (difract_ext.toy.analyzer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from difract_ext.toy.analyzer import accuracy_report, analyze, score
from difract_ext.toy.world import BACKGROUND, COLORS, parse_prompt, render, sample_scene


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge padding); float [H, W, 3]."""
    r = int(math.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return out


def _degrade(image: np.ndarray, rng: np.random.Generator, sigma=0.7, noise=10.0) -> np.ndarray:
    out = _blur(image, sigma) + rng.normal(0.0, noise, image.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _canvas(size: int = 32) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    return img


def _triples(image):
    return sorted((d.color, d.shape, d.position) for d in analyze(image))


# ---------------------------------------------------------------- detection


def test_blur_helper_preserves_mean_and_smooths():
    img = _canvas()
    img[10:20, 10:20] = (200, 100, 50)
    out = _blur(img, 0.7)
    assert np.allclose(out.mean(axis=(0, 1)), img.mean(axis=(0, 1)), atol=1e-6)
    assert 16 < out[15, 9, 0] < 200  # the edge is now a mix


def test_canonical_render_read_back_exactly():
    img = render(parse_prompt("a red square on the left and a blue circle on the right"))
    dets = sorted(analyze(img), key=lambda d: d.centroid[1])
    assert [(d.color, d.shape, d.position) for d in dets] == [
        ("red", "square", "left"),
        ("blue", "circle", "right"),
    ]
    # canonical square: rows 10..21, cols 2..13 -> 144 px centred at (15.5, 7.5)
    assert dets[0].area == 144 and dets[0].centroid == pytest.approx((15.5, 7.5))
    assert dets[1].centroid == pytest.approx((15.5, 23.5))
    assert all(0.9 <= d.confidence <= 1.0 for d in dets)


def test_hand_drawn_shapes_independent_of_renderer():
    """Shapes drawn here with their own formulas (not the renderer's) are recognised."""
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    img = _canvas()
    img[(yy - 8) ** 2 + (xx - 16) ** 2 <= 5.5**2] = COLORS["green"]  # disc, top
    apex_row, base_row = 18.0, 30.0  # triangle, bottom: width grows 1 px per row
    tri = (yy >= apex_row) & (yy <= base_row) & (np.abs(xx - 16) <= (yy - apex_row) * 0.5)
    img[tri] = COLORS["orange"]
    assert _triples(img) == [("green", "circle", "top"), ("orange", "triangle", "bottom")]
    img = _canvas()
    img[12:22, 20:30] = COLORS["yellow"]  # 10x10 square, right of centre
    assert _triples(img) == [("yellow", "square", "right")]


def test_position_rules():
    img = _canvas()
    img[3:11, 3:11] = COLORS["red"]  # both objects in the left half, one above the other:
    img[20:28, 5:13] = COLORS["blue"]  # the pair is separated vertically -> top / bottom
    assert _triples(img) == [("blue", "square", "bottom"), ("red", "square", "top")]
    img = _canvas()
    img[18:26, 2:10] = COLORS["red"]  # one object, lower left, farther left than low
    assert _triples(img) == [("red", "square", "left")]


def test_background_speckles_and_dark_pixels_ignored():
    img = _canvas()
    assert analyze(img) == []
    img[5:7, 5:7] = COLORS["red"]  # 4 px < 8 px minimum
    img[20, 20] = COLORS["blue"]
    img[12:20, 22:30] = (60, 20, 20)  # dark red: below half coverage -> background
    assert analyze(img) == []


def test_one_pixel_holes_and_dangling_pixels_are_cleaned():
    img = render(parse_prompt("a red square on the left"))  # rows 10..21, cols 2..13
    img[12, 5] = img[15, 8] = COLORS["orange"]  # isolated wrong-colour pixels inside
    img[18, 10] = BACKGROUND  # a hole
    img[9, 1] = COLORS["red"]  # a dangling pixel touching only the top-left corner
    (det,) = analyze(img)
    assert (det.color, det.shape, det.area) == ("red", "square", 144)
    assert det.confidence == pytest.approx(1.0)


def test_input_types_and_errors():
    img = render(parse_prompt("a purple triangle at the top"))
    as_float = img.astype(np.float32) / 255.0
    assert _triples(as_float) == _triples(img) == [("purple", "triangle", "top")]
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        analyze(np.transpose(img, (2, 0, 1)))
    with pytest.raises(ValueError, match="int32"):
        analyze(img.astype(np.int32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        analyze(as_float * 2 - 1)


def _accuracy(size: int, n: int, degrade: bool) -> float:
    rng = np.random.default_rng(1234 + size)
    ok = 0
    for i in range(n):
        scene = sample_scene(rng)
        img = render(scene, size=size, seed=i)
        if degrade:
            img = _degrade(img, rng)
        ok += score(img, scene).fully_correct
    return ok / n


def test_clean_renders_are_read_back():
    assert _accuracy(32, 300, degrade=False) >= 0.99
    assert _accuracy(64, 100, degrade=False) >= 0.99


def test_robust_to_blur_and_noise():
    assert _accuracy(32, 300, degrade=True) >= 0.95


# ---------------------------------------------------------------- score


PROMPT = "a red circle on the left and a blue square on the right"


def _score_of(image_prompt: str, prompt: str = PROMPT):
    return score(render(parse_prompt(image_prompt)), prompt)


def test_score_correct_image():
    for image_prompt in (PROMPT, "a blue square on the right and a red circle on the left"):
        s = _score_of(image_prompt)
        assert s.fully_correct and not s.binding_error and s.n_detected == 2
        assert s.color_ok == s.shape_ok == s.position_ok == [True, True]
    s = score(render(parse_prompt(PROMPT)), parse_prompt(PROMPT))  # a Scene works too
    assert s.fully_correct


@pytest.mark.parametrize(
    "image_prompt",
    [
        "a blue circle on the left and a red square on the right",  # colours swapped
        "a red square on the left and a blue circle on the right",  # shapes swapped
        "a red circle on the right and a blue square on the left",  # positions swapped
    ],
)
def test_binding_error_detected(image_prompt):
    s = _score_of(image_prompt)
    assert s.binding_error and not s.fully_correct
    assert s.color_ok == s.shape_ok == s.position_ok == [True, True]


def test_binding_error_same_colour_prompt():
    prompt = "a red circle on the left and a red square on the right"
    assert not _score_of(prompt, prompt).binding_error
    assert _score_of("a red square on the left and a red circle on the right", prompt).binding_error


@pytest.mark.parametrize(
    "image_prompt",
    [
        "a red circle on the left and a green square on the right",  # blue missing
        "a red circle on the left and a blue circle on the right",  # square missing
        "a red circle at the top and a blue square at the bottom",  # wrong places, no swap
    ],
)
def test_other_errors_are_not_binding_errors(image_prompt):
    s = _score_of(image_prompt)
    assert not s.binding_error and not s.fully_correct


def test_misplaced_objects_with_shared_shape_are_not_binding_errors():
    # Both prompted objects are circles, so a circle anywhere is no shape swap; both are
    # misplaced to top/bottom, which are neither prompted position.
    prompt = "a red circle on the left and a blue circle on the right"
    s = _score_of("a red circle at the top and a blue circle at the bottom", prompt)
    assert not s.binding_error and not s.fully_correct and s.position_ok == [False, False]


def test_wrong_number_of_objects():
    s = _score_of("a red circle on the left")
    assert s.n_detected == 1 and not s.fully_correct and not s.binding_error
    assert s.color_ok == [True, False]
    s = score(render(parse_prompt(PROMPT)), "a red circle on the left")
    assert s.n_detected == 2 and not s.fully_correct and not s.binding_error
    assert s.color_ok == s.shape_ok == s.position_ok == [True]


def test_accuracy_report():
    singles = [
        "a red circle on the left",
        "a green triangle at the top",
        "a blue square at the bottom",
    ]
    shown_singles = singles[:2] + ["a yellow square at the bottom"]  # last one: wrong colour
    doubles = [PROMPT, PROMPT]
    shown_doubles = [PROMPT, "a blue circle on the left and a red square on the right"]
    images = [render(parse_prompt(p)) for p in shown_singles + shown_doubles]
    rep = accuracy_report(images, singles + doubles)
    assert rep["single/n"] == 3 and rep["double/n"] == 2 and rep["all/n"] == 5
    assert rep["single/color"] == pytest.approx(2 / 3)
    assert rep["single/shape"] == rep["single/position"] == 1.0
    assert rep["single/fully_correct"] == pytest.approx(2 / 3)
    assert rep["single/count"] == 1.0
    assert rep["double/color"] == rep["double/shape"] == rep["double/position"] == 1.0
    assert rep["double/fully_correct"] == 0.5 and rep["double/binding_error"] == 0.5
    assert rep["all/fully_correct"] == pytest.approx(3 / 5)
    assert rep["all/color"] == pytest.approx(6 / 7)  # 7 prompted objects, one colour missed
    only_single = accuracy_report(images[:1], singles[:1])
    assert math.isnan(only_single["double/fully_correct"])
    assert math.isnan(only_single["double/binding_error"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        accuracy_report(images[:2], singles[:1])
