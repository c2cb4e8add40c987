"""Graph files for circuit-tracer's frontend, for attribution graphs of one FLUX denoising step.

``write_graph_files`` follows circuit-tracer's ``create_graph_files`` and reuses its pieces
(``create_nodes``, the pydantic models of ``frontend.graph_models``); graphs are
:class:`~difract_ext.attribution.row_graph.RowGraph` (circuit-tracer ``Graph`` objects are read
as their rows), pruned by ``RowGraph.prune`` (circuit-tracer's ``prune_graph`` on the rows, so
no square matrix is built), and links are read from the kept rows (zero-weight links of
row-less nodes, which circuit-tracer writes when the edge threshold comes out at 0, are not). It
replaces what assumes a language model:

- position labels come from :meth:`GraphMeta.position_label` (``'txt 3 "cat"'``, ``'img r2c5'``,
  ``'txt 9 "<pad>"'`` for T5 padding, which FLUX attends to) instead of a Hugging Face tokenizer;
  ``metadata.positions`` flags padding (``"padding": true``);
- input (embedding) nodes without a kept edge are dropped, and ``ctx_idx`` is compacted to the
  positions that still carry nodes (ascending true position: text, then image patches row-major);
  the true position stays in ``metadata.prompt_tokens`` and ``metadata.positions``;
- the targets get their own last column, labelled ``targets``;
- error nodes get the fixed ``{layer}_-1_{pos}`` id (circuit-tracer issue #78), and
  unexplored-feature residue nodes (feature id :data:`RESIDUE_FEATURE`) their own
  ``feature_type`` (:data:`RESIDUE_FEATURE_TYPE`) and id ``{layer}_-2_{pos}``;
- feature nodes carry ``"difract": {"site", "stream", "layer", "feature", "position", "token",
  "patch"}`` (:func:`~difract_ext.graphs.dashlinks.feature_fields`) and are labelled (``clerp``)
  by their dashboard's concept label when dashboards for the graph's scan exist, else by their
  site and index (``"img_1 #123"``); target nodes carry ``"difract_target": {"label", "value",
  "weight"}`` and are labelled ``Target "x0·red @ left" = +1.234`` (their value when known; the
  weight among several targets otherwise), not circuit-tracer's ``(p=...)``.

All ids use the *true* position, so they stay stable when pruning changes. The metadata also
carries the run (prompt, seed, step, timestep, grid) and, when given, the generated image as a
PNG beside the JSON (``{slug}.png``), which the patched frontend (``assets/difract``) shows with
a patch heatmap. ``graph-metadata.json`` is updated under a lock with an atomic replace.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from difract_ext.attribution.graph_meta import RESIDUE_FEATURE, GraphMeta
from difract_ext.attribution.row_graph import RowGraph, TargetNode
from difract_ext.flux.sites import Site
from difract_ext.graphs.dashlinks import (
    dashboard_label,
    feature_fields,
    find_dashboards,
    open_dashboards,
)
from difract_ext.graphs.features import write_step_feature_files
from difract_ext.graphs.schema import (
    ERROR_FEATURE_TYPE,
    FEATURE_TYPE,
    GRAPH_METADATA_FILE,
    RESIDUE_FEATURE_TYPE,
    TARGET_COLUMN_LABEL,
    validate_slug,
)
from difract_ext.replacement.inputs import is_padding_label
from difract_ext.util.atomic import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from circuit_tracer.frontend.graph_models import Node
    from circuit_tracer.graph import Graph
    from PIL.Image import Image

    from difract_ext.dashboards.store import DashboardStore

logger = logging.getLogger(__name__)

__all__ = [  # the frontend's vocabulary lives in graphs.schema and is re-exported here
    "ERROR_FEATURE_TYPE",
    "FEATURE_TYPE",
    "GRAPH_METADATA_FILE",
    "RESIDUE_FEATURE_TYPE",
    "TARGET_COLUMN_LABEL",
    "apply_dashboards",
    "as_row_graph",
    "build_graph_json",
    "feature_label",
    "graph_metadata_entry",
    "image_png_bytes",
    "read_graph_metadata",
    "target_label",
    "title_prefix",
    "upsert_graph_metadata",
    "validate_slug",
    "write_graph_files",
]


def feature_label(meta: GraphMeta, layer: int, feature: int) -> str:
    """``"img_1 #123"`` / ``"txt_0 #45"``: the feature's site (``str(Site(layer, stream))``) and its
    index inside that site's dictionary."""
    stream = meta.feature_stream(layer, feature)
    return f"{Site(layer, stream)} #{meta.stream_feature_index(layer, feature)}"


def target_label(label: str) -> str:
    """A target label the UI can read between the first double quotes: no double quotes."""
    return label.replace('"', "'").replace("\n", " ")


def target_clerp(label: str, value: float | None, weight: float, n_targets: int) -> str:
    """``Target "x0·red @ left" = +1.234``: what the target is (region × direction) and its
    value at this step; without a value, its weight among several targets (``w=0.50``)."""
    text = f'Target "{target_label(label)}"'
    if value is not None:
        text += f" = {value:+.4g}"
    if n_targets > 1:
        text += f" (w={weight:.2f})"
    return text


def title_prefix(meta: GraphMeta) -> str:
    """``"step 3/4 · t=0.750 · seed 0 ·"``: shown before the prompt in the graph selector."""
    steps = f"/{meta.num_inference_steps}" if meta.num_inference_steps else ""
    return f"step {meta.step}{steps} · t={meta.timestep:.3f} · seed {meta.seed} ·"


def image_png_bytes(image: Image | np.ndarray, max_side: int | None = 512) -> bytes:
    """Encode a PIL image or an ``(H, W[, C])`` array (uint8, or float in ``[0, 1]``) as PNG.

    Images larger than ``max_side`` are downscaled (aspect kept) to keep graph folders small.
    """
    from PIL import Image as PILImage

    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        pil = PILImage.fromarray(arr)
    else:
        pil = image
    if pil.mode not in ("RGB", "RGBA", "L"):
        pil = pil.convert("RGB")
    if max_side is not None and max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
        pil = pil.resize(size, PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def as_row_graph(graph: RowGraph | Graph) -> RowGraph:
    """A :class:`RowGraph` on the CPU: ``graph`` itself (moved), or the rows of a circuit-tracer
    ``Graph`` (its feature and target rows; the caller's graph is not modified)."""
    if isinstance(graph, RowGraph):
        if graph.rows.device.type == "cpu":
            return graph
        return RowGraph.from_dict(
            {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in graph.to_dict().items()}
        )
    return RowGraph.from_dense(
        graph.adjacency_matrix.cpu(),
        len(graph.selected_features),
        len(graph.logit_targets),
        active_features=graph.active_features.cpu(),
        selected_features=graph.selected_features.cpu(),
        activation_values=graph.activation_values.cpu(),
        logit_targets=[TargetNode(str(t[0]), int(t[1])) for t in graph.logit_targets],
        logit_probabilities=graph.logit_probabilities.cpu(),
        n_pos=graph.n_pos,
        n_layers=graph.cfg.n_layers,
        input_string=graph.input_string,
        scan=graph.scan if isinstance(graph.scan, str) else None,
    )


def _check_layout(graph: RowGraph, meta: GraphMeta) -> None:
    if graph.n_pos != meta.n_pos:
        raise ValueError(f"graph has {graph.n_pos} positions, GraphMeta describes {meta.n_pos}")
    if graph.n_layers != meta.n_layers:
        raise ValueError(f"graph has {graph.n_layers} layers, GraphMeta {meta.n_layers}")
    n_targets = len(graph.logit_targets)
    if meta.target_labels and len(meta.target_labels) != n_targets:
        raise ValueError(f"{len(meta.target_labels)} target labels for {n_targets} targets")


def _relabel_nodes(
    graph: RowGraph,
    meta: GraphMeta,
    nodes: dict[int, Node],
    target_values: list[float] | None = None,
) -> dict[int, Node]:
    """Rewrite circuit-tracer's LLM-style nodes into difract ids, types and labels.

    Returns a new dict keyed by node index (:func:`_used_nodes_and_edges` builds the
    links from these ids). ``ctx_idx`` still holds the true position here.
    """
    n_features = len(graph.selected_features)
    error_end = n_features + graph.n_pos * graph.n_layers
    token_end = error_end + graph.n_pos
    out: dict[int, Node] = {}
    for idx, node in nodes.items():
        if idx < n_features:
            layer, pos, feat = (int(v) for v in graph.active_features[graph.selected_features[idx]])
            if feat == RESIDUE_FEATURE:
                node = node.model_copy(
                    update={
                        "node_id": f"{layer}_{RESIDUE_FEATURE}_{pos}",
                        "jsNodeId": f"{layer}_{RESIDUE_FEATURE}-{pos}",
                        "feature": RESIDUE_FEATURE,
                        "feature_type": RESIDUE_FEATURE_TYPE,
                        "clerp": f"Residue: unexplored features ({meta.layer_label(layer)}, "
                        f"{meta.position_label(pos)})",
                    }
                )
            else:
                node = node.model_copy(update={"clerp": feature_label(meta, layer, feat)})
        elif idx < error_end:
            layer, pos = divmod(idx - n_features, graph.n_pos)
            node = node.model_copy(
                update={
                    "node_id": f"{layer}_-1_{pos}",
                    "jsNodeId": f"{layer}_-1-{pos}",
                    "clerp": f"Err: {meta.layer_label(layer)}, {meta.position_label(pos)}",
                }
            )
        elif idx < token_end:
            pos = idx - error_end
            node = node.model_copy(update={"clerp": f"Emb: {meta.position_label(pos)}"})
        else:
            k = idx - token_end
            label = meta.target_labels[k] if meta.target_labels else graph.logit_targets[k][0]
            weight = float(graph.logit_probabilities[k])
            value = None if target_values is None else float(target_values[k])
            n_targets = len(graph.logit_targets)
            node = node.model_copy(update={"clerp": target_clerp(label, value, weight, n_targets)})
        out[idx] = node
    return out


def _store_scan(store: DashboardStore | None) -> str | None:
    return None if store is None else store.scan


def _add_difract_fields(
    nodes: list[dict[str, Any]],
    meta: GraphMeta,
    store: DashboardStore | None,
    targets: dict[str, dict[str, Any]],
) -> None:
    """Add ``"difract"`` (feature nodes; ``clerp`` = dashboard label when there is one) and
    ``"difract_target"`` (target nodes) to the node dicts, in place."""
    for node in nodes:
        if node["feature_type"] == FEATURE_TYPE:
            layer, feat, pos = (int(v) for v in node["node_id"].split("_"))
            fields = feature_fields(meta, layer, feat, pos)
            node["difract"] = fields
            label = dashboard_label(store, fields["site"], fields["feature"])
            if label:
                node["clerp"] = label
        elif node["feature_type"] == "logit":
            node["difract_target"] = targets[node["node_id"]]


def _true_position(node: Node) -> int | None:
    return None if node.feature_type == "logit" else node.ctx_idx


def _positions_block(meta: GraphMeta, kept: list[int]) -> list[dict[str, Any]]:
    block = []
    for p in kept:
        kind, a, b = meta.position_kind(p)
        entry: dict[str, Any] = {"pos": p, "kind": kind, "label": meta.position_label(p)}
        if kind == "img":
            entry.update(row=a, col=b)
        else:
            entry.update(token=a, padding=is_padding_label(meta.text_tokens[a]))
        block.append(entry)
    block.append({"pos": None, "kind": "targets", "label": TARGET_COLUMN_LABEL})
    return block


def build_graph_json(
    graph: Graph,
    meta: GraphMeta,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
    image_file: str | None = None,
    dashboards: DashboardStore | None = None,
    target_values: list[float] | None = None,
) -> dict[str, Any]:
    """The graph JSON (``{metadata, qParams, nodes, links}``) as a dict; see module docstring.

    Args:
        graph: a :class:`RowGraph` or a circuit-tracer ``Graph`` in the standard layout (any
            device; not modified).
        meta: what the graph is about (positions, layers, run).
        slug: file stem and id of the graph.
        node_threshold: cumulative influence kept by node pruning (also the UI slider's max).
        edge_threshold: cumulative influence kept by edge pruning.
        scan: transcoder-set name for feature files (``{data}/features/{scan}/{id}.json``);
            defaults to ``meta.model_name``.
        image_file: name of the image file beside the JSON, if any.
        dashboards: the feature dashboards of this graph's dictionaries: feature nodes are
            labelled by ``dashboards.label`` and ``metadata.dashboards`` names their scan.
        target_values: the targets' values at this step (shown in their labels).

    Returns:
        A JSON-serialisable dict that circuit-tracer's ``frontend.graph_models.Model`` parses.
    """
    from circuit_tracer.frontend.graph_models import Metadata, Model, QParams
    from circuit_tracer.utils.create_graph_files import create_nodes

    validate_slug(slug)
    work = as_row_graph(graph)
    _check_layout(work, meta)
    pruned = work.prune(node_threshold, edge_threshold)
    view = SimpleNamespace(  # what create_nodes reads of circuit-tracer's Graph
        selected_features=work.selected_features,
        cfg=SimpleNamespace(n_layers=work.n_layers),
        n_pos=work.n_pos,
        input_tokens=work.input_tokens,
        active_features=work.active_features,
        activation_values=work.activation_values,
        logit_targets=work.logit_targets,
        logit_probabilities=work.logit_probabilities,
    )
    if target_values is not None and len(target_values) != len(work.logit_targets):
        raise ValueError(
            f"{len(target_values)} target values for {len(work.logit_targets)} targets"
        )
    nodes = _relabel_nodes(
        work,
        meta,
        create_nodes(view, pruned.node_mask, None, pruned.cumulative_scores),
        target_values,
    )
    token_end = len(work.selected_features) + work.n_pos * (work.n_layers + 1)
    targets = {
        node.node_id: {
            "label": meta.target_labels[idx - token_end]
            if meta.target_labels
            else str(work.logit_targets[idx - token_end][0]),
            "value": None if target_values is None else float(target_values[idx - token_end]),
            "weight": float(work.logit_probabilities[idx - token_end]),
        }
        for idx, node in nodes.items()
        if idx >= token_end
    }
    used_nodes, used_edges = _used_nodes_and_edges(work, nodes, pruned.edge_mask)

    connected = {e["source"] for e in used_edges} | {e["target"] for e in used_edges}
    dropped = [
        n for n in used_nodes if n.feature_type == "embedding" and n.node_id not in connected
    ]
    used_nodes = [n for n in used_nodes if n.feature_type != "embedding" or n.node_id in connected]
    kept = sorted({p for n in used_nodes if (p := _true_position(n)) is not None})
    column = {p: i for i, p in enumerate(kept)}
    target_column = len(kept)
    used_nodes = [
        n.model_copy(
            update={"ctx_idx": target_column if n.feature_type == "logit" else column[n.ctx_idx]}
        )
        for n in used_nodes
    ]
    logger.info(
        "graph %s: %d nodes, %d links, %d of %d positions shown, %d unconnected inputs dropped",
        slug,
        len(used_nodes),
        len(used_edges),
        len(kept),
        meta.n_pos,
        len(dropped),
    )

    metadata = Metadata(
        slug=slug,
        scan=scan or meta.model_name,
        transcoder_list=[],
        prompt_tokens=[meta.position_label(p) for p in kept] + [TARGET_COLUMN_LABEL],
        prompt=meta.prompt,
        node_threshold=node_threshold,
        schema_version=1,
    )
    qparams = QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    model = Model(metadata=metadata, qParams=qparams, nodes=used_nodes, links=used_edges)
    data = model.model_dump()
    _add_difract_fields(data["nodes"], meta, dashboards, targets)
    data["metadata"].update(
        title_prefix=title_prefix(meta),
        model_name=meta.model_name,
        step=meta.step,
        num_inference_steps=meta.num_inference_steps,
        timestep=meta.timestep,
        seed=meta.seed,
        grid=list(meta.grid),
        n_txt=meta.n_txt,
        n_double=meta.n_double,
        n_layers=meta.n_layers,
        height=meta.height,
        width=meta.width,
        target_labels=list(meta.target_labels),
        live=list(meta.live),  # freezes lifted from the edges: [] for an affine graph
        edge_threshold=edge_threshold,
        image=image_file,
        positions=_positions_block(meta, kept),
        dashboards=_store_scan(dashboards),
        extra=meta.extra,
    )
    return data


def _used_nodes_and_edges(
    graph: RowGraph, nodes: dict[int, Node], edge_mask: torch.Tensor
) -> tuple[list[Node], list[dict[str, Any]]]:
    """circuit-tracer's ``create_used_nodes_and_edges`` on the rows: links of kept edges between
    created nodes (in its order: by target, then source); nodes with a link, every input and
    every target."""
    r, srcs = torch.nonzero(edge_mask, as_tuple=True)
    dsts = graph.row_nodes[r]
    weights = graph.rows[r, srcs].tolist()
    used_edges = [
        {"source": nodes[src].node_id, "target": nodes[dst].node_id, "weight": weight}
        for src, dst, weight in zip(srcs.tolist(), dsts.tolist(), weights, strict=True)
        if src in nodes and dst in nodes
    ]
    connected = {e["source"] for e in used_edges} | {e["target"] for e in used_edges}
    used_nodes = [
        n
        for n in nodes.values()
        if n.node_id in connected or n.feature_type in ("embedding", "logit")
    ]
    return used_nodes, used_edges


def write_graph_files(
    graph: RowGraph | Graph,
    meta: GraphMeta,
    out_dir: str | Path,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    image: Image | np.ndarray | None = None,
    scan: str | None = None,
    image_max_side: int | None = 512,
    feature_files: bool = True,
    dashboards: DashboardStore | str | Path | None | bool = True,
    target_values: list[float] | None = None,
) -> Path:
    """Prune ``graph`` and write ``{out_dir}/{slug}.json`` (+ ``{slug}.png``) for the frontend.

    Also upserts the graph's entry in ``{out_dir}/graph-metadata.json``. Every file is written
    atomically; serve the folder with :func:`difract_ext.graphs.server.serve`.

    Args:
        graph: a :class:`RowGraph` (or a circuit-tracer graph in the standard layout, see
            :mod:`difract_ext.attribution.graph_meta`).
        meta: positions, layers and the run the graph belongs to.
        out_dir: the data folder (created if missing).
        slug: file stem / id (letters, digits, ``._-``).
        node_threshold: node pruning threshold (circuit-tracer's default 0.8).
        edge_threshold: edge pruning threshold (circuit-tracer's default 0.98).
        image: the generated image (PIL image or ``(H, W, C)`` array), shown by the frontend.
        scan: transcoder-set name used to look up feature files; defaults to the model name.
        image_max_side: downscale the stored PNG to at most this many pixels per side.
        feature_files: also write ``features/{scan}/{id}.json`` for every feature node, with this
            step's activations over all positions (what the frontend shows on a click; see
            :mod:`difract_ext.graphs.features`). A later graph with the same scan replaces them.
        dashboards: a ``DashboardStore`` or its folder; ``True`` (default) finds them
            (:func:`~difract_ext.graphs.dashlinks.find_dashboards`: ``out_dir/dashboards/{scan}``
            or shipped ones of that scan or model); ``False``/``None``: no dashboards.
        target_values: the targets' values at this step, shown in their labels.

    Returns:
        The path of the graph JSON.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_slug(slug)
    image_file = None
    if image is not None:
        image_file = f"{slug}.png"
        atomic_write_bytes(out / image_file, image_png_bytes(image, image_max_side))
    work = as_row_graph(graph)
    if dashboards is True:
        found = find_dashboards(out, scan or meta.model_name, meta.model_name)
        dashboards = found
    store = open_dashboards(dashboards or None)
    data = build_graph_json(
        work,
        meta,
        slug,
        node_threshold,
        edge_threshold,
        scan,
        image_file,
        dashboards=store,
        target_values=target_values,
    )
    path = out / f"{slug}.json"
    atomic_write_bytes(path, json.dumps(data, separators=(",", ":")).encode())
    upsert_graph_metadata(out, graph_metadata_entry(data["metadata"]))
    if feature_files:
        write_step_feature_files(work, meta, data["nodes"], out, data["metadata"]["scan"])
    logger.info("graph files written: %s", path)
    return path


def graph_metadata_entry(metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``graph-metadata.json`` entry of a graph: its metadata without ``positions``/``extra``.

    It still parses as circuit-tracer's ``frontend.graph_models.Metadata``.
    """
    return {k: v for k, v in metadata.items() if k not in ("positions", "extra")}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a lock file beside the guarded one)."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_graph_metadata(out_dir: str | Path) -> dict[str, Any]:
    """The parsed ``graph-metadata.json`` of ``out_dir`` (``{"graphs": []}`` when missing)."""
    path = Path(out_dir) / GRAPH_METADATA_FILE
    if not path.exists():
        return {"graphs": []}
    data = json.loads(path.read_text())
    graphs = data.get("graphs") if isinstance(data, dict) else None
    if not isinstance(graphs, list):
        raise ValueError(f"{path} is not a graph index ({{'graphs': [...]}})")  # noqa: TRY004
    return data


def upsert_graph_metadata(out_dir: str | Path, entry: dict[str, Any]) -> Path:
    """Insert or replace (by ``slug``) one graph's entry in ``graph-metadata.json``.

    Like circuit-tracer's ``frontend.utils.add_graph_metadata`` (same file format), but
    concurrent writers are serialised by a lock file and the file is replaced atomically, so a
    crash never leaves a truncated index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = validate_slug(str(entry["slug"]))
    path = out / GRAPH_METADATA_FILE
    with _locked(out / f".{GRAPH_METADATA_FILE}.lock"):
        index = read_graph_metadata(out)
        index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [entry]
        atomic_write_json(path, index)
    return path


def apply_dashboards(path: str | Path, dashboards: DashboardStore | str | Path) -> int:
    """Label the feature nodes of an existing graph file from dashboards built after it.

    Sets each feature node's ``clerp`` to ``dashboards.label`` (or back to ``"img_1 #123"``
    without one) and ``metadata.dashboards`` to their scan, in ``{slug}.json`` and in
    ``graph-metadata.json`` (both replaced atomically).

    Returns:
        The number of feature nodes that got a label.
    """
    path = Path(path)
    store = open_dashboards(dashboards)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "nodes" not in data or "metadata" not in data:
        raise ValueError(f"{path} is not a graph file (no 'nodes' and 'metadata')")
    n = 0
    for node in data["nodes"]:
        fields = node.get("difract")
        if node.get("feature_type") != FEATURE_TYPE or not fields:
            continue
        label = dashboard_label(store, fields["site"], fields["feature"])
        node["clerp"] = label or f"{fields['site']} #{fields['feature']}"
        n += label is not None
    data["metadata"]["dashboards"] = _store_scan(store)
    atomic_write_bytes(path, json.dumps(data, separators=(",", ":")).encode())
    upsert_graph_metadata(path.parent, graph_metadata_entry(data["metadata"]))
    return n
