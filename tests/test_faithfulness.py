"""The faithfulness report: its statistics, and its ablations against the real transformer for
output and feature targets (single position and summed)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from tiny_attribution import layer1_targets

from difract_ext.adapters.attribution import attribute_step
from difract_ext.attribution.effects import total_effects
from difract_ext.attribution.faithfulness import (
    FaithfulnessConfig,
    ablation_agreement,
    agreement,
    faithfulness_report,
    top_nodes,
)
from difract_ext.attribution.partial import UNFROZEN, node_vectors

pytest_plugins = ["tiny_attribution"]


@pytest.fixture(scope="module")
def result(pipe, step, dics):
    make = layer1_targets(dics, labels=("f@p", "f summed", "x0"))
    return attribute_step(pipe.transformer, step, dics, make, batch_size=64, max_feature_nodes=30)


def test_agreement_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen)
    b = (b + a).double()
    got = agreement(a, b)
    assert got["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert got["pearson"] == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    same = sum(1 for x, y in zip(a.tolist(), b.tolist(), strict=True) if (x > 0) == (y > 0))
    assert got["sign_agreement"] == same / 40 and got["n"] == 40
    assert agreement(a, torch.ones(40, dtype=torch.float64))["pearson"] is None


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="sizes must be fractions"):
        FaithfulnessConfig(sizes=(0.0, 1.0))
    with pytest.raises(ValueError, match="top"):
        FaithfulnessConfig(top=1)


def _real_feature_target_change(pipe, step, spec, mlp_edits) -> float:
    """A feature target's change in the real transformer when ``(layer, pos, vec)`` are
    subtracted from double-block MLP outputs (torch hooks; the target read at ``ff``'s input)."""
    tf, n_txt = pipe.transformer, step.n_txt
    layer, pos, vecs = spec.injections[0]
    seen: list[torch.Tensor] = []
    handles = [
        tf.transformer_blocks[layer].ff.register_forward_pre_hook(
            lambda mod, args: seen.append(args[0][0])
        )
    ]
    for lay, p, vec in mlp_edits:
        block = tf.transformer_blocks[lay]
        module, local = (block.ff_context, p) if p < n_txt else (block.ff, p - n_txt)

        def hook(mod, args, out, local=local, vec=vec):
            out = out.clone()
            out[:, local] -= vec
            return out

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            tf(**step.transformer_kwargs(), return_dict=False)
    finally:
        for h in handles:
            h.remove()
    h = seen[0][(pos - n_txt)]
    return float((h.double() * vecs.double()).sum())


def test_feature_target_ablation_is_the_real_models(pipe, step, result) -> None:
    eff = total_effects(result.graph).effects
    loc, vec = node_vectors(result)
    for k in (0, 1):  # single position, summed
        spec = result.targets[k]
        nodes = top_nodes(result, eff[k], 4, features_only=True)
        assert len(nodes) == 4
        out = ablation_agreement(result, nodes, eff, (0.5,), UNFROZEN)
        clean = _real_feature_target_change(pipe, step, spec, [])
        for i, j in enumerate(nodes.tolist()):
            edit = [(int(loc[j, 0]), int(loc[j, 1]), 0.5 * vec[j])]
            expected = _real_feature_target_change(pipe, step, spec, edit) - clean
            assert float(out["measured"][0, i, k]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_report(pipe, step, result) -> None:
    cfg = FaithfulnessConfig(top=8, sizes=(0.1, 1.0), select=3, random_draws=2)
    rep = faithfulness_report(result, cfg)
    assert [t["label"] for t in rep["targets"]] == ["f@p", "f summed", "x0"]
    for t in rep["targets"]:
        assert t["nodes"] == 8
        # the graph's own model agrees exactly; the breakdown names every freeze
        assert t["frozen_max_rel_error"] <= 1e-4
        assert t["breakdown"]["frozen"]["100%"]["spearman"] == pytest.approx(1.0, abs=1e-12)
        assert set(t["breakdown"]) == {
            "frozen",
            "attention live",
            "layernorm live",
            "transcoders live",
            "real mlp",
        }
        assert set(t["ablation"]) == {"10%", "100%"}
    # selection: the graph's top features ablated together in the real model, checked by hooks
    sel = rep["targets"][0]["selection"]
    c = result.components
    edits = [
        (int(c.decoder_locations[0, i]), int(c.decoder_locations[1, i]), c.decoder_vecs[i])
        for i in sel["graph_features"]
    ]
    spec = result.targets[0]
    clean = _real_feature_target_change(pipe, step, spec, [])
    expected = abs(_real_feature_target_change(pipe, step, spec, edits) - clean)
    assert sel["graph"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert all(int(c.decoder_locations[0, i]) < 1 for i in sel["graph_features"])  # reach it
    pairwise = rep["pairwise"]  # DifFRACT's feature -> feature check, unsigned
    assert pairwise["features"] >= 2 and pairwise["n"] >= 2
    summary = rep["summary"]
    assert summary["Spearman @100%"] == rep["targets"][0]["ablation"]["100%"]["spearman"]
    assert summary["seconds"] == rep["seconds"] > 0
    assert all(math.isfinite(v) for v in summary.values())
