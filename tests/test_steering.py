"""Edit metrics on rendered images with known edits, and the two steering selections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.attribution.row_graph import RowGraph, TargetNode
from difract_ext.flux.sites import Site
from difract_ext.intervene.metrics import EditTask, score_edit, summarize, target_mask
from difract_ext.intervene.spec import InterventionError, row_graph_nodes
from difract_ext.intervene.steering import circuit_steering, mean_difference_steering
from difract_ext.toy.world import COLORS, Scene, ShapeObject, object_box, render, shape_mask

PROMPT = "a red circle on the left and a green square on the right"


def scene(*objs: tuple[str, str, str]) -> Scene:
    return Scene(tuple(ShapeObject(*o) for o in objs))


def object_pixels(obj: ShapeObject, index: int, seed: int, size: int = 32) -> np.ndarray:
    """bool mask of object ``index`` of a two-object scene rendered at ``seed`` (world geometry:
    boxes are drawn in scene order from one rng)."""
    rng = np.random.default_rng(seed)
    boxes = [object_box(p, size, rng) for p in ("left", "right")]
    r0, c0, d = boxes[index]
    out = np.zeros((size, size), bool)
    out[r0 : r0 + d, c0 : c0 + d] = shape_mask(obj.shape, d, d)
    return out


def dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            out |= np.roll(np.roll(m, dr, 0), dc, 1)  # objects never touch the border
    return out


def test_task_parsing_and_concept_prompt() -> None:
    t = EditTask.parse(PROMPT, "right:shape=triangle")
    assert t.target_index == 1 and t.source_value == "square"
    assert t.concept_prompt == "a red circle on the left and a green triangle on the right"
    with pytest.raises(ValueError, match="already red"):
        EditTask.parse(PROMPT, "left:color=red")
    with pytest.raises(ValueError, match="no object at 'top'"):
        EditTask.parse(PROMPT, "top:color=blue")
    with pytest.raises(ValueError, match="POSITION:ATTRIBUTE=VALUE"):
        EditTask.parse(PROMPT, "left color blue")
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        EditTask.parse(PROMPT, "left:color=pink")


@pytest.mark.parametrize("seed", [0, 5])
def test_perfect_edit(seed: int) -> None:
    task = EditTask.parse(PROMPT, "left:color=blue")
    base = render(task.scene, seed=seed)
    edited = render(scene(("blue", "circle", "left"), ("green", "square", "right")), seed=seed)
    s = score_edit(base, edited, task)
    assert (s.success, s.attribute_collateral, s.pixel_collateral, s.sane, s.base_ok) == (
        True,
        0.0,
        0.0,
        True,
        True,
    )
    s = score_edit(base, base, task)  # nothing done: no success, no collateral
    assert (s.success, s.attribute_collateral, s.pixel_collateral) == (False, 0.0, 0.0)


def test_collateral_of_a_leaking_edit_matches_geometry() -> None:
    seed = 2
    task = EditTask.parse(PROMPT, "left:color=blue")
    base = render(task.scene, seed=seed)
    both_blue = scene(("blue", "circle", "left"), ("blue", "square", "right"))
    edited = render(both_blue, seed=seed)
    s = score_edit(base, edited, task)
    assert s.success and s.other_object_changed and s.sane
    assert s.attribute_collateral == pytest.approx(1 / 5)  # the other object's colour, of 5
    left = object_pixels(both_blue.objects[0], 0, seed)
    right = object_pixels(both_blue.objects[1], 1, seed)
    outside = ~dilate(left)
    assert np.array_equal(target_mask(base, edited, "left"), dilate(left))
    assert s.pixel_collateral == pytest.approx((right & outside).sum() / outside.sum(), abs=0)


def test_vanished_object_and_shape_edit() -> None:
    seed = 1
    task = EditTask.parse(PROMPT, "left:shape=square")
    base = render(task.scene, seed=seed)
    only_left = render(scene(("red", "square", "left")), seed=seed)
    s = score_edit(base, only_left, task)
    # the right object vanished: its 3 attributes changed; the target's colour and position
    # are kept; one object alone reads as "left" by its own centroid
    assert s.success and not s.sane and s.n_edited == 1
    assert s.attribute_collateral == pytest.approx(3 / 5)
    swapped = render(scene(("green", "square", "left"), ("red", "circle", "right")), seed=seed)
    s = score_edit(base, swapped, task)
    # the left object is a square (success) but both colours and the other shape changed
    assert s.success and s.attribute_collateral == pytest.approx(3 / 5)
    agg = summarize([score_edit(base, only_left, task), s, score_edit(base, base, task)])
    assert agg["success"] == pytest.approx(2 / 3) and agg["sane"] == pytest.approx(2 / 3)
    assert agg["attribute_collateral"] == pytest.approx(2 / 5) and agg["n"] == 3


def test_noise_below_tolerance_is_not_collateral() -> None:
    task = EditTask.parse(PROMPT, "left:color=blue")
    base = render(task.scene, seed=0).astype(np.float32) / 255
    noisy = np.clip(base + 0.09, 0, 1)
    s = score_edit(base, noisy, task)
    assert s.pixel_collateral == 0.0 and s.attribute_collateral == 0.0
    assert score_edit(base, np.clip(base + 0.11, 0, 1), task).pixel_collateral > 0.9


# ---- selection of features ----------------------------------------------------------------------


def toy_graph(step: int) -> tuple[RowGraph, GraphMeta]:
    """4 feature nodes (one a residue) over 2 layers, 2 text + 4 image positions, 1 target whose
    row weights the features 0.1, 0.4, 0.3 (residue 0.9): influence = those weights / sum."""
    n_txt, grid = 2, (2, 2)
    active = torch.tensor([[0, 4, 5], [1, 3, 2], [1, 0, 9], [0, 2, -2]])  # txt id 9 = 9 - 8
    s, n_layers, p = 4, 2, 6
    m = s + (n_layers + 1) * p + 1
    rows = torch.zeros(1, m)
    rows[0, :4] = torch.tensor([0.1, 0.4, 0.3, 0.9])
    g = RowGraph(
        rows=rows,
        row_nodes=torch.tensor([m - 1]),
        active_features=active,
        selected_features=torch.arange(4),
        activation_values=torch.tensor([1.5, 2.5, 3.5, 4.5]),
        logit_targets=[TargetNode("x0", 0)],
        logit_probabilities=torch.ones(1),
        n_pos=p,
        n_layers=n_layers,
    )
    meta = GraphMeta("p", 0, step, 1.0, 4, n_txt, grid, ["a", "b"], 2, 2, {0: 8, 1: 8}, ["x0"])
    return g, meta


def test_circuit_steering_takes_top_nodes_where_and_when() -> None:
    iv = circuit_steering([toy_graph(0)], [toy_graph(2)], k=2, strength=0.5)
    got = [
        (str(e.site), e.feature, e.op, e.value, e.positions, e.steps, e.strength) for e in iv.edits
    ]
    assert got == [
        ("img_1", 2, "ablate", 0.0, (1,), (0,), 0.5),  # influence 0.4: layer 1, patch 3 - 2
        ("txt_1", 1, "ablate", 0.0, (0,), (0,), 0.5),  # 0.3: text feature 9 - d_img 8
        ("img_1", 2, "set", 2.5, (1,), (2,), 0.5),
        ("txt_1", 1, "set", 3.5, (0,), (2,), 0.5),
    ]


def test_a_feature_at_the_other_streams_position_is_refused() -> None:
    g, meta = toy_graph(0)
    g.active_features[0] = torch.tensor([0, 1, 5])  # an image feature at a text position
    with pytest.raises(InterventionError, match="node 0: a img feature at a txt position 1"):
        row_graph_nodes(g, meta)


def test_mean_difference_steering_picks_largest_positive_differences() -> None:
    a = {Site(1, "img"): torch.tensor([1.0, 5.0, 2.0, 0.0]), "txt_2": torch.tensor([1.0, 1.0])}
    b = {Site(1, "img"): torch.tensor([0.5, 1.0, 4.0, 0.0]), "txt_2": torch.tensor([0.0, 2.0])}
    iv = mean_difference_steering(a, b, k=2, strength=3.0)
    got = [(str(e.site), e.feature, e.op, e.value, e.positions, e.steps) for e in iv.edits]
    assert got == [
        ("img_1", 1, "add", 4.0, None, None),
        ("img_1", 0, "add", 0.5, None, None),
        ("txt_2", 0, "add", 1.0, None, None),
    ]
    assert iv.role == "sae" and all(e.strength == 3.0 for e in iv.edits)


def test_colour_palette_is_what_tasks_accept() -> None:
    for c in COLORS:
        if c != "red":
            assert EditTask.parse(PROMPT, f"left:color={c}").value == c


def test_difract_steer_cli(tmp_path, capsys) -> None:
    import json

    from difract_ext.cli.main import main

    args = [
        "steer",
        "--prompt",
        PROMPT,
        "--edit",
        "left:color=blue",
        "--out",
        str(tmp_path),
        "--seeds",
        "0",
        "--strength",
        "0",
        "3",
        "--k",
        "3",
        "--graph-steps",
        "0",
        "--max-feature-nodes",
        "20",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "steer.json").read_text())
    assert (tmp_path / "steer.png").stat().st_size > 0
    for method in ("circuit", "sae"):
        zero, three = report["methods"][method]["runs"]
        # strength 0 is the identity: the image is the base image, bit for bit
        assert (zero["success"], zero["attribute_collateral"], zero["pixel_collateral"]) == (
            0.0,
            0.0,
            0.0,
        )
        edits = report["methods"][method]["intervention"]["edits"]
        assert edits and all(e["strength"] == 1.0 for e in edits)
    circuit = report["methods"]["circuit"]["intervention"]
    assert {e["steps"][0] for e in circuit["edits"]} == {0} and len(circuit["edits"]) == 6
    assert all(
        e["steps"] is None and e["positions"] is None
        for e in report["methods"]["sae"]["intervention"]["edits"]
    )
    assert "circuit x3: success" in capsys.readouterr().out
    assert main([*args[:4], "left:color=red", *args[5:]]) == 2  # already red: one error line
    assert "already red" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 5])
def test_binding_repair_names_the_swapped_attribute(seed: int) -> None:
    from difract_ext.intervene.metrics import Repair, binding_repair

    prompt = "a red circle on the left and a blue square on the right"
    swapped_shapes = scene(("red", "square", "left"), ("blue", "circle", "right"))
    swapped_colours = scene(("blue", "circle", "left"), ("red", "square", "right"))
    correct = scene(("red", "circle", "left"), ("blue", "square", "right"))
    only_right = scene(
        ("blue", "triangle", "right"),
    )
    # colours before shapes, prompt order first; a missing object is not a binding to repair
    assert binding_repair(prompt, render(swapped_shapes, seed=seed)) == Repair(
        "left", "shape", "square", "circle"
    )
    assert binding_repair(prompt, render(swapped_colours, seed=seed)) == Repair(
        "left", "color", "blue", "red"
    )
    assert binding_repair(prompt, render(correct, seed=seed)) is None
    assert binding_repair(prompt, render(only_right, seed=seed)) == Repair(
        "right", "shape", "triangle", "square"
    )
