"""Fixtures of the attribution tests (a pytest plugin: ``pytest_plugins = ["tiny_attribution"]``):
the tiny random FLUX pipeline, one captured step of it and random transcoders on its double
blocks (``txt_1`` left out: an error-only stream). Module-scoped: each test module builds its own.
"""

from __future__ import annotations

import pytest
from random_dictionaries import SITES, random_transcoders

from difract_ext.flux.sites import Site
from difract_ext.flux.tiny import build_tiny_flux_pipeline
from difract_ext.replacement.inputs import capture_step_input

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
