"""Fixtures of the attribution tests (a pytest plugin: ``pytest_plugins = ["tiny_attribution"]``):
the tiny random FLUX pipeline, one captured step of it and random transcoders on its double
blocks (``txt_1`` left out: an error-only stream). Module-scoped: each test module builds its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from random_dictionaries import SITES, random_transcoders

from difract_ext.flux.sites import Site
from difract_ext.flux.tiny import build_tiny_flux_pipeline
from difract_ext.replacement.inputs import capture_step_input
from difract_ext.replacement.targets import feature_target, output_target

KW = {"height": 32, "width": 32, "max_sequence_length": 16}
#: the left half of the 8 x 8 patch grid
LEFT = [(r, c) for r in range(8) for c in range(4)]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def step(pipe):
    return capture_step_input(pipe, "a red circle on the left", step=1, seed=0, **KW)


@pytest.fixture(scope="module")
def dics(pipe):
    sites = [s for s in SITES if s != Site(1, "txt")]  # txt_1: an error-only stream
    return random_transcoders(pipe.transformer.inner_dim, sites)


def layer1_targets(
    dics: Any, labels: Sequence[str] = ("x0", "f@p", "f summed"), x0_weight: float = 1.0
) -> Callable[[Any], list[Any]]:
    """A target factory for ``attribute_step``: ``"x0"`` (x0 over :data:`LEFT` on a fixed
    random direction), ``"f@p"`` and ``"f summed"`` (the first active layer-1 image feature, at
    its position and summed over the stream), in the order of ``labels``."""
    direction = torch.randn(16, generator=torch.Generator().manual_seed(3))
    site = Site(1, "img")

    def make(m: Any) -> list[Any]:
        feats = m.components.features
        img1 = feats[(feats[:, 0] == 1) & (feats[:, 2] < m.components.d_img[1])]
        feature, pos = int(img1[0, 2]), int(img1[0, 1])
        specs = {
            "x0": lambda: output_target(
                m.frozen, LEFT, direction, kind="x0", label="x0", weight=x0_weight
            ),
            "f@p": lambda: feature_target(
                m.frozen, dics, site, feature, positions=[pos], label="f@p"
            ),
            "f summed": lambda: feature_target(m.frozen, dics, site, feature, label="f summed"),
        }
        return [specs[label]() for label in labels]

    return make
