"""Shape targets of the shapes world (``x0:circle@left``): directions, values and their use in
circuit-guided shape edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difract_ext.adapters.attribution import attribute_step
from difract_ext.adapters.checkpoints import load_shapes_dictionaries
from difract_ext.cli.attribution_job import build_targets, parse_target
from difract_ext.flux.directions import packed_latents, region_patches
from difract_ext.replacement.inputs import capture_step_input
from difract_ext.toy import load_shapes_pipeline
from difract_ext.toy.directions import shape_directions
from difract_ext.toy.world import COLORS, POSITIONS, SHAPES, Scene, ShapeObject, render

PROMPT = "a red circle on the left and a blue square on the right"


@pytest.fixture(scope="module")
def pipe():
    return load_shapes_pipeline()


def _grid(pipe) -> tuple[int, int]:
    side = 32 // (2 * int(pipe.vae_scale_factor))
    return side, side


@pytest.mark.parametrize("position", POSITIONS)
def test_shape_directions_tell_every_drawn_shape_apart(pipe, position) -> None:
    grid = _grid(pipe)
    dirs = shape_directions(pipe, position, grid)
    idx = torch.tensor([r * grid[1] + c for r, c in region_patches(position, grid)])
    # a probe fitted to centred one-hot shapes: its directions sum to zero
    total = sum(dirs.values())
    assert float(total.abs().max()) <= 1e-5 * max(float(d.abs().max()) for d in dirs.values())
    # each (shape, colour) drawn at a jittered place scores highest on its own shape
    for seed in (1000, 1001):  # placements the directions did not average
        scenes = [Scene((ShapeObject(c, s, position),)) for s in SHAPES for c in COLORS]
        images = torch.from_numpy(np.stack([render(sc, 32, seed=seed) for sc in scenes]))
        with torch.no_grad():
            lat = packed_latents(pipe, images.permute(0, 3, 1, 2).float() / 255.0)[:, idx]
        scores = torch.einsum("bnc,snc->bs", lat.float(), torch.stack(list(dirs.values())))
        drawn = torch.arange(len(SHAPES)).repeat_interleave(len(COLORS))
        assert torch.equal(scores.argmax(dim=1), drawn), (position, seed)


def test_shape_target_value_is_the_projection_of_x0(pipe) -> None:
    dics = load_shapes_dictionaries()
    step = capture_step_input(pipe, PROMPT, 2, seed=0)
    specs = ["x0:circle@left", "x0:square@left", "x0:square@right=2"]
    make = build_targets([parse_target(s) for s in specs], pipe, dics, COLORS)
    res = attribute_step(pipe.transformer, step, dics, make, max_feature_nodes=5)
    # independently: x0 = x_t - t * v of the real step over the region, times the direction
    x0 = step.hidden_states[0].double() - step.t * step.output[0].double()
    for k, spec in enumerate(specs):
        shape, region = spec.split(":")[1].split("=")[0].split("@")
        d = shape_directions(pipe, region, step.grid)[shape].double()
        idx = torch.tensor([r * step.grid[1] + c for r, c in region_patches(region, step.grid)])
        expected = float((x0[idx] * d).sum())
        assert float(res.target_values[k]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert res.targets[2].weight == 2.0
    # the model draws a circle on the left and a square on the right
    assert float(res.target_values[0]) > float(res.target_values[1])
    assert float(res.target_values[2]) > 0


def test_shape_target_parsing() -> None:
    r = parse_target("x0:triangle@top")
    assert (r.shape, r.colour, r.region) == ("triangle", None, "top")
    assert parse_target("x0:red@top").colour == "red"
    with pytest.raises(ValueError, match="needs the object's region"):
        parse_target("x0:circle@all")


def test_shape_edit_graphs(pipe) -> None:
    from difract_ext.cli.steer_job import circuit_intervention
    from difract_ext.intervene.metrics import EditTask

    task = EditTask(PROMPT, "left", "shape", "triangle")
    iv = circuit_intervention(
        pipe, load_shapes_dictionaries(), task, steps=(1,), k=3, max_feature_nodes=20
    )
    assert len(iv.edits) == 6 and all(e.steps == (1,) for e in iv.edits)


def test_shape_directions_refuse_what_they_cannot_probe(pipe) -> None:
    with pytest.raises(ValueError, match="unknown position 'all'"):
        shape_directions(pipe, "all", (8, 8))
    with pytest.raises(ValueError, match="square image"):
        shape_directions(pipe, "left", (8, 16))
