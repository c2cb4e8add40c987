"""Intervention specs: validation, the edit arithmetic, graph nodes -> edits, and bit identity of
``FluxModel.run_intervention`` with the same edits written as plain torch hooks."""

from __future__ import annotations

import math

import pytest
import torch

import difract_ext
from difract_ext.adapters.tracing import FluxModel
from difract_ext.attribution.graph_meta import RESIDUE_FEATURE, GraphMeta
from difract_ext.flux.sites import Site
from difract_ext.graphs.dashlinks import feature_fields
from difract_ext.intervene.spec import (
    FeatureEdit,
    Intervention,
    InterventionError,
    edit_features,
    edits_from_graph_json,
    edits_from_row_graph,
    json_graph_nodes,
    row_graph_nodes,
    top_feature_nodes,
)
from difract_ext.toy import load_shapes_pipeline

PROMPTS = ["a red circle on the left and a green square on the right", "a blue square at the top"]


# ---- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(op="boost"), "op must be one of"),
        (dict(feature=-1), "feature must be >= 0"),
        (dict(value=math.nan), "value must be a finite number"),
        (dict(positions=[]), "positions is empty"),
        (dict(steps=[-1]), "steps must be >= 0"),
        (dict(rows="0"), "rows must be a list of ints"),
        (dict(site="img1"), "img_3"),
    ],
)
def test_edit_validation(kwargs, match) -> None:
    base = dict(site="img_1", feature=3, op="set", value=1.0)
    with pytest.raises(ValueError, match=match):
        FeatureEdit(**{**base, **kwargs})


def test_edit_round_trip_and_ablate_value() -> None:
    e = FeatureEdit("txt_2", 5, "ablate", 7.0, positions=[3, 1, 3], steps=[0], strength=0.5)
    assert e.value == 0.0 and e.positions == (1, 3) and e.site == Site(2, "txt")
    iv = Intervention((e, FeatureEdit((1, "img"), 0, "add", 2.0)), label="x")
    assert Intervention.from_dict(iv.to_dict()) == iv
    assert list(iv.at_step(0)) == [Site(1, "img"), Site(2, "txt")]  # execution order
    assert list(iv.at_step(1)) == [Site(1, "img")]
    with pytest.raises(InterventionError, match="cannot combine"):
        _ = iv + Intervention((), role="sae")


def brute_edit(z: torch.Tensor, edits: list[FeatureEdit]) -> torch.Tensor:
    """Reference: element by element, in order."""
    out = z.clone()
    b, s, _ = z.shape
    for e in edits:
        for r in range(b) if e.rows is None else e.rows:
            for p in range(s) if e.positions is None else e.positions:
                cur = float(out[r, p, e.feature])
                goal = {"scale": cur * e.value, "set": e.value, "ablate": 0.0}.get(
                    e.op, cur + e.value
                )
                out[r, p, e.feature] = goal if e.strength == 1 else cur + e.strength * (goal - cur)
    return out


def test_edit_features_matches_elementwise_reference() -> None:
    z = torch.rand(3, 5, 7, dtype=torch.float64)
    edits = [
        FeatureEdit("img_0", 2, "scale", 3.0, positions=[0, 4], rows=[1]),
        FeatureEdit("img_0", 2, "add", -0.5, positions=[4], strength=2.0),  # sees the scale
        FeatureEdit("img_0", 6, "set", 9.0, rows=[0, 2]),
        FeatureEdit("img_0", 0, "ablate", strength=0.25),
        FeatureEdit("img_0", 1, "set", 4.0, positions=[2], strength=0.5),
    ]
    got = edit_features(z, edits)
    assert torch.equal(got, brute_edit(z, edits))
    assert torch.equal(edit_features(z, []), z)
    with pytest.raises(InterventionError, match="positions 5 out of range"):
        edit_features(z, [FeatureEdit("img_0", 0, "ablate", positions=[5])])
    with pytest.raises(InterventionError, match="only 7 features"):
        edit_features(z, [FeatureEdit("img_0", 7, "ablate")])


# ---- graphs -> edits ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    pipe = load_shapes_pipeline()
    tcs = difract_ext.load_shapes_dictionaries()
    return pipe, tcs


@pytest.fixture(scope="module")
def graph(shapes):
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.cli.attribution_job import build_targets, parse_target
    from difract_ext.replacement.inputs import capture_step_input
    from difract_ext.toy.world import COLORS

    pipe, tcs = shapes
    make = build_targets([parse_target("x0:red@left")], pipe, tcs, COLORS)
    step = capture_step_input(pipe, PROMPTS[0], step=1, seed=0)
    res = attribute_step(pipe.transformer, step, tcs, make, max_feature_nodes=24)
    return res.graph, res.meta


def reference_nodes(graph, meta: GraphMeta) -> list[tuple[Site, int, int]]:
    """(site, feature in its dictionary, stream position) from the raw layout, for every feature
    node (residue nodes left out)."""
    out = []
    for i in range(graph.n_features):
        layer, pos, fid = graph.active_features[graph.selected_features[i]].tolist()
        if fid == RESIDUE_FEATURE:
            continue
        if fid < meta.d_img[layer]:
            out.append((Site(layer, "img"), fid, pos - meta.n_txt))
        else:
            out.append((Site(layer, "txt"), fid - meta.d_img[layer], pos))
    return out


def test_row_graph_nodes_read_the_layout(graph) -> None:
    g, meta = graph
    refs = row_graph_nodes(g, meta)
    assert [(r.site, r.feature, r.position) for r in refs] == reference_nodes(g, meta)
    assert {r.site.stream for r in refs} == {"img", "txt"}  # both kinds are exercised
    assert all(r.step == 1 for r in refs)
    top = top_feature_nodes(g, meta, 5)
    infl = g.node_influence()
    feats = [i for i in range(g.n_features) if g.active_features[g.selected_features[i]][2] >= 0]
    best = sorted(feats, key=lambda i: -float(infl[i]))[:5]
    assert [r.influence for r in top] == [float(infl[i]) for i in best]


def test_graph_json_nodes_give_the_same_edits(graph) -> None:
    g, meta = graph
    nodes, ids = [], []
    for i in range(g.n_features):
        layer, pos, fid = g.active_features[g.selected_features[i]].tolist()
        if fid == RESIDUE_FEATURE:
            continue
        nid = f"n{i}"
        act = float(g.activation_values[g.selected_features[i]])
        nodes.append(
            {"node_id": nid, "activation": act, "difract": feature_fields(meta, layer, fid, pos)}
        )
        ids.append(nid)
    data = {"metadata": {"step": meta.step, "grid": list(meta.grid)}, "nodes": nodes}
    from_json = edits_from_graph_json(data, [ids[:3], ids[3:]], "activation")
    from_rows = edits_from_row_graph(g, meta, range(g.n_features), "activation")
    assert from_json == from_rows
    with pytest.raises(InterventionError, match="no node 'zz'"):
        json_graph_nodes(data, ["zz"])


# ---- bit identity with hand-written hooks -------------------------------------------------------


def hand_hooks(pipe, dicts, plan, role: str):
    """``plan``: {(layer, stream): [(step, rows, pos, feature, fn)]}; ``fn(z_entry) -> new``.
    Written independently of the spec: a step counter, the dictionary's encode, y + Δz·W_dec."""
    state = {"t": None, "calls": 0}

    def pre(mod, args, kwargs):
        state["t"] = kwargs["timestep"]
        state["calls"] += 1

    def make(layer, stream):
        d = dicts[Site(layer, stream)]

        def hook(mod, args, y):
            step = state["calls"] - 1
            todo = [p for p in plan[(layer, stream)] if p[0] == step]
            if not todo:
                return y
            with torch.no_grad():
                z = d.encode(args[0] if role == "transcoder" else y, t=state["t"])
            z2 = z.clone()
            for _, rows, pos, f, fn in todo:
                for r in rows:
                    for p in pos:
                        z2[r, p, f] = fn(z2[r, p, f])
            return y + (z2 - z) @ d.W_dec

        return hook

    handles = [pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)]
    for layer, stream in plan:
        mod = pipe.transformer.transformer_blocks[layer]
        mod = mod.ff if stream == "img" else mod.ff_context
        handles.append(mod.register_forward_hook(make(layer, stream)))
    return handles


def test_graph_interventions_bit_identical_to_hand_hooks(shapes, graph) -> None:
    from difract_ext.toy import SHAPES_CALL_DEFAULTS

    pipe, tcs = shapes
    g, meta = graph
    top = top_feature_nodes(g, meta, 6)
    assert {r.site.stream for r in top} >= {"txt"}
    img = [r for r in row_graph_nodes(g, meta) if r.site.stream == "img"][:2]
    # graph step (1) only, set to the graph's activation x 3 on row 1; ablations at every step
    edits = [
        *(
            FeatureEdit(
                r.site,
                r.feature,
                "set",
                3 * r.activation,
                positions=[r.position],
                steps=[r.step],
                rows=[1],
            )
            for r in top[:3]
        )
    ]
    edits += [
        FeatureEdit(r.site, r.feature, "ablate", positions=[r.position], steps=[0, 2])
        for r in top[3:] + img
    ]
    iv = Intervention(tuple(edits))
    plan: dict = {}
    for e in edits:
        fn = (lambda v: lambda x: torch.full_like(x, v))(e.value)
        for st in e.steps:
            plan.setdefault((e.site.layer, e.site.stream), []).append(
                (st, e.rows or [0, 1], e.positions, e.feature, fn)
            )
    flux = FluxModel(pipe, transcoders=tcs)
    seeds = [3, 4]
    out = flux.run_intervention(PROMPTS, iv, seeds=seeds, output_type="latent").images
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    base = pipe(PROMPTS, generator=gens, output_type="latent", **SHAPES_CALL_DEFAULTS).images
    handles = hand_hooks(pipe, tcs, plan, "transcoder")
    try:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            ref = pipe(PROMPTS, generator=gens, output_type="latent", **SHAPES_CALL_DEFAULTS).images
    finally:
        for h in handles:
            h.remove()
    assert not torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])
    assert torch.equal(out, ref)


def test_sae_intervention_bit_identical_to_hand_hooks(shapes) -> None:
    from difract_ext.toy import SHAPES_CALL_DEFAULTS

    pipe, _ = shapes
    saes = difract_ext.load_shapes_dictionaries(role="sae")
    edits = (
        FeatureEdit("img_1", 4, "add", 2.5),
        FeatureEdit("txt_2", 9, "scale", 0.0, positions=[1, 2], steps=[1]),
    )
    plan = {
        (1, "img"): [(s, [0], range(64), 4, lambda x: x + 2.5) for s in range(4)],
        (2, "txt"): [(1, [0], [1, 2], 9, lambda x: x * 0.0)],
    }
    flux = FluxModel(pipe)
    out = flux.run_intervention(
        PROMPTS[:1],
        Intervention(edits, role="sae"),
        seeds=7,
        dictionaries=saes,
        output_type="latent",
    ).images
    handles = hand_hooks(pipe, saes, plan, "sae")
    try:
        with torch.no_grad():
            ref = pipe(
                PROMPTS[:1],
                generator=[torch.Generator().manual_seed(7)],
                output_type="latent",
                **SHAPES_CALL_DEFAULTS,
            ).images
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out, ref)
    without_img_0 = {site: sae for site, sae in saes.items() if str(site) != "img_0"}
    with pytest.raises(InterventionError, match="no sae at img_0"):
        flux.run_intervention(
            PROMPTS[:1],
            Intervention((FeatureEdit("img_0", 0, "ablate"),), role="sae"),
            dictionaries=without_img_0,
        )
