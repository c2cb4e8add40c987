"""Attribution graphs of one FLUX denoising step, and circuit-tracer's view of them: the bridge.

:func:`attribute_step` builds a :class:`~difract_ext.attribution.row_graph.RowGraph` with the
core's driver (:func:`~difract_ext.attribution.build.build_graph`: circuit-tracer's ranking,
rows kept compact, no square matrix), or, with ``method="circuit-tracer"``, with circuit-tracer's
own ``attribute()`` (dense ``[M, M]``: small graphs only, kept as the reference the driver is
tested against).

:class:`FluxReplacementModel` satisfies the duck-typed model protocol of circuit-tracer 0.5's
``_run_attribution`` (``ensure_tokenized``, ``setup_attribution``, ``run_forward_pass``,
``tokenizer``, ``model_config``, ``unembed_proj``, ``scan``) over the core's
:class:`~difract_ext.attribution.step.AttributionStep`; the rows come from
:class:`~difract_ext.attribution.edges.StepEdges` and the residue nodes from
:func:`~difract_ext.attribution.residue.add_residue`. :func:`circuit_tracer_graph` turns a
(small) ``RowGraph`` into circuit-tracer's ``Graph`` for its ``prune_graph``,
``compute_graph_scores`` or ``.pt`` files.

What is translated:

- rows are addressed by integer index: circuit-tracer hands ``compute_batch`` the rows of
  ``ctx.encoder_vecs`` of the features it expands and the ``vec`` of each custom target; here
  both are the row's index (a ``[N, 1]`` / ``[1]`` long tensor), and the core looks the vectors up
  (a float index column would collapse in bf16);
- targets are :class:`~difract_ext.replacement.targets.TargetSpec` (vectors at any positions and
  layers), not logits; the model's "vocabulary" is one pseudo token per joint position.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.attribution.context_transformerlens import AttributionContext
from circuit_tracer.attribution.targets import CustomTarget, LogitTarget
from circuit_tracer.graph import Graph
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

from difract_ext.attribution.build import build_graph
from difract_ext.attribution.edges import Hook, StepEdges
from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.attribution.ranking import RANK_BYTES
from difract_ext.attribution.residue import add_residue
from difract_ext.attribution.row_graph import RowGraph, TargetNode
from difract_ext.attribution.step import AttributionStep
from difract_ext.replacement.components import StepComponents
from difract_ext.replacement.frozen import frozen_parameters
from difract_ext.replacement.inputs import FluxStepInput
from difract_ext.replacement.targets import TargetSpec


class PositionTokenizer:
    """What circuit-tracer asks of a tokenizer: one pseudo token per joint position."""

    def __init__(self, meta: GraphMeta) -> None:
        self.meta = meta
        self.vocab_size = meta.n_pos

    def decode(self, ids: Any) -> str:
        return self.meta.prompt


class FluxAttributionContext(AttributionContext):
    """circuit-tracer's TransformerLens context, delegating every row to :class:`StepEdges`."""

    edges: StepEdges

    def _caching_hooks(self, feature_input_hook: str) -> list[Hook]:
        return self.edges.forward_hooks(feature_input_hook)

    def _make_attribution_hooks(self, feature_output_hook: str) -> list[Hook]:
        return self.edges.backward_hooks(feature_output_hook)

    def compute_batch(
        self,
        layers: torch.Tensor,
        positions: torch.Tensor,
        inject_values: torch.Tensor,
        retain_graph: bool = True,
    ) -> torch.Tensor:
        """Rows ``[n, row_size]``; ``inject_values [n, 1]`` are row indices (see the module).

        circuit-tracer asks for target rows at the unembedding (``layers == n_layers``), for
        feature rows at the features' layers.
        """
        targets = bool((layers == self.n_layers).all())
        return self.edges.rows(inject_values[:, 0], targets=targets, retain_graph=retain_graph)


@dataclass
class FluxAttribution:
    """Result of :func:`attribute_step`: the graph (rows of its expanded nodes) and what it is
    about."""

    graph: RowGraph
    meta: GraphMeta
    targets: list[TargetSpec]
    components: StepComponents
    target_values: torch.Tensor  # [K] value of each target on the real step
    n_residue: int
    model: FluxReplacementModel

    def circuit_tracer_graph(self) -> Graph:
        """circuit-tracer's dense ``Graph`` of this (small) graph (:func:`circuit_tracer_graph`)."""
        return circuit_tracer_graph(self.graph, self.model.model_config)


class FluxReplacementModel(AttributionStep):
    """The duck-typed model circuit-tracer's ``attribute()`` runs on (one step, one prompt).

    Args: as :class:`~difract_ext.attribution.step.AttributionStep`, plus ``scan`` (circuit-tracer's
    transcoder-set name, kept on the graph).
    """

    feature_input_hook = "mlp.hook_in"
    feature_output_hook = "mlp.hook_out"

    def __init__(
        self,
        transformer: torch.nn.Module,
        step: FluxStepInput,
        dictionaries: Mapping[Any, Any],
        scan: str | None = None,
        model_name: str = "flux",
        host_vectors: bool | None = None,
        live: Collection[str] = (),
    ) -> None:
        super().__init__(
            transformer,
            step,
            dictionaries,
            model_name=model_name,
            host_vectors=host_vectors,
            live=live,
        )
        self.scan = scan
        self.backward_batch: int | None = (
            None  # rows per backward pass (None: circuit-tracer's batch)
        )
        self.edges_in_use: StepEdges | None = None  # set by setup_attribution
        self.tokenizer = PositionTokenizer(self.meta)
        tf_cfg = transformer.config
        self.model_config = UnifiedConfig(
            n_layers=self.frozen.n_layers,
            d_model=self.frozen.d_model,
            d_head=int(tf_cfg.attention_head_dim),
            n_heads=int(tf_cfg.num_attention_heads),
            d_mlp=4 * self.frozen.d_model,
            d_vocab=self.meta.n_pos,
            tokenizer_name="difract-ext/positions",
            model_name=model_name,
            original_architecture="FluxTransformer2DModel",
        )
        self.unembed_proj = torch.zeros(self.frozen.d_model, 1)

    # ---- circuit-tracer protocol ------------------------------------------------------------
    def ensure_tokenized(self, prompt: Any) -> torch.Tensor:
        """One pseudo token per joint position (``0 .. P-1``)."""
        return torch.arange(self.meta.n_pos)

    def hooks(self, fwd_hooks: Sequence[Any] = (), bwd_hooks: Sequence[Any] = ()) -> Any:
        return self.frozen.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks))

    def setup_attribution(self, input_ids: torch.Tensor) -> FluxAttributionContext:
        c = self.components
        ctx = FluxAttributionContext(
            activation_matrix=c.activation_matrix,
            error_vectors=c.error_vectors,
            token_vectors=self.clean["embed"],
            decoder_vecs=c.decoder_vecs,
            encoder_vecs=torch.arange(c.n_active)[
                :, None
            ],  # row indices, handed back to compute_batch
            encoder_to_decoder_map=torch.arange(c.n_active),
            decoder_locations=c.decoder_locations,
            logits=torch.zeros(1, 1, self.meta.n_pos),
        )
        ctx.edges = self.edges_in_use = self.edges()
        return ctx

    def run_forward_pass(
        self, input_ids: torch.Tensor, batch_size: int, ctx: FluxAttributionContext
    ) -> None:
        """Build the affine graph at ``min(batch_size, backward_batch)`` copies (rows per pass)."""
        release = not any(p.requires_grad for p in self.frozen.flux.parameters())
        with ctx.install_hooks(self):
            if release:
                ctx.edges.release_forward_values(during_forward=True)
            self.frozen.linear_forward(batch=min(batch_size, self.backward_batch or batch_size))
        if release:
            ctx.edges.release_forward_values()


def attribute_step(
    transformer: torch.nn.Module,
    step: FluxStepInput,
    dictionaries: Mapping[Any, Any],
    targets: Sequence[TargetSpec] | Callable[[FluxReplacementModel], Sequence[TargetSpec]],
    *,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    backward_batch: int | None = None,
    rank_entries: int | None = None,
    rank_bytes: int = RANK_BYTES,
    offload: bool | None = None,
    host_vectors: bool | None = None,
    method: str = "rows",
    scan: str | None = None,
    model_name: str = "flux",
    verbose: bool = False,
    live: Collection[str] = (),
) -> FluxAttribution:
    """Attribution graph of one denoising step.

    Args:
        transformer: the pipeline's ``FluxTransformer2DModel``.
        step: the captured step (:func:`~difract_ext.replacement.inputs.capture_step_input`).
        dictionaries: ``{site: transcoder}`` keyed ``Site(layer, stream)`` (or ``"img_3"`` /
            ``(3, "img")``); MLPs without one are error-only.
        targets: :class:`TargetSpec` list, or a callable ``(FluxReplacementModel) -> list`` (targets
            often need the model's frozen step, e.g. :func:`output_target`).
        max_feature_nodes: expand at most this many features (None: all); the others' effects
            become residue nodes.
        batch_size: rows per ranking batch (circuit-tracer's batch: its influence ranking is
            refreshed every 4 batches); None picks 128 on CPU and 256 on GPUs.
        backward_batch: rows per backward pass (the forward graph is built at this many copies);
            a larger batch is sorted by layer and cut into backward passes of this size. None
            picks 32 on CPU (cache-bound: smaller is faster there) and ``batch_size`` on GPUs.
        rank_entries, rank_bytes: how the selection pass keeps its rows
            (:func:`~difract_ext.attribution.ranking.plan_ranking`); ``method="rows"`` only.
        offload: move the modules the affine path does not use (MLPs, q/k and AdaLN linears)
            to the CPU while the graph is built (``FrozenFlux.offload_unused``); None: on GPUs.
        host_vectors: keep the active features' encoder and decoder vectors in host memory
            (``AttributionStep``); None: on GPUs.
        method: ``"rows"`` (the core's driver, memory linear in positions × layers) or
            ``"circuit-tracer"`` (its ``attribute()`` and a dense square matrix: small graphs).
        live: freezes lifted from the edges: ``()`` (circuit-tracer's affine graph: edges sum
            to node values), ``("layernorm",)`` or ``("layernorm", "attention")``: edges are
            the step's first-order derivatives through LayerNorm denominators (and attention
            patterns), so total effects predict small perturbations of the real model better
            (BENCHMARKS.md, faithfulness) while rows no longer sum to node values.

    Raises:
        SiteError: a dictionary key that is not a site (e.g. a ``(stream, layer)`` tuple).
        ValueError: no target, a batch size below 1, or an unknown method.
    """
    if method not in ("rows", "circuit-tracer"):
        raise ValueError(f"method must be 'rows' or 'circuit-tracer', got {method!r}")
    cuda = next(transformer.parameters()).is_cuda
    if batch_size is None:
        batch_size = 256 if cuda else 128
    if backward_batch is None:
        backward_batch = batch_size if cuda else 32
    if batch_size < 1 or backward_batch < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and backward_batch ({backward_batch}) must be >= 1"
        )
    if max_feature_nodes is not None and (
        isinstance(max_feature_nodes, bool)
        or not isinstance(max_feature_nodes, int)
        or max_feature_nodes < 1
    ):
        raise ValueError(
            f"max_feature_nodes must be an integer >= 1, or None for every active feature; "
            f"got {max_feature_nodes!r}"
        )
    model = FluxReplacementModel(
        transformer,
        step,
        dictionaries,
        scan=scan,
        model_name=model_name,
        host_vectors=host_vectors,
        live=live,
    )
    model.backward_batch = backward_batch
    specs = model.set_targets(targets)
    if offload is None:
        offload = cuda
    moved = model.frozen.offload_unused("cpu") if offload else contextlib.nullcontext()
    with torch.enable_grad(), frozen_parameters(transformer), _no_scan_warning(scan), moved:
        if method == "rows":
            graph = build_graph(
                model,
                max_feature_nodes=max_feature_nodes,
                batch_size=batch_size,
                backward_batch=backward_batch,
                rank_entries=rank_entries,
                rank_bytes=rank_bytes,
                scan=scan,
            )
            n_res = int(graph.info["n_residue"])
        else:
            graph, n_res = _circuit_tracer_attribution(
                model, specs, batch_size, max_feature_nodes, verbose
            )
    return FluxAttribution(
        graph=graph,
        meta=model.meta,
        targets=specs,
        components=model.components,
        target_values=model.target_values(),
        n_residue=n_res,
        model=model,
    )


def _circuit_tracer_attribution(
    model: FluxReplacementModel,
    specs: Sequence[TargetSpec],
    batch_size: int,
    max_feature_nodes: int | None,
    verbose: bool,
) -> tuple[RowGraph, int]:
    """circuit-tracer's ``attribute()`` and the core's dense :func:`add_residue`, as rows."""
    weights = torch.tensor([t.weight for t in specs], dtype=torch.float32)
    custom = [  # vec: the target's row index (see the module docstring)
        CustomTarget(token_str=t.label, prob=float(w), vec=torch.tensor([i]))
        for i, (t, w) in enumerate(zip(specs, weights / weights.sum(), strict=True))
    ]
    graph = attribute(
        None,
        model,
        attribution_targets=custom,
        batch_size=batch_size,
        max_feature_nodes=max_feature_nodes,
        verbose=verbose,
    )
    assert model.edges_in_use is not None
    res = add_residue(
        graph.adjacency_matrix,
        graph.active_features,
        graph.selected_features,
        graph.activation_values,
        len(graph.logit_targets),
        model.edges_in_use.totals,
        model.meta.n_pos,
    )
    n_feat = len(res.selected)
    m = res.adjacency.shape[0]
    rows = RowGraph(
        rows=res.adjacency[
            torch.cat([torch.arange(n_feat - res.n_residue), torch.arange(m - len(specs), m)])
        ].float(),
        row_nodes=torch.cat(
            [torch.arange(n_feat - res.n_residue), torch.arange(m - len(specs), m)]
        ),
        active_features=res.active_features,
        selected_features=res.selected,
        activation_values=res.activation_values,
        logit_targets=[TargetNode(t.token_str, int(t.vocab_idx)) for t in graph.logit_targets],
        logit_probabilities=graph.logit_probabilities,
        n_pos=model.meta.n_pos,
        n_layers=model.meta.n_layers,
        input_string=graph.input_string,
        scan=graph.scan,
        info={"method": "circuit-tracer", "n_residue": res.n_residue},
    )
    return rows, res.n_residue


def circuit_tracer_graph(graph: RowGraph, cfg: UnifiedConfig | None = None) -> Graph:
    """circuit-tracer's ``Graph`` of a (small) row graph: the dense square adjacency.

    ``cfg`` defaults to a minimal config with the graph's layers and positions.

    Raises:
        MemoryError: the square matrix would be too large (see ``RowGraph.dense_adjacency``).
    """
    cfg = cfg or UnifiedConfig(
        n_layers=graph.n_layers,
        d_model=1,
        d_head=1,
        n_heads=1,
        d_mlp=1,
        d_vocab=graph.n_pos,
        tokenizer_name="difract-ext/positions",
        model_name="flux",
        original_architecture="FluxTransformer2DModel",
    )
    with _no_scan_warning(graph.scan):
        return Graph(
            input_string=graph.input_string,
            input_tokens=graph.input_tokens,
            active_features=graph.active_features,
            adjacency_matrix=graph.dense_adjacency(),
            cfg=cfg,
            selected_features=graph.selected_features,
            activation_values=graph.activation_values,
            logit_targets=[LogitTarget(t.token_str, t.vocab_idx) for t in graph.logit_targets],
            logit_probabilities=graph.logit_probabilities,
            scan=graph.scan,
            vocab_size=graph.n_pos,
        )


class _DropScanWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "without scan" not in record.getMessage()


@contextmanager
def _no_scan_warning(scan: str | None) -> Iterator[None]:
    """Silence circuit-tracer's "Graph loaded without scan" (it is about Neuronpedia uploads,
    which graphs of FLUX steps do not use) while our graphs are built."""
    if scan is not None:
        yield
        return
    graph_logger = logging.getLogger("circuit_tracer.graph")
    flt = _DropScanWarning()
    graph_logger.addFilter(flt)
    try:
        yield
    finally:
        graph_logger.removeFilter(flt)
