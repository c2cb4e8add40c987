"""Total effects against exact perturbations of the frozen replacement model, every node kind;
the partially frozen model against the real transformer."""

from __future__ import annotations

import pytest
import torch
from tiny_attribution import layer1_targets

from difract_ext.adapters.attribution import attribute_step
from difract_ext.attribution.effects import feature_row_values, row_total_effects, total_effects
from difract_ext.attribution.graph_meta import RESIDUE_FEATURE
from difract_ext.attribution.partial import (
    FROZEN,
    UNFROZEN,
    Edit,
    Freeze,
    PartialFlux,
    node_edit,
    node_vectors,
)

pytest_plugins = ["tiny_attribution"]


def _targets(dics):
    return layer1_targets(dics, x0_weight=2.0)


@pytest.fixture(scope="module")
def full(pipe, step, dics):
    return attribute_step(pipe.transformer, step, dics, _targets(dics), batch_size=64)


@pytest.fixture(scope="module")
def budget(pipe, step, dics):
    return attribute_step(
        pipe.transformer, step, dics, _targets(dics), batch_size=64, max_feature_nodes=25
    )


def _sources(result) -> torch.Tensor:
    return torch.arange(result.graph.n_nodes - result.graph.n_targets)


@pytest.mark.parametrize("which", ["full", "budget"])
def test_total_effects_equal_exact_perturbation(which, request) -> None:
    result = request.getfixturevalue(which)
    g = result.graph
    eff = total_effects(g).effects  # [K, M]
    cols = _sources(result)
    vectors = node_vectors(result)
    model = PartialFlux(result, FROZEN)
    measured = model.target_changes([node_edit(result, int(j), 1.0, vectors) for j in cols])
    kinds = {
        "feature": cols < g.n_features,
        "error": (cols >= g.n_features) & (cols < g.error_end),
        "input": cols >= g.error_end,
    }
    feats = g.active_features[g.selected_features]
    kinds["residue"] = torch.zeros_like(kinds["feature"])
    kinds["residue"][: g.n_features] = feats[:, 2] == RESIDUE_FEATURE
    assert bool(kinds["residue"].any()) == (which == "budget")
    for k in range(g.n_targets):
        pred = -eff[k, cols]
        scale = float(pred.abs().max())
        assert scale > 1e-3
        for kind, mask in kinds.items():
            if not bool(mask.any()):
                continue
            err = (measured[mask, k] - pred[mask]).abs()
            # 1e-5 relative to the largest effect on that target (float32 model, float64 sums)
            assert float(err.max()) <= 1e-5 * scale, (k, kind, float(err.max()), scale)
    # the paths matter: the feature targets' effects are not their direct edges
    direct = torch.stack([-g.target_row(k)[cols].double() for k in range(g.n_targets)], 1)
    assert float((measured - direct).abs().max()) > 1e-2 * float(measured.abs().max())


def test_total_effects_are_linear_in_the_fraction(full) -> None:
    g = full.graph
    eff = total_effects(g).effects
    top = eff[0, : g.error_end].abs().argsort(descending=True)[:8]
    model = PartialFlux(full, FROZEN)
    measured = model.target_changes([node_edit(full, int(j), 0.01) for j in top])
    torch.testing.assert_close(
        measured[:, 0], -0.01 * eff[0, top], rtol=1e-4, atol=1e-6 * float(eff[0].abs().max())
    )


def test_total_effects_match_the_dense_inverse(budget) -> None:
    # the textbook formula on the square matrix: x = e (I - A D^-1)^-1, effects = x A
    g = budget.graph
    a = g.dense_adjacency().double()
    d = torch.ones(g.n_nodes, dtype=torch.float64)
    d[g.row_nodes] = feature_row_values(g)
    eye = torch.eye(g.n_nodes, dtype=torch.float64)
    inv = torch.linalg.inv(eye - a / d[None, :])
    expected = inv[g.n_nodes - g.n_targets :] @ a
    got = total_effects(g)
    torch.testing.assert_close(got.effects, expected, rtol=1e-9, atol=1e-10)
    w = g.logit_probabilities.double()
    torch.testing.assert_close(got.influence, w @ expected, rtol=1e-9, atol=1e-10)
    # ...and the unnormalised (I - A)^-1 row the old validation used is off by 100x the
    # perturbation test's tolerance (4 % of the largest effect on this random graph)
    unnorm = torch.linalg.inv(eye - a)[g.n_nodes - g.n_targets :] - eye[g.n_nodes - g.n_targets :]
    assert float((unnorm - expected).abs().max()) > 1e-3 * float(expected.abs().max())


def test_unfrozen_partial_model_is_the_real_transformer(pipe, step, full) -> None:
    # no edit: every target's value on the real step
    got = PartialFlux(full, UNFROZEN).target_values([Edit()])[0]
    torch.testing.assert_close(got, full.target_values.double(), rtol=1e-5, atol=1e-5)
    # each freeze alone, no edit: the clean values too (the tape is the clean pass)
    for freeze in (FROZEN, Freeze(attention=False), Freeze(layernorm=False), Freeze(mlp="real")):
        got = PartialFlux(full, freeze).target_values([Edit()])[0]
        torch.testing.assert_close(got, full.target_values.double(), rtol=1e-5, atol=1e-5)
    # an ablated feature: the same as hooking the real transformer's MLP
    loc, vec = node_vectors(full)
    j = int((full.graph.selected_features < full.components.n_active).nonzero()[3])
    layer, pos = int(loc[j, 0]), int(loc[j, 1])
    tf = pipe.transformer
    n_txt = step.n_txt
    block = tf.transformer_blocks[layer]
    module, local = (block.ff_context, pos) if pos < n_txt else (block.ff, pos - n_txt)

    def hook(mod, args, out):
        out = out.clone()
        out[:, local] -= vec[j]
        return out

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            ablated = tf(**step.transformer_kwargs(), return_dict=False)[0]
    finally:
        handle.remove()
    spec = full.targets[0]  # x0 = x_t - t v over the left patches, projected on u
    patches = torch.tensor(spec.info["patches"])
    u, scale = spec.info["direction"], spec.info["scale"]
    expected = float(scale * ((ablated[0, patches] - step.output[0, patches]) * u).sum())
    got = PartialFlux(full, UNFROZEN).target_changes([node_edit(full, j)])
    assert float(got[0, 0]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_effects_by_gradient(full) -> None:
    g = full.graph
    all_eff = total_effects(g).effects
    eff = all_eff[:, g.error_end : g.token_end].T  # [P, K]
    model = PartialFlux(full, FROZEN)
    got = model.input_effects()
    torch.testing.assert_close(got, eff, rtol=0, atol=1e-5 * float(eff.abs().max()))
    # feature and error nodes: <gradient at the MLP output, the node's vector>
    grads = model.linear_effects()["mlp_out"]  # [L, P, d, K]
    loc, vec = node_vectors(full)
    feat = torch.einsum("nd,ndk->nk", vec.double(), grads[loc[:, 0], loc[:, 1]])
    err = torch.einsum("lpd,lpdk->lpk", full.components.error_vectors.double(), grads)
    expected = all_eff[:, : g.error_end].T
    got = torch.cat([feat, err.reshape(-1, g.n_targets)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="linear"):
        PartialFlux(full, UNFROZEN).input_effects()


def test_row_total_effects_on_a_feature(budget) -> None:
    # a layer-1 feature's pre-activation: every source's effect on it, by perturbation
    g = budget.graph
    feats = g.active_features[g.selected_features]
    rows = [r for r, n in enumerate(g.row_nodes.tolist()) if n < g.n_features]
    r = next(r for r in rows if int(feats[g.row_nodes[r], 0]) == 1)
    j = int(g.row_nodes[r])
    eff = row_total_effects(g, torch.tensor([r]))[0]
    cols = torch.arange(g.error_end)
    model = PartialFlux(budget, FROZEN)
    layer, pos = int(feats[j, 0]), int(feats[j, 1])
    enc = budget.components.encoder_vecs[g.selected_features[j]].double()
    vectors = node_vectors(budget)
    edits = [Edit(), *[node_edit(budget, int(i), 1.0, vectors) for i in cols]]
    cap = model.run(edits, [layer])
    pre = (cap["mlp_in"][layer][:, pos].double() * enc).sum(-1)
    measured = pre[1:] - pre[0]
    scale = float(eff.abs().max())
    assert scale > 1e-3 and float(eff[: g.n_features][feats[:, 0] == 0].abs().max()) > 0
    torch.testing.assert_close(measured, -eff[cols], rtol=0, atol=1e-5 * scale)
