"""Per-graph feature files: what the frontend shows when a feature node is clicked.

circuit-tracer's frontend fetches ``{data}/features/{scan}/{feature}.json`` (``feature`` is the
node's Cantor-paired ``(layer, feature index)``) and draws its ``examples_quantiles`` as token
strips coloured by activation. Without a corpus scan the one example we have for sure is the graph's
own step: every joint position (text tokens, then image patches ``img rXcY``) with the feature's
activation there. This module writes that file for each feature node of a graph; a corpus
dashboard can later add more quantiles to the same schema.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.graphs.schema import FEATURE_TYPE, validate_slug
from difract_ext.util.atomic import atomic_write_json

if TYPE_CHECKING:
    from circuit_tracer.graph import Graph

    from difract_ext.attribution.row_graph import RowGraph

logger = logging.getLogger(__name__)

__all__ = ["feature_file_payload", "write_step_feature_files"]


def feature_file_payload(
    graph: RowGraph | Graph, meta: GraphMeta, layer: int, feature: int
) -> dict[str, Any]:
    """The frontend's feature JSON for ``(layer, feature)`` with this step as its one example.

    Args:
        graph: the (unpruned) graph (a ``RowGraph`` or circuit-tracer's); its
            ``active_features [N, 3]`` and ``activation_values [N]`` hold every active
            (layer, position, feature).
        meta: positions and run of the graph.
        layer: the feature's layer.
        feature: the feature's index (image ids first, text ids offset by ``meta.d_img``).

    Returns:
        ``{index, examples_quantiles, top_logits, bottom_logits, act_min, act_max}``; the example's
        ``tokens`` are the ``meta.n_pos`` position labels and ``tokens_acts_list`` the activations
        (0 where the feature is inactive).
    """
    af = graph.active_features
    mask = (af[:, 0] == layer) & (af[:, 2] == feature)
    if not bool(mask.any()):
        raise ValueError(f"feature {feature} is not active at layer {layer} in this graph")
    acts = torch.zeros(meta.n_pos)
    acts[af[mask, 1].long()] = graph.activation_values[mask].float().cpu()
    peak = int(acts.argmax())
    example = {
        "tokens": [meta.position_label(p) for p in range(meta.n_pos)],
        "tokens_acts_list": [round(float(a), 6) for a in acts],
        "train_token_ind": peak,
        "is_repeated_datapoint": False,
    }
    title = f"this graph: step {meta.step}, t = {meta.timestep:.4g}, seed {meta.seed}"
    return {
        "index": int(feature),
        "layer": int(layer),
        "examples_quantiles": [{"quantile_name": title, "examples": [example]}],
        "top_logits": [],
        "bottom_logits": [],
        "act_min": 0.0,
        "act_max": float(acts.max()),
    }


def write_step_feature_files(
    graph: RowGraph | Graph,
    meta: GraphMeta,
    nodes: Iterable[dict[str, Any]],
    out_dir: str | Path,
    scan: str,
) -> list[Path]:
    """Write ``{out_dir}/features/{scan}/{feature}.json`` for every feature node in ``nodes``.

    Args:
        graph: the unpruned graph the nodes come from.
        meta: its :class:`GraphMeta`.
        nodes: graph-JSON node dicts; those with ``feature_type == "cross layer transcoder"``
            (ids ``{layer}_{feature}_{pos}``) get a file. An existing file is replaced
            (atomically): the same feature id in another graph of the folder gets that graph's step.
        out_dir: the data folder served by :func:`difract_ext.graphs.server.serve`.
        scan: the graph's ``metadata.scan``.

    Returns:
        the written paths.
    """
    validate_slug(scan)
    folder = Path(out_dir) / "features" / scan
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[int, Path] = {}
    for node in nodes:
        if node.get("feature_type") != FEATURE_TYPE or node["feature"] in written:
            continue
        layer, feature, _ = (int(v) for v in node["node_id"].split("_"))
        path = folder / f"{int(node['feature'])}.json"
        atomic_write_json(path, feature_file_payload(graph, meta, layer, feature))
        written[node["feature"]] = path
    logger.info("%d feature files written to %s", len(written), folder)
    return list(written.values())
