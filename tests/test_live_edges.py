"""First-order graphs (``live`` freezes lifted from the edges): their total effects against the
gradient of the model they linearise and against central differences of it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_attribution import layer1_targets

from difract_ext.adapters.attribution import attribute_step
from difract_ext.attribution.effects import total_effects
from difract_ext.attribution.faithfulness import FaithfulnessConfig, faithfulness_report, own_model
from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.attribution.partial import FROZEN, PartialFlux, node_edit, node_vectors
from difract_ext.cli.graphs import LIVE_CHOICES
from difract_ext.replacement.frozen import LIVE_PARTS, FrozenFlux

pytest_plugins = ["tiny_attribution"]

LIVES = [("layernorm",), ("layernorm", "attention")]


def _targets(dics):
    return layer1_targets(dics, labels=("x0", "f@p"))


@pytest.fixture(scope="module")
def graphs(pipe, step, dics):
    # float64: a lifted LayerNorm recomputes its denominator, whose float32 rounding (~1e-7 of
    # the target) would swamp the small perturbations the first-order check needs
    transformer = copy.deepcopy(pipe.transformer).double()
    step = dataclasses.replace(
        step,
        **{
            f.name: getattr(step, f.name).double()
            for f in dataclasses.fields(step)
            if isinstance(getattr(step, f.name), torch.Tensor)
            and getattr(step, f.name).is_floating_point()
        },
    )
    dics = {site: copy.deepcopy(d).double() for site, d in dics.items()}
    return {
        live: attribute_step(transformer, step, dics, _targets(dics), batch_size=64, live=live)
        for live in [(), *LIVES]
    }


def test_live_is_validated(pipe, step) -> None:
    with pytest.raises(ValueError, match="live takes parts of"):
        FrozenFlux(pipe.transformer, step, live=("softmax",))
    with pytest.raises(ValueError, match="a collection"):
        FrozenFlux(pipe.transformer, step, live="layernorm")
    assert LIVE_CHOICES == LIVE_PARTS  # the CLI's spelling of the parts
    # offloading keeps what a live part uses on the device
    q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert q in FrozenFlux(pipe.transformer, step, live=("layernorm",)).unused_by_linear_path()
    assert q not in FrozenFlux(pipe.transformer, step, live=("attention",)).unused_by_linear_path()


def test_meta_records_live(graphs) -> None:
    assert graphs[()].meta.live == []
    meta = graphs[LIVES[1]].meta
    assert meta.live == ["attention", "layernorm"]
    assert GraphMeta.from_dict(meta.to_dict()).live == meta.live
    assert own_model(meta.live) == own_model(set(LIVES[1]))
    assert own_model([]) == FROZEN


@pytest.mark.parametrize("live", LIVES)
def test_live_effects_equal_the_gradient_of_the_model(graphs, live) -> None:
    result = graphs[live]
    g = result.graph
    eff = total_effects(g).effects  # [K, M]
    # the edges changed: the lifted freeze is not a no-op
    frozen_eff = total_effects(graphs[()].graph).effects
    assert float((eff - frozen_eff).abs().max()) > 1e-2 * float(eff.abs().max())
    # one backward pass through the whole model the graph linearises, no adjacency involved
    lin = PartialFlux(result, own_model(live)).linear_effects()
    scale = float(eff.abs().max())
    torch.testing.assert_close(
        lin["input"], eff[:, g.error_end : g.token_end].T, rtol=0, atol=1e-5 * scale
    )
    loc, vec = node_vectors(result)
    feat = torch.einsum("nd,ndk->nk", vec.double(), lin["mlp_out"][loc[:, 0], loc[:, 1]])
    err = torch.einsum(
        "lpd,lpdk->lpk", result.components.error_vectors.double(), lin["mlp_out"]
    ).reshape(-1, g.n_targets)
    got = torch.cat([feat, err])
    torch.testing.assert_close(got, eff[:, : g.error_end].T, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("live", LIVES)
def test_live_effects_are_first_order(graphs, live) -> None:
    # central differences of the lifted model: (Δ(+s) - Δ(-s)) / 2 = -s * effect + O(s^3);
    # at s = 1e-3 in float64 the O(s^2) relative remainder is ~1e-5 (the tolerance: 1e-4)
    result = graphs[live]
    g = result.graph
    eff = total_effects(g).effects
    nodes = torch.cat(
        [
            eff[0, : g.error_end].abs().argsort(descending=True)[:12],
            torch.arange(g.error_end, g.token_end)[eff[0, g.error_end : g.token_end].abs() > 0][:4],
        ]
    )
    vectors = node_vectors(result)
    model = PartialFlux(result, own_model(live))
    s = 1e-3
    plus = model.target_changes([node_edit(result, int(j), s, vectors) for j in nodes])
    minus = model.target_changes([node_edit(result, int(j), -s, vectors) for j in nodes])
    measured = (plus - minus) / 2
    for k in range(g.n_targets):
        pred = -s * eff[k, nodes]
        scale = float(pred.abs().max())
        assert scale > 0
        torch.testing.assert_close(measured[:, k], pred, rtol=0, atol=1e-4 * scale)
    # ... while the affine graph's prediction misses the lifted model by far more
    affine = -s * total_effects(graphs[()].graph).effects[0, nodes]
    assert float((measured[:, 0] - affine).abs().max()) > 2e-2 * float(affine.abs().max())


def test_report_checks_a_live_graph_against_its_own_model(graphs) -> None:
    result = graphs[LIVES[0]]
    rep = faithfulness_report(
        result, FaithfulnessConfig(sizes=(0.001, 1.0), breakdown=True, select=0, pairwise=False)
    )
    for t in rep["targets"]:
        assert "frozen_max_rel_error" not in t
        assert t["own_model_rel_error"] <= 1e-2  # first order at 0.1 %: O(1e-3) relative
        assert t["breakdown"]["layernorm live"]["0.1%"]["spearman"] is not None
