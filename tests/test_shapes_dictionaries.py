"""The shipped shapes-model dictionaries (``difract_ext/toy/dictionaries``): complete, loadable,
faithful.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import difract_ext
from difract_ext import SAELENS_IO, TimestepSAE, TimestepTranscoder
from difract_ext.flux.sites import STREAMS, Site

SHIPPED = Path(difract_ext.__file__).resolve().parent / "toy" / "dictionaries"
pytestmark = [
    pytest.mark.skipif(
        not (SHIPPED / "index.json").is_file(), reason="dictionaries not shipped yet"
    ),
    pytest.mark.usefixtures("one_thread"),
]
# the ship targets of every shipped transcoder on held-out prompts
TARGET_EV, TARGET_DEAD, TARGET_L0_FRACTION = 0.9, 0.05, 0.25


def test_every_mlp_has_a_transcoder_and_files_are_small() -> None:
    from difract_ext.toy.pipeline import shapes_config
    from difract_ext.training import load_dictionaries

    dicts = load_dictionaries(SHIPPED, io=SAELENS_IO)
    n_layers = shapes_config().num_layers
    tcs = {d.spec.site for d in dicts if d.spec.role == "transcoder"}
    assert tcs == {Site(layer, s) for layer in range(n_layers) for s in STREAMS}
    assert len({d.spec.site.layer for d in dicts if d.spec.role == "sae"}) >= 2
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 15 * 2**20
    for d in dicts:
        assert isinstance(
            d.module, TimestepTranscoder if d.spec.role == "transcoder" else TimestepSAE
        )
        d.module.check_unit_norm_decoder(atol=1e-5)
        assert d.module.cfg.trained_timesteps == [0.25, 0.5, 0.75, 1.0]
        held = json.loads((d.path / "metrics.json").read_text())["held_out"]["all"]
        assert held["explained_variance"] > 0.85, d.name


def test_all_transcoders_spliced_keep_generation_close() -> None:
    from difract_ext.intervene.generation import spliced_generation
    from difract_ext.toy import SHAPES_CALL_DEFAULTS, load_shapes_pipeline
    from difract_ext.training import load_dictionaries

    pipe = load_shapes_pipeline()
    tcs = {
        d.spec.site: d.module
        for d in load_dictionaries(SHIPPED, io=SAELENS_IO)
        if d.spec.role == "transcoder"
    }
    rows = spliced_generation(
        pipe,
        ["a red circle on the left", "a blue square at the top"],
        [5, 6],
        tcs,
        SHAPES_CALL_DEFAULTS,
        single=False,
        progress=False,
    )
    assert rows[-1]["spliced"] == f"all ({len(tcs)})"
    assert rows[-1]["latent_cosine"] > 0.9


def test_shipped_transcoders_meet_targets_and_their_records_hold_on_fresh_held_out_rows(
    tmp_path: Path,
) -> None:
    """Recorded held-out metrics meet the targets; a fresh harvest (other seed) reproduces EV and
    L0.
    """
    from difract_ext.capture import HarvestConfig, harvest
    from difract_ext.cli.sources import load_pipeline, load_prompts
    from difract_ext.training import evaluate_dictionaries, load_dictionaries

    tcs = [d for d in load_dictionaries(SHIPPED, io=SAELENS_IO) if d.spec.role == "transcoder"]
    recorded = {}
    for d in tcs:
        held = json.loads((d.path / "metrics.json").read_text())["held_out"]["all"]
        assert held["explained_variance"] >= TARGET_EV, d.name
        assert held["dead_fraction"] < TARGET_DEAD, d.name
        assert held["l0_fraction"] <= TARGET_L0_FRACTION, d.name
        recorded[d.name] = held
    loaded = load_pipeline("shapes")
    prompts = load_prompts("shapes:held_out")[::13]  # 15 prompts; seed 77 is in no recorded harvest
    cfg = HarvestConfig(
        sites=sorted({d.spec.site for d in tcs}),
        seeds=[77],
        call_kwargs=loaded.call_kwargs,
        model_name=loaded.model_name,
    )
    harvest(loaded.pipe, prompts, tmp_path / "fresh", cfg, progress=False)
    for ev in evaluate_dictionaries(tcs, tmp_path / "fresh", per_timestep=False, progress=False):
        fresh, rec = ev.groups["all"], recorded[ev.name]
        # 15 prompts x 1 seed against 195 x 6: sampling tolerance, not rounding
        assert abs(fresh["explained_variance"] - rec["explained_variance"]) < 0.02, (
            ev.name,
            fresh,
            rec,
        )
        assert fresh["explained_variance"] > TARGET_EV - 0.03, ev.name
        assert abs(fresh["l0_fraction"] - rec["l0_fraction"]) < 0.03, (ev.name, fresh, rec)
