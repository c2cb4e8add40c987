"""The shipped shapes-model dictionaries (``difract_ext/toy/dictionaries``): complete, loadable, faithful."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import difract_ext
from difract_ext import TimestepSAE, TimestepTranscoder
from difract_ext.flux.sites import STREAMS, Site

SHIPPED = Path(difract_ext.__file__).resolve().parent / "toy" / "dictionaries"
pytestmark = pytest.mark.skipif(not (SHIPPED / "index.json").is_file(), reason="dictionaries not shipped yet")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_mlp_has_a_transcoder_and_files_are_small() -> None:
    from difract_ext.toy.pipeline import shapes_config
    from difract_ext.training import load_dictionaries

    dicts = load_dictionaries(SHIPPED)
    n_layers = shapes_config().num_layers
    tcs = {d.spec.site for d in dicts if d.spec.role == "transcoder"}
    assert tcs == {Site(layer, s) for layer in range(n_layers) for s in STREAMS}
    assert len({d.spec.site.layer for d in dicts if d.spec.role == "sae"}) >= 2
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 15 * 2**20
    for d in dicts:
        assert isinstance(d.module, TimestepTranscoder if d.spec.role == "transcoder" else TimestepSAE)
        d.module.check_unit_norm_decoder(atol=1e-5)
        assert d.module.cfg.trained_timesteps == [0.25, 0.5, 0.75, 1.0]
        held = json.loads((d.path / "metrics.json").read_text())["held_out"]["all"]
        assert held["explained_variance"] > 0.85, d.name


def test_all_transcoders_spliced_keep_generation_close() -> None:
    from difract_ext.toy import SHAPES_CALL_DEFAULTS, load_shapes_pipeline
    from difract_ext.training import load_dictionaries, spliced_generation

    pipe = load_shapes_pipeline()
    tcs = {d.spec.site: d.module for d in load_dictionaries(SHIPPED) if d.spec.role == "transcoder"}
    rows = spliced_generation(pipe, ["a red circle on the left", "a blue square at the top"], [5, 6], tcs,
                              SHAPES_CALL_DEFAULTS, single=False, progress=False)
    assert rows[-1]["spliced"] == f"all ({len(tcs)})"
    assert rows[-1]["latent_cosine"] > 0.9
