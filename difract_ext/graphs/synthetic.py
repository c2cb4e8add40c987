"""A small synthetic FLUX-style attribution graph, for tests and for trying the frontend.

The graph follows the standard layout (:mod:`difract_ext.attribution.graph_meta`): double-stream
layers carry image- and text-stream features (and one unexplored-feature residue node each), every
layer has error nodes, inputs are one per position, and the targets sit on top. Edges only go from
a lower level (inputs < layer 0 < layer 1 < ... < targets) to a higher one, so the adjacency is a
DAG. A few positions take no part at all, so they disappear from the written graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from difract_ext.attribution.graph_meta import RESIDUE_FEATURE, GraphMeta
from difract_ext.attribution.row_graph import RowGraph, TargetNode

if TYPE_CHECKING:
    from circuit_tracer.graph import Graph

SYNTHETIC_VOCAB = 1000


def _meta(
    seed: int,
    grid: tuple[int, int],
    text_tokens: list[str],
    n_double: int,
    n_layers: int,
    d_img: dict[int, int],
    target_labels: list[str],
    step: int,
    timestep: float,
) -> GraphMeta:
    """The ``GraphMeta`` of a synthetic graph of the prompt "a red circle" (16 px patches)."""
    return GraphMeta(
        prompt="a red circle",
        seed=seed,
        step=step,
        timestep=timestep,
        num_inference_steps=4,
        n_txt=len(text_tokens),
        grid=grid,
        text_tokens=text_tokens,
        n_double=n_double,
        n_layers=n_layers,
        d_img=d_img,
        target_labels=target_labels,
        model_name="synthetic-flux",
        height=16 * grid[0],
        width=16 * grid[1],
    )


def synthetic_graph(
    seed: int = 0,
    grid: tuple[int, int] = (3, 3),
    n_txt: int = 4,
    n_double: int = 2,
    n_layers: int = 3,
    features_per_layer: int = 6,
    n_targets: int = 2,
    dead_positions: tuple[int, ...] = (3, 12),
) -> tuple[Graph, GraphMeta]:
    """A random layered graph and its ``GraphMeta``.

    Args:
        seed: numpy seed of the structure and weights.
        grid: image patch grid ``(rows, cols)``.
        n_txt: number of text positions (placed first).
        n_double: double-stream layers (with features); the rest are single-stream (errors only).
        n_layers: all transformer layers of the graph.
        features_per_layer: features per double layer (half image, half text stream), plus one
            residue node per layer.
        n_targets: number of targets.
        dead_positions: positions whose input and error nodes get no edge (never shown).

    Returns:
        ``(graph, meta)``: a ``circuit_tracer.graph.Graph`` and the matching ``GraphMeta``.
    """
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    rng = np.random.default_rng(seed)
    n_pos = n_txt + grid[0] * grid[1]
    d_img = {layer: 100 for layer in range(n_double)}
    text_tokens = [f"tok{i}" for i in range(n_txt)]
    if n_txt >= 4:
        text_tokens[:4] = ["a", "red", "circle", "</s>"]
    meta = _meta(
        seed,
        grid,
        text_tokens,
        n_double,
        n_layers,
        d_img,
        [f"v·u{k} @ r{k}c{k}" for k in range(n_targets)],
        step=2,
        timestep=0.625,
    )

    live = [p for p in range(n_pos) if p not in dead_positions]
    feats: list[tuple[int, int, int]] = []
    for layer in range(n_double):
        for i in range(features_per_layer):
            is_img = i % 2 == 0
            pos = int(rng.choice([p for p in live if (p >= n_txt) == is_img]))
            feat = int(rng.integers(0, 100)) + (0 if is_img else d_img[layer])
            feats.append((layer, pos, feat))
        feats.append((layer, int(rng.choice([p for p in live if p >= n_txt])), RESIDUE_FEATURE))
    feats = list(dict.fromkeys(feats))  # unique (layer, pos, feature)
    n_feat = len(feats)
    n_err = n_layers * n_pos
    m = n_feat + n_err + n_pos + n_targets

    level = np.zeros(m, dtype=int)  # inputs 0, layer l -> l + 1, targets n_layers + 1
    level[:n_feat] = [f[0] + 1 for f in feats]
    level[n_feat : n_feat + n_err] = np.repeat(np.arange(n_layers), n_pos) + 1
    level[n_feat + n_err + n_pos :] = n_layers + 1
    adj = np.zeros((m, m), dtype=np.float32)
    for tgt in range(m):
        sources = np.flatnonzero(level < level[tgt])
        if level[tgt] == 0 or sources.size == 0:
            continue
        chosen = rng.choice(sources, size=min(6, sources.size), replace=False)
        adj[tgt, chosen] = rng.normal(0.0, 1.0, size=chosen.size)
    inputs = n_feat + n_err
    for p in dead_positions:  # no input or error node at a dead position takes part
        for node in [inputs + p] + [n_feat + layer * n_pos + p for layer in range(n_layers)]:
            adj[:, node] = 0.0
            adj[node, :] = 0.0
    for i, f in enumerate(feats):  # residue nodes: strong direct effect on the first target
        if f[2] == RESIDUE_FEATURE:
            adj[m - n_targets, i] = 4.0

    probs = rng.dirichlet(np.ones(n_targets)).astype(np.float32)
    cfg = UnifiedConfig(
        n_layers=n_layers,
        d_model=8,
        d_head=4,
        n_heads=2,
        d_mlp=16,
        d_vocab=SYNTHETIC_VOCAB,
        tokenizer_name="none",
        model_name="synthetic-flux",
        original_architecture="FluxTransformer2DModel",
    )
    graph = Graph(
        input_string=meta.prompt,
        input_tokens=torch.arange(n_pos),
        active_features=torch.tensor(feats, dtype=torch.long),
        adjacency_matrix=torch.from_numpy(adj),
        cfg=cfg,
        selected_features=torch.arange(n_feat),
        activation_values=torch.from_numpy(rng.uniform(0.5, 3.0, n_feat).astype(np.float32)),
        logit_targets=[
            LogitTarget(token_str=label, vocab_idx=SYNTHETIC_VOCAB + k)
            for k, label in enumerate(meta.target_labels)
        ],
        logit_probabilities=torch.from_numpy(probs),
        scan="synthetic-flux",
        vocab_size=SYNTHETIC_VOCAB,
    )
    return graph, meta


def synthetic_row_graph(
    seed: int = 0,
    grid: tuple[int, int] = (64, 64),
    n_txt: int = 512,
    n_double: int = 4,
    n_layers: int = 6,
    n_expanded: int = 300,
    n_sources: int = 8,
) -> tuple[RowGraph, GraphMeta]:
    """A random :class:`RowGraph` at attribution scale (default: the shapes model at 256 px /
    512 tokens: 4,608 positions, 6 layers, 300 expanded features, one residue node per double
    layer and position, ~51 k nodes), for checking that files and the frontend cope.

    Each expanded feature takes ``n_sources`` edges from inputs, error nodes and features of
    lower layers; the one target takes edges from every expanded feature and ``n_sources``
    residue and error nodes. Rows ``[n_expanded + 1, M]`` float32.
    """
    rng = np.random.default_rng(seed)
    n_pos = n_txt + grid[0] * grid[1]
    text_tokens = [f"tok{i}" for i in range(n_txt)]
    d_img = {layer: 1000 for layer in range(n_double)}
    meta = _meta(seed, grid, text_tokens, n_double, n_layers, d_img, ["x0·red @ left"], 1, 0.75)
    layers = np.sort(rng.integers(0, n_double, n_expanded))
    positions = rng.integers(0, n_pos, n_expanded)
    ids = rng.integers(0, 2000, n_expanded)
    feats = list(dict.fromkeys(zip(layers.tolist(), positions.tolist(), ids.tolist())))
    residue = [(lay, p, RESIDUE_FEATURE) for lay in range(n_double) for p in range(n_pos)]
    active = torch.tensor(feats + residue, dtype=torch.long)
    n_exp, n_feat = len(feats), len(feats) + len(residue)
    error0, inputs = n_feat, n_feat + n_layers * n_pos
    m = inputs + n_pos + 1
    rows = torch.zeros(n_exp + 1, m)
    for r, (layer, pos, _) in enumerate(feats):
        lower = [i for i in range(r) if feats[i][0] < layer]
        cand = np.concatenate(
            [
                inputs + rng.integers(0, n_pos, n_sources),
                error0 + rng.integers(0, max(layer, 1) * n_pos, n_sources),
                np.asarray(lower, dtype=np.int64),
                [inputs + pos],
            ]
        )
        chosen = rng.choice(cand, size=min(n_sources, cand.size), replace=False)
        rows[r, torch.from_numpy(chosen)] = torch.from_numpy(rng.normal(0, 1, chosen.size)).float()
    side = np.concatenate(
        [
            n_exp + rng.integers(0, len(residue), n_sources),
            error0 + rng.integers(0, n_pos, n_sources),
        ]
    )
    rows[n_exp, :n_exp] = torch.from_numpy(rng.normal(0, 1, n_exp)).float()
    rows[n_exp, torch.from_numpy(side)] = torch.from_numpy(rng.normal(0, 0.5, side.size)).float()
    graph = RowGraph(
        rows=rows,
        row_nodes=torch.cat([torch.arange(n_exp), torch.tensor([m - 1])]),
        active_features=active,
        selected_features=torch.arange(n_feat),
        activation_values=torch.from_numpy(rng.uniform(0.5, 3.0, n_feat)).float(),
        logit_targets=[TargetNode(meta.target_labels[0], SYNTHETIC_VOCAB)],
        logit_probabilities=torch.ones(1),
        n_pos=n_pos,
        n_layers=n_layers,
        input_string=meta.prompt,
        scan="synthetic-flux",
    )
    return graph, meta


def synthetic_image(grid: tuple[int, int] = (3, 3), patch_px: int = 32) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 test image: a red disc on a blue-green gradient."""
    h, w = grid[0] * patch_px, grid[1] * patch_px
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([0.2 + 0.3 * xx / w, 0.5 * yy / h + 0.2, 0.8 - 0.4 * xx / w], axis=-1)
    disc = (yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2 < (min(h, w) * 0.28) ** 2
    img[disc] = (0.9, 0.1, 0.1)
    return (img * 255).round().astype(np.uint8)
