"""Graphs that scale with what is expanded: the row driver against circuit-tracer's attribute(),
its truncated ranking rows, and influence / pruning / scores on rows against circuit-tracer's."""

from __future__ import annotations

import pytest
import torch
from circuit_tracer.graph import (
    compute_graph_scores,
    compute_node_influence,
    compute_partial_influences,
    prune_graph,
)
from circuit_tracer.utils.create_graph_files import create_nodes, create_used_nodes_and_edges
from random_dictionaries import random_transcoders

from difract_ext.adapters.attribution import (
    FluxReplacementModel,
    attribute_step,
    circuit_tracer_graph,
)
from difract_ext.attribution import validation as V
from difract_ext.attribution.ranking import RankingPlan, RankingRows, plan_ranking
from difract_ext.attribution.row_graph import RowGraph
from difract_ext.flux.tiny import build_tiny_flux_pipeline
from difract_ext.graphs import files
from difract_ext.graphs.synthetic import synthetic_graph
from difract_ext.replacement.frozen import frozen_parameters
from difract_ext.replacement.inputs import capture_step_input
from difract_ext.replacement.targets import output_target

KW = {"height": 32, "width": 32, "max_sequence_length": 16}
LEFT = [(r, c) for r in range(8) for c in range(4)]


@pytest.fixture(scope="module")
def setup():
    pipe = build_tiny_flux_pipeline(seed=0)
    step = capture_step_input(pipe, "a red circle on the left", step=1, seed=0, **KW)
    dics = random_transcoders(pipe.transformer.inner_dim)
    u = torch.randn(16, generator=torch.Generator().manual_seed(3))

    def targets(m):
        return [
            output_target(m.frozen, LEFT, u, kind="x0", label="x0·u @ left", weight=2.0),
            output_target(m.frozen, "all", -u, kind="velocity", label="v·-u @ all"),
        ]

    return pipe, step, dics, targets


def run(setup, **kw):
    pipe, step, dics, targets = setup
    return attribute_step(
        pipe.transformer, step, dics, targets, batch_size=32, backward_batch=16, **kw
    )


@pytest.fixture(scope="module")
def graphs(setup):
    """Budget 40 by the row driver (whole rows: one pass), by circuit-tracer's attribute(), and
    by the row driver with 8 entries per ranking row (two passes)."""
    return {
        "rows": run(setup, max_feature_nodes=40),
        "circuit-tracer": run(setup, max_feature_nodes=40, method="circuit-tracer"),
        "truncated": run(setup, max_feature_nodes=40, rank_entries=8),
    }


def test_driver_is_circuit_tracers_attribute(setup, graphs) -> None:
    """With whole ranking rows the driver expands the same features in the same order and
    builds the same rows as circuit-tracer's attribute() + add_residue, bit for bit."""
    for budget in (40, None):
        ours = graphs["rows"] if budget else run(setup)
        ref = graphs["circuit-tracer"] if budget else run(setup, method="circuit-tracer")
        assert ours.graph.info["one_pass"] and ours.graph.info["exact_passes"] == 0
        assert torch.equal(ours.graph.selected_features, ref.graph.selected_features)
        assert torch.equal(ours.graph.active_features, ref.graph.active_features)
        assert torch.equal(ours.graph.row_nodes, ref.graph.row_nodes)
        assert torch.equal(ours.graph.rows, ref.graph.rows)
        assert ours.n_residue == ref.n_residue == (160 if budget else 0)
    # backward passes: 1 for the 2 targets, then 40 features in passes of 16 (16, 16, 8)
    assert graphs["rows"].graph.info["backward_passes"] == 4


def test_truncated_ranking_rows_then_exact_rows(setup, graphs) -> None:
    """Ranking rows cut to 8 feature entries: the chosen rows are recomputed narrowed to the
    chosen features, and every column still matches a perturbation of the frozen model."""
    trunc = graphs["truncated"]
    info = trunc.graph.info
    assert not info["one_pass"] and info["rank_entries"] == 8
    assert info["exact_passes"] == 4 and info["backward_passes"] == 8
    measured, predicted = V.source_perturbations(trunc)
    scale = float(predicted.abs().max())
    torch.testing.assert_close(measured, predicted, rtol=0, atol=1e-5 * scale)
    assert V.conservation(trunc)["max_rel_error"] <= 1e-5
    # every feature expanded: the recomputed rows are the one-pass rows
    whole, cut = run(setup), run(setup, rank_entries=8)
    assert torch.equal(whole.graph.selected_features, cut.graph.selected_features)
    err = (whole.graph.rows - cut.graph.rows).abs().max() / whole.graph.rows.abs().max()
    assert float(err) <= 1e-6


def _synthetic_rows(seed: int):
    graph, meta = synthetic_graph(seed=seed)
    return graph, files.as_row_graph(graph)


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.7)])
def test_prune_influence_and_scores_are_circuit_tracers(graphs, thresholds) -> None:
    cases = [(r.circuit_tracer_graph(), r.graph) for r in graphs.values()]
    cases += [_synthetic_rows(seed) for seed in range(4)]  # error nodes with rows too
    for dense, rows in cases:
        torch.testing.assert_close(
            rows.node_influence(),
            compute_node_influence(dense.adjacency_matrix, rows.logit_weights()),
            rtol=1e-5,
            atol=1e-7,
        )
        ours, ref = rows.prune(*thresholds), prune_graph(dense, *thresholds)
        assert torch.equal(ours.node_mask, ref.node_mask)
        assert torch.equal(ours.edge_mask, ref.edge_mask[rows.row_nodes])
        assert not ours.zero_edges_kept
        assert int(ref.edge_mask.sum()) == int(ours.edge_mask.sum()) > 0  # no edge off the rows
        torch.testing.assert_close(ours.cumulative_scores, ref.cumulative_scores, rtol=0, atol=1e-6)
        assert rows.scores() == pytest.approx(compute_graph_scores(dense), rel=1e-6)


def test_partial_influences_are_circuit_tracers() -> None:
    """Ranking rows kept whole give circuit-tracer's compute_partial_influences; truncated rows
    (largest entries, exact row sums) never inflate an influence."""
    gen = torch.Generator().manual_seed(0)
    n_feat, n_tail, n_targets = 60, 20, 2
    layer = torch.arange(n_feat) // 20  # 3 layers; a row only reads lower layers
    nodes = torch.cat(
        [torch.tensor([n_feat, n_feat + 1]), torch.randperm(n_feat, generator=gen)[:30]]
    )
    full = torch.randn(len(nodes), n_feat + n_tail + n_targets, generator=gen)
    for r, node in enumerate(nodes.tolist()):
        row_layer = 3 if node >= n_feat else int(layer[node])
        full[r, :n_feat] *= (layer < row_layer).float()
    full[:, n_feat + n_tail :] = 0  # target columns
    probs = torch.tensor([0.7, 0.3])
    ct_index = torch.where(nodes >= n_feat, nodes + n_tail, nodes).int()  # targets after the tail
    expected = compute_partial_influences(full, probs, ct_index, device="cpu")[:n_feat]
    for plan, exact in ((RankingPlan(n_feat, True), True), (RankingPlan(7, False), False)):
        store = RankingRows(len(nodes), n_feat, plan, n_tail, 4, "cpu")
        store.add(nodes, full[:, : n_feat + n_tail], torch.zeros(len(nodes), 2, 2))
        got = store.partial_influences(probs)
        if exact:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
        else:
            assert bool((got <= expected + 1e-7).all()) and float(got.sum()) > 0
            assert float(got.sum()) < float(expected.sum())


def test_ranking_plan() -> None:
    # whole rows when they fit: N entries + (L+1)P error/input columns + L*P totals
    assert plan_ranking(1000, 100, 50, 40, rank_bytes=100 * (4 * 1090 + 12)) == RankingPlan(
        1000, True
    )
    plan = plan_ranking(1000, 100, 50, 40, rank_bytes=100 * 4 * 1090)
    assert plan == RankingPlan(363, False)  # 435,600 bytes / (12 bytes x 100 rows)
    assert plan.row_bytes(1000, 50, 40) == 12 * 363 + 12
    assert plan_ranking(10**6, 100, 50, 40, rank_bytes=1000) == RankingPlan(256, False)
    assert plan_ranking(1000, 100, 50, 40, rank_entries=5000) == RankingPlan(1000, True)
    assert plan_ranking(1000, 100, 50, 40, rank_entries=10) == RankingPlan(10, False)
    with pytest.raises(ValueError, match="rank_entries"):
        plan_ranking(1000, 100, 50, 40, rank_entries=0)


def test_graph_file_links_are_circuit_tracers(graphs) -> None:
    """The nodes and links written from the rows are circuit-tracer's create_nodes +
    create_used_nodes_and_edges on the dense graph."""
    res = graphs["truncated"]
    dense = res.circuit_tracer_graph()
    ref_mask, ref_edges, ref_cum = prune_graph(dense)
    ref_nodes = create_nodes(dense, ref_mask, None, ref_cum)
    ref_used, ref_links = create_used_nodes_and_edges(dense, ref_nodes, ref_edges)
    pruned = res.graph.prune()
    nodes = create_nodes(dense, pruned.node_mask, None, pruned.cumulative_scores)
    used, links = files._used_nodes_and_edges(res.graph, nodes, pruned.edge_mask)
    assert links == ref_links and len(links) > 10
    assert [n.node_id for n in used] == [n.node_id for n in ref_used]


def test_forward_values_are_released(setup) -> None:
    """The (L + 1) cached injection points keep no values after the forward (only graph
    nodes), and the rows are the same as with the values kept."""
    pipe, step, dics, targets = setup
    out = []
    with torch.enable_grad(), frozen_parameters(pipe.transformer):
        for release in (False, True):
            model = FluxReplacementModel(pipe.transformer, step, dics)
            model.set_targets(targets)
            edges = model.edges()
            with model.frozen.hooks(
                fwd_hooks=edges.forward_hooks(), bwd_hooks=edges.backward_hooks()
            ):
                if release:
                    edges.release_forward_values(during_forward=True)
                model.frozen.linear_forward(batch=4)
            if release:
                edges.release_forward_values()
            kept = sum(r.untyped_storage().nbytes() for r in edges.resid)
            assert (kept == 0) == release and len(edges.resid) == 4
            out.append(edges.rows(torch.arange(8), targets=False).clone())
    assert torch.equal(out[0], out[1])


def test_row_graph_round_trip_and_dense_guard(graphs) -> None:
    g = graphs["rows"].graph
    back = RowGraph.from_dict(g.to_dict())
    assert torch.equal(back.rows, g.rows) and back.logit_targets == g.logit_targets
    with pytest.raises(MemoryError, match="use RowGraph.prune"):
        g.dense_adjacency(max_bytes=1000)
    dense = circuit_tracer_graph(g)
    again = files.as_row_graph(dense)
    assert torch.equal(again.rows, g.rows) and torch.equal(again.row_nodes, g.row_nodes)
    with pytest.raises(ValueError, match="row nodes"):
        RowGraph(**{**g.to_dict(), "rows": g.rows[:, :-1]})


def test_feature_kernel_groups_positions_by_count() -> None:
    """Positions with very different feature counts (ReLU transcoders) are padded per group of
    similar counts, not to the layer's largest count, and the products stay exact."""
    from difract_ext.attribution.edges import FeatureKernel
    from difract_ext.attribution.memory import kernel_padding

    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 60, (40,), generator=gen)
    counts[3] = 200  # one crowded position
    positions = torch.repeat_interleave(torch.arange(40) * 2, counts)  # every other position
    positions = positions[torch.randperm(len(positions), generator=gen)]
    vecs = torch.randn(len(positions), 8, generator=gen)
    kernel = FeatureKernel(positions, vecs)
    grads = torch.randn(5, 80, 8, generator=gen)
    expected = torch.einsum("bnd,nd->nb", grads[:, positions], vecs)
    torch.testing.assert_close(kernel(grads), expected, rtol=1e-5, atol=1e-5)
    n = len(positions)
    assert n <= kernel.padded_entries <= 1.125 * n < 200 * 40  # one block would pad to 200 each
    locations = torch.stack([torch.zeros_like(positions), positions])
    assert kernel_padding(locations) == kernel.padded_entries / n


def test_gpu_memory_paths_give_the_same_graph(setup, graphs) -> None:
    """What a GPU build does to save device memory, exercised on the CPU: feature vectors kept
    on the host side (``host_vectors``) and the modules the affine path does not use moved away
    (to the ``meta`` device here, where any use of them would fail), same rows."""
    import copy

    from difract_ext.attribution.build import build_graph

    pipe, step, dics, targets = setup
    tf = copy.deepcopy(pipe.transformer)
    model = FluxReplacementModel(tf, step, dics, host_vectors=True)
    model.set_targets(targets)
    unused = model.frozen.unused_by_linear_path()
    with model.frozen.offload_unused("cpu"):  # moved (here: to where they are) and back
        assert all(p.device.type == "cpu" for m in unused for p in m.parameters())
    for m in unused:  # gone for good: the copy is thrown away
        m.to("meta")
    with torch.enable_grad(), frozen_parameters(tf):
        graph = build_graph(model, max_feature_nodes=40, batch_size=32, backward_batch=16)
    assert sum(p.numel() for m in unused for p in m.parameters()) > 0.6 * sum(
        p.numel() for p in tf.parameters()
    )
    assert torch.equal(graph.selected_features, graphs["rows"].graph.selected_features)
    torch.testing.assert_close(graph.rows, graphs["rows"].graph.rows, rtol=0, atol=0)
