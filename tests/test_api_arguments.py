"""API arguments that used to be accepted and give a silently wrong result (issue 17, "API").

Each case names what used to happen; each refusal is checked for the argument it names, and the
neighbouring valid call is checked to still work, so a test fails if the check goes away or if it
refuses too much.
"""

from __future__ import annotations

import math

import pytest
import torch
from random_dictionaries import random_transcoders

from difract_ext import TimestepTranscoder, TimestepTranscoderConfig
from difract_ext.adapters.attribution import attribute_step
from difract_ext.adapters.tracing import FluxModel
from difract_ext.cli.attribution_job import parse_target
from difract_ext.dictionary.timestep import TimestepError, as_timestep_tensor
from difract_ext.flux.sites import Site, SiteError, as_site
from difract_ext.flux.tiny import build_tiny_flux_pipeline
from difract_ext.replacement.targets import TargetSpec
from difract_ext.util.config import ConfigError

KW = dict(height=32, width=32, max_sequence_length=16, num_inference_steps=4, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


# ---- tracer.steps: a step listed after a later one was skipped with the code after the loop ---


def _run_steps(flux: FluxModel, *selection: int) -> list[float]:
    seen = []
    with flux.trace("a red circle", seed=0, **KW) as tracer:
        for _ in tracer.steps(*selection):
            seen.append(flux.timestep.save())
        out = flux.output.save()
    assert out is not None  # the code after the loop ran
    return [float(t.reshape(-1)[0]) for t in seen]


@pytest.mark.parametrize("selection", [(2, 1), (1, 1), (3, 0, 2)])
def test_steps_out_of_order_are_refused(pipe, selection) -> None:
    flux = FluxModel(pipe)
    with pytest.raises(ValueError, match="increasing order") as err:
        _run_steps(flux, *selection)
    fix = sorted(set(selection))
    assert f"tracer.steps({', '.join(map(str, fix))})" in str(err.value)


def test_steps_in_order_visit_exactly_those_steps(pipe) -> None:
    flux = FluxModel(pipe)
    every = _run_steps(flux)
    assert len(every) == 4
    assert _run_steps(flux, 1, 2) == every[1:3]
    assert _run_steps(flux, 0, 3) == [every[0], every[3]]


# ---- sites: fractional, negative, bool layers ----------------------------------------------


@pytest.mark.parametrize("layer", [1.5, 1.0, -1, True])
def test_non_integer_layers_are_refused(layer) -> None:
    with pytest.raises(SiteError, match="layer must be a non-negative int"):
        Site(layer, "img")
    with pytest.raises(SiteError):
        as_site((layer, "img"))


def test_dictionary_named_for_another_site_is_refused(pipe) -> None:
    dics = random_transcoders(pipe.transformer.inner_dim, [Site(0, "img")])
    tc = dics[Site(0, "img")]
    tc.cfg.metadata.layer, tc.cfg.metadata.stream = 1, "img"
    flux = FluxModel(pipe)
    with pytest.raises(SiteError, match="img_1|layer 1"):
        flux.attach_transcoders({Site(0, "img"): tc})
    flux.attach_transcoders({Site(1, "img"): tc})  # where its metadata says it belongs
    assert flux.attached_sites == [Site(1, "img")]


# ---- attribution budget: 0 used to mean "no limit" ------------------------------------------


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_feature_budget_must_be_a_positive_integer(pipe, budget) -> None:
    # refused before any work: the step argument is never looked at
    with pytest.raises(ValueError, match=r"max_feature_nodes must be an integer >= 1.*got"):
        attribute_step(pipe.transformer, object(), {}, [], max_feature_nodes=budget)


# ---- target weights: 0, negative, inf, NaN failed late, deep in circuit-tracer --------------


@pytest.mark.parametrize("spec", ["x0:red@left=0", "x0:red@left=-1", "feature:img_1:3=1e400"])
def test_cli_target_weight_is_checked_while_parsing(spec) -> None:
    with pytest.raises(ConfigError, match=r"weight of --target .* must be a finite number > 0"):
        parse_target(spec)


def test_cli_target_weight_positive_is_kept() -> None:
    assert parse_target("x0:red@left=0.25").weight == 0.25
    assert parse_target("feature:img_1:3").weight == 1.0


@pytest.mark.parametrize("weight", [0.0, -1.0, math.inf, math.nan])
def test_python_target_weight_is_checked_at_construction(weight) -> None:
    with pytest.raises(ConfigError, match="weight of target 'x0 left' must be a finite number > 0"):
        TargetSpec(label="x0 left", weight=weight, injections=[])
    assert TargetSpec(label="x0 left", weight=0.5, injections=[]).weight == 0.5


# ---- timesteps outside [0, 1]: the scheduler's scale (750) used to pass ---------------------


@pytest.mark.parametrize("t", [750.0, 1.5, -0.25, torch.tensor([0.5, 1.01])])
def test_timestep_outside_unit_interval_is_refused(t) -> None:
    tc = TimestepTranscoder(TimestepTranscoderConfig(d_in=8, d_sae=16, d_out=8, d_t_embed=16))
    x = torch.randn(2, 8)
    with pytest.raises(TimestepError, match=r"outside \[0, 1\]"):
        tc.encode(x, t=t)
    with pytest.raises(TimestepError, match=r"outside \[0, 1\]"), tc.timestep(t):
        pass


def test_scheduler_scale_gets_the_fix() -> None:
    with pytest.raises(TimestepError, match=r"divide by 1000 \(t = 0\.75\)"):
        as_timestep_tensor(750)


def test_timestep_bounds_are_inclusive_and_follow_timestep_scale() -> None:
    tc = TimestepTranscoder(TimestepTranscoderConfig(d_in=8, d_sae=16, d_out=8, d_t_embed=16))
    x = torch.randn(2, 8)
    for t in (0.0, 1.0, torch.tensor([0.0, 1.0])):
        assert tc.encode(x, t=t).shape == (2, 16)
    # a backbone whose transformer receives [0, 1000]: t up to 1000 is valid
    sd3 = TimestepTranscoder(
        TimestepTranscoderConfig(d_in=8, d_sae=16, d_out=8, d_t_embed=16, timestep_scale=1e-3)
    )
    with torch.no_grad():
        sd3.load_state_dict(tc.state_dict())
    torch.testing.assert_close(sd3.encode(x, t=750.0), tc.encode(x, t=0.75), rtol=0, atol=0)
    with pytest.raises(TimestepError, match=r"outside \[0, 1000\]"):
        sd3.encode(x, t=1500.0)


# ---- trace([]) ------------------------------------------------------------------------------


def test_empty_prompt_list_is_refused_with_the_fix(pipe) -> None:
    flux = FluxModel(pipe)
    with pytest.raises(ValueError, match="needs an input"), flux.trace([], **KW):
        pass
