"""circuit-tracer's ``attribute()`` on one FLUX denoising step: the bridge, no science.

:class:`FluxReplacementModel` satisfies the duck-typed model protocol of circuit-tracer 0.5's
``_run_attribution`` (``ensure_tokenized``, ``setup_attribution``, ``run_forward_pass``,
``tokenizer``, ``model_config``, ``unembed_proj``, ``scan``) over the core's
:class:`~difract_ext.attribution.step.AttributionStep`. circuit-tracer's own ``attribute``,
``Graph``, ``prune_graph`` and ``compute_graph_scores`` drive the run; the rows come from
:class:`~difract_ext.attribution.edges.StepEdges` (batched edge kernels, layer-sorted backward
passes, row totals) and the residue nodes from :func:`~difract_ext.attribution.residue.add_residue`.

What is translated:

- rows are addressed by integer index: circuit-tracer hands ``compute_batch`` the rows of
  ``ctx.encoder_vecs`` of the features it expands and the ``vec`` of each custom target; here
  both are the row's index (a ``[N, 1]`` / ``[1]`` long tensor), and the core looks the vectors up
  (a float index column would collapse in bf16);
- targets are :class:`~difract_ext.replacement.targets.TargetSpec` (vectors at any positions and
  layers), not logits; the model's "vocabulary" is one pseudo token per joint position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.attribution.context_transformerlens import AttributionContext
from circuit_tracer.attribution.targets import CustomTarget
from circuit_tracer.graph import Graph
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

from difract_ext.attribution.edges import Hook, StepEdges
from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.attribution.residue import add_residue
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
    """Result of :func:`attribute_step`: circuit-tracer's graph plus what it is about."""

    graph: Graph
    meta: GraphMeta
    targets: list[TargetSpec]
    components: StepComponents
    target_values: torch.Tensor  # [K] value of each target on the real step
    n_residue: int
    model: FluxReplacementModel


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
    ) -> None:
        super().__init__(transformer, step, dictionaries, model_name=model_name)
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
        with ctx.install_hooks(self):
            self.frozen.linear_forward(batch=min(batch_size, self.backward_batch or batch_size))


def attribute_step(
    transformer: torch.nn.Module,
    step: FluxStepInput,
    dictionaries: Mapping[Any, Any],
    targets: Sequence[TargetSpec] | Callable[[FluxReplacementModel], Sequence[TargetSpec]],
    *,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    backward_batch: int | None = None,
    scan: str | None = None,
    model_name: str = "flux",
    verbose: bool = False,
) -> FluxAttribution:
    """Attribution graph of one denoising step through circuit-tracer's ``attribute()``.

    Args:
        transformer: the pipeline's ``FluxTransformer2DModel``.
        step: the captured step (:func:`~difract_ext.replacement.inputs.capture_step_input`).
        dictionaries: ``{site: transcoder}`` keyed ``Site(layer, stream)`` (or ``"img_3"`` /
            ``(3, "img")``); MLPs without one are error-only.
        targets: :class:`TargetSpec` list, or a callable ``(FluxReplacementModel) -> list`` (targets
            often need the model's frozen step, e.g. :func:`output_target`).
        max_feature_nodes: expand at most this many features (None: all); the others' effects
            become residue nodes.
        batch_size: circuit-tracer's batch (rows per ``compute_batch`` call; its influence
            ranking is refreshed every 4 batches); None picks 128 on CPU and 256 on GPUs.
        backward_batch: rows per backward pass (the forward graph is built at this many copies);
            a larger circuit-tracer batch is sorted by layer and cut into backward batches of
            this size. None picks 32 on CPU (cache-bound: smaller is faster there) and
            ``batch_size`` on GPUs.

    Raises:
        SiteError: a dictionary key that is not a site (e.g. a ``(stream, layer)`` tuple).
        ValueError: no target, or a batch size below 1.
    """
    cuda = next(transformer.parameters()).is_cuda
    if batch_size is None:
        batch_size = 256 if cuda else 128
    if backward_batch is None:
        backward_batch = batch_size if cuda else 32
    if batch_size < 1 or backward_batch < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and backward_batch ({backward_batch}) must be >= 1"
        )
    model = FluxReplacementModel(transformer, step, dictionaries, scan=scan, model_name=model_name)
    model.backward_batch = backward_batch
    specs = model.set_targets(targets)
    weights = torch.tensor([t.weight for t in specs], dtype=torch.float32)
    custom = [  # vec: the target's row index (see the module docstring)
        CustomTarget(token_str=t.label, prob=float(w), vec=torch.tensor([i]))
        for i, (t, w) in enumerate(zip(specs, weights / weights.sum(), strict=True))
    ]
    with torch.enable_grad(), frozen_parameters(transformer), _no_scan_warning(scan):
        graph = attribute(
            None,
            model,
            attribution_targets=custom,
            batch_size=batch_size,
            max_feature_nodes=max_feature_nodes,
            verbose=verbose,
        )
        graph, n_res = _with_residue(graph, model)
    return FluxAttribution(
        graph=graph,
        meta=model.meta,
        targets=specs,
        components=model.components,
        target_values=model.target_values(),
        n_residue=n_res,
        model=model,
    )


def _with_residue(graph: Graph, model: FluxReplacementModel) -> tuple[Graph, int]:
    """``graph`` with residue nodes for unexpanded features (the core's :func:`add_residue`)."""
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
    if res.n_residue == 0:
        return graph, 0
    out = Graph(
        input_string=graph.input_string,
        input_tokens=graph.input_tokens,
        active_features=res.active_features,
        adjacency_matrix=res.adjacency,
        cfg=graph.cfg,
        selected_features=res.selected,
        activation_values=res.activation_values,
        logit_targets=graph.logit_targets,
        logit_probabilities=graph.logit_probabilities,
        scan=graph.scan,
        vocab_size=graph.vocab_size,
    )
    return out, res.n_residue


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
