"""circuit-tracer's ``attribute()`` on one FLUX denoising step.

:class:`FluxReplacementModel` satisfies the duck-typed model protocol of circuit-tracer 0.5's
``_run_attribution`` (``ensure_tokenized``, ``setup_attribution``, ``run_forward_pass``,
``tokenizer``, ``model_config``, ``unembed_proj``, ``scan``) over
:class:`~difract_ext.replacement.frozen.FrozenFlux`. circuit-tracer's own ``attribute``,
``Graph``, ``prune_graph`` and ``compute_graph_scores`` do the work; we subclass only its
TransformerLens ``AttributionContext``, for what it hard-codes for language models:

- targets: circuit-tracer injects target vectors at the last position only. Our custom targets
  carry just their index (``CustomTarget.vec = [i]``); the context looks up the
  :class:`~difract_ext.replacement.targets.TargetSpec` and injects its vectors at any positions
  and layers;
- unexplored-feature residue: ``attribute(max_feature_nodes=...)`` drops the columns of features
  it does not expand. The context records, for every row, the summed direct effect of *all* active
  features at each (layer, position), so that residue nodes keep conservation exact (they are
  added to the graph as pseudo-features with id ``RESIDUE_FEATURE``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.attribution.context_transformerlens import AttributionContext
from circuit_tracer.attribution.targets import CustomTarget
from circuit_tracer.graph import Graph
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

from difract_ext.flux.sites import Site
from difract_ext.attribution.graph_meta import RESIDUE_FEATURE, GraphMeta
from difract_ext.replacement.components import StepComponents, step_components
from difract_ext.replacement.frozen import FrozenFlux, frozen_parameters
from difract_ext.replacement.inputs import FluxStepInput
from difract_ext.replacement.targets import TargetSpec

logger = logging.getLogger(__name__)


class PositionTokenizer:
    """What circuit-tracer asks of a tokenizer: one pseudo token per joint position."""

    def __init__(self, meta: GraphMeta) -> None:
        self.meta = meta
        self.vocab_size = meta.n_pos

    def decode(self, ids: Any) -> str:
        return self.meta.prompt


class FluxAttributionContext(AttributionContext):
    """circuit-tracer's TransformerLens context with FLUX targets and residue bookkeeping."""

    targets: list[TargetSpec]
    feature_totals: torch.Tensor  # [L, P, d]: Σ a W_dec over all active features at (l, p)

    def _make_attribution_hooks(self, feature_output_hook: str) -> list[tuple[str, Any]]:
        """Feature, error and input hooks writing the same rows as circuit-tracer's, plus the
        residue totals.

        Feature edges are contracted per position with one batched matmul over zero-padded
        decoder blocks ``[U, n_max, d]`` instead of gathering ``[B, nnz, d]`` gradients; error
        edges and residue totals share one batched matmul per layer.
        """
        n_pos = self.activation_matrix.shape[1]
        hooks: list[tuple[str, Any]] = []
        layers, positions = self.decoder_locations
        for layer in range(self.n_layers):
            mask = layers == layer
            if bool(mask.any()):
                hooks.append((f"blocks.{layer}.{feature_output_hook}",
                              self._feature_hook(positions[mask], self.decoder_vecs[mask],
                                                 torch.nonzero(mask, as_tuple=True)[0])))
        offset = self.activation_matrix._nnz()
        for layer in range(self.n_layers):
            # error node and residue total of every position in one [P, B, d] x [P, d, 2] product
            vecs = torch.stack([self.error_vectors[layer], self.feature_totals[layer]], dim=-1)
            hooks.append((f"blocks.{layer}.{feature_output_hook}",
                          self._position_hook(vecs, offset + layer * n_pos, layer)))
        hooks.append(("hook_embed", self._position_hook(self.token_vectors[..., None], offset + self.n_layers * n_pos)))
        return hooks

    def _position_hook(self, vecs: torch.Tensor, start: int, totals_layer: int | None = None) -> Any:
        """Backward hook contracting ``grad [B, P, d]`` with per-position vectors ``vecs [P, d, k]``:
        column 0 fills rows ``start .. start + P`` (error or input nodes), column 1 (if any) the
        residue totals of ``totals_layer``."""
        n_pos = vecs.shape[0]
        proxy = weakref.proxy(self)

        def hook(grads: torch.Tensor, hook: Any) -> None:
            out = torch.bmm(grads.to(vecs.dtype).transpose(0, 1), vecs)  # [P, B, k]
            proxy._batch_buffer[start : start + n_pos] += out[..., 0]
            if totals_layer is not None:
                proxy._totals_buffer[:, totals_layer] += out[..., 1].T

        return hook

    def _feature_hook(self, positions: torch.Tensor, vecs: torch.Tensor, rows: torch.Tensor) -> Any:
        """Backward hook writing ``grad[pos_f] · vecs[f]`` of one layer's features into their rows.

        The layer's features are laid out per position in zero-padded blocks ``[U, n_max, d]``
        (``U`` distinct positions); one ``bmm`` with the gradients ``[U, d, B]`` gives
        ``[U, n_max, B]``, from which the real entries are read in row order.
        """
        uniq, slot_of = torch.unique(positions, return_inverse=True)
        counts = torch.bincount(slot_of, minlength=len(uniq))
        order = torch.argsort(slot_of, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(slot_of)
        rank[order] = torch.arange(len(slot_of)) - starts[slot_of[order]]
        n_max = int(counts.max())
        padded = torch.zeros(len(uniq), n_max, vecs.shape[1], dtype=vecs.dtype)
        padded[slot_of, rank] = vecs
        flat = slot_of * n_max + rank  # [n] entry of each row in the flattened [U * n_max, B] product
        every_position = bool(torch.equal(uniq, torch.arange(len(uniq))))
        first, n = int(rows[0]), len(rows)
        contiguous = bool(torch.equal(rows, torch.arange(first, first + n)))
        proxy = weakref.proxy(self)

        def hook(grads: torch.Tensor, hook: Any) -> None:
            g = grads.to(vecs.dtype)
            g = (g[:, : len(uniq)] if every_position else g[:, uniq]).permute(1, 2, 0)  # [U, d, B]
            vals = torch.bmm(padded, g).view(-1, grads.shape[0]).index_select(0, flat)  # [n, B]
            if contiguous:
                proxy._batch_buffer[first : first + n] += vals
            else:
                proxy._batch_buffer.index_add_(0, rows, vals)

        return hook

    def compute_batch(
        self,
        layers: torch.Tensor,
        positions: torch.Tensor,
        inject_values: torch.Tensor,
        retain_graph: bool = True,
    ) -> torch.Tensor:
        """Rows ``[n, row_size]`` for a batch of targets (index-coded) or features (encoder rows +
        index column).

        A batch larger than the forward graph's batch is sorted by layer and cut into chunks of
        that size, so each backward pass starts at its own chunk's deepest layer (a row's backward
        never needs the layers above its feature).
        """
        chunk = self._resid_activations[0].shape[0]  # type: ignore[union-attr]
        n = len(layers)
        if n <= chunk:
            return self._compute_chunk(layers, positions, inject_values, retain_graph)
        order = torch.argsort(layers, stable=True)
        rows = torch.empty(n, self._row_size, dtype=self.encoder_vecs.dtype)
        for start in range(0, n, chunk):
            sel = order[start : start + chunk]
            last = start + chunk >= n
            rows.index_copy_(0, sel, self._compute_chunk(layers[sel], positions[sel], inject_values[sel],
                                                         retain_graph if last else True))
        return rows

    def _compute_chunk(
        self, layers: torch.Tensor, positions: torch.Tensor, inject_values: torch.Tensor, retain_graph: bool
    ) -> torch.Tensor:
        n = len(layers)
        is_target = inject_values.shape[1] == 1
        index = inject_values[:, -1].round().long()
        injections: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        if is_target:
            for b, i in enumerate(index.tolist()):
                for layer, pos, vecs in self.targets[i].injections:
                    injections.setdefault(layer, []).append((b, pos, vecs))
        else:
            vecs = inject_values[:, :-1]
            for b in range(n):
                injections.setdefault(int(layers[b]), []).append((b, positions[b : b + 1], vecs[b : b + 1]))
        batch_size = self._resid_activations[0].shape[0]
        dtype = self.encoder_vecs.dtype
        # reused across chunks (a fresh allocation per chunk costs page faults); the rows this
        # returns are a view, copied out by the caller before the next chunk
        if getattr(self, "_buffers", None) is None or self._buffers[0].shape[1] != batch_size:
            self._buffers = (torch.empty(self._row_size, batch_size, dtype=dtype),
                             torch.empty(batch_size, self.n_layers, self.feature_totals.shape[1], dtype=dtype))
        self._batch_buffer, self._totals_buffer = self._buffers[0].zero_(), self._buffers[1].zero_()

        def inject(grads: torch.Tensor, *, items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
            # every (row, position, vector) of this layer in one accumulating index_put
            rows_b = torch.cat([torch.full((len(pos),), b, dtype=torch.long) for b, pos, _ in items])
            pos_b = torch.cat([pos.reshape(-1).long() for _, pos, _ in items])
            vals = torch.cat([v.reshape(-1, grads.shape[-1]) for _, _, v in items]).to(grads.dtype)
            return grads.index_put((rows_b, pos_b), vals, accumulate=True)

        handles = [
            self._resid_activations[layer].register_hook(partial(inject, items=items))  # type: ignore[union-attr]
            for layer, items in injections.items()
        ]
        try:
            # every injected layer is a root: an MLP input has no path to later layers (frozen MLP)
            roots = [self._resid_activations[layer] for layer in injections]
            torch.autograd.backward(roots, grad_tensors=[torch.zeros_like(r) for r in roots],  # type: ignore[arg-type]
                                    retain_graph=retain_graph)
        finally:
            for h in handles:
                h.remove()
        rows = self._batch_buffer[:, :n].T  # a view of the reused buffer (see above)
        totals = self._totals_buffer[:n].clone()
        self._batch_buffer = None
        store = self.target_totals if is_target else self.feature_row_totals
        for b, i in enumerate(index.tolist()):
            store[i] = totals[b]
        return rows


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


class FluxReplacementModel:
    """The duck-typed model circuit-tracer's ``attribute()`` runs on (one step, one prompt)."""

    feature_input_hook = "mlp.hook_in"
    feature_output_hook = "mlp.hook_out"

    def __init__(
        self,
        transformer: torch.nn.Module,
        step: FluxStepInput,
        dictionaries: Mapping[Site, Any],
        scan: str | None = None,
        model_name: str = "flux",
    ) -> None:
        self.frozen = FrozenFlux(transformer, step)
        self.step = step
        self.dictionaries = dict(dictionaries)
        for site in self.dictionaries:
            site.check_in(self.frozen.n_double)
        self.scan = scan
        self.targets: list[TargetSpec] = []
        self.backward_batch: int | None = None  # rows per backward pass (None: circuit-tracer's batch)
        self.clean = self.frozen.record()
        self.components = step_components(
            self.dictionaries, self.clean["mlp_in"], self.clean["mlp_out"], step.t, step.n_txt, self.frozen.n_double
        )
        self.meta = GraphMeta(
            prompt=step.prompt, seed=step.seed, step=step.step, timestep=step.t,
            num_inference_steps=step.num_inference_steps, n_txt=step.n_txt, grid=step.grid,
            text_tokens=list(step.text_tokens) or [f"tok{i}" for i in range(step.n_txt)],
            n_double=self.frozen.n_double, n_layers=self.frozen.n_layers, d_img=self.components.d_img,
            target_labels=[], model_name=model_name, height=step.height, width=step.width,
        )
        self.tokenizer = PositionTokenizer(self.meta)
        tf_cfg = transformer.config
        self.model_config = UnifiedConfig(
            n_layers=self.frozen.n_layers, d_model=self.frozen.d_model, d_head=int(tf_cfg.attention_head_dim),
            n_heads=int(tf_cfg.num_attention_heads), d_mlp=4 * self.frozen.d_model, d_vocab=self.meta.n_pos,
            tokenizer_name="difract-ext/positions", model_name=model_name,
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
        index = torch.arange(c.n_active, dtype=c.encoder_vecs.dtype)[:, None]
        ctx = FluxAttributionContext(
            activation_matrix=c.activation_matrix,
            error_vectors=c.error_vectors,
            token_vectors=self.clean["embed"],
            decoder_vecs=c.decoder_vecs,
            encoder_vecs=torch.cat([c.encoder_vecs, index], dim=1),  # index column: see compute_batch
            encoder_to_decoder_map=torch.arange(c.n_active),
            decoder_locations=c.decoder_locations,
            logits=torch.zeros(1, 1, self.meta.n_pos),
        )
        ctx.targets = self.targets
        ctx.feature_totals = c.reconstruction - c.bias
        ctx.target_totals, ctx.feature_row_totals = {}, {}
        return ctx

    def run_forward_pass(self, input_ids: torch.Tensor, batch_size: int, ctx: FluxAttributionContext) -> None:
        """Build the affine graph at ``min(batch_size, backward_batch)`` copies (rows per backward)."""
        self._ctx = ctx
        with ctx.install_hooks(self):
            self.frozen.linear_forward(batch=min(batch_size, self.backward_batch or batch_size))

    # ---- values -------------------------------------------------------------------------------
    def target_values(self) -> torch.Tensor:
        """``[K]`` each target's value on the real step."""
        mlp_in, resid = self.clean["mlp_in"][None], self.clean["resid_final"][None]
        return torch.stack([t.value(mlp_in, resid)[0] for t in self.targets])


def attribute_step(
    transformer: torch.nn.Module,
    step: FluxStepInput,
    dictionaries: Mapping[Site, Any],
    targets: Sequence[TargetSpec] | Any,
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
        dictionaries: ``{Site: transcoder}``; MLPs without one are error-only.
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
    """
    cuda = next(transformer.parameters()).is_cuda
    if batch_size is None:
        batch_size = 256 if cuda else 128
    if backward_batch is None:
        backward_batch = batch_size if cuda else 32
    if batch_size < 1 or backward_batch < 1:
        raise ValueError(f"batch_size ({batch_size}) and backward_batch ({backward_batch}) must be >= 1")
    model = FluxReplacementModel(transformer, step, dictionaries, scan=scan, model_name=model_name)
    model.backward_batch = backward_batch
    specs = list(targets(model) if callable(targets) else targets)
    if not specs:
        raise ValueError("attribute_step needs at least one target")
    model.targets = specs
    model.meta.target_labels = [t.label for t in specs]
    weights = torch.tensor([t.weight for t in specs], dtype=torch.float32)
    custom = [
        CustomTarget(token_str=t.label, prob=float(w), vec=torch.tensor([float(i)]))
        for i, (t, w) in enumerate(zip(specs, weights / weights.sum(), strict=True))
    ]
    with torch.enable_grad(), frozen_parameters(transformer):  # activation gradients only
        graph = attribute(
            None, model, attribution_targets=custom, batch_size=batch_size,
            max_feature_nodes=max_feature_nodes, verbose=verbose,
        )
    graph, n_res = _add_residue(graph, model)
    return FluxAttribution(
        graph=graph, meta=model.meta, targets=specs, components=model.components,
        target_values=model.target_values(), n_residue=n_res, model=model,
    )


def _add_residue(graph: Graph, model: FluxReplacementModel) -> tuple[Graph, int]:
    """Insert residue pseudo-features for unexpanded features, keeping every row conserved."""
    ctx = model._ctx
    c = model.components
    n_active = c.n_active
    selected = graph.selected_features
    unselected = torch.ones(n_active, dtype=torch.bool)
    unselected[selected] = False
    if not bool(unselected.any()):
        return graph, 0
    feats = c.features
    n_pos = model.meta.n_pos
    cells = torch.unique(feats[unselected, 0] * n_pos + feats[unselected, 1])
    n_sel, n_res, k = len(selected), len(cells), len(graph.logit_targets)
    adj = graph.adjacency_matrix
    m = adj.shape[0]
    new = torch.zeros(m + n_res, m + n_res, dtype=adj.dtype)
    keep = torch.cat([torch.arange(n_sel), torch.arange(n_sel, m) + n_res])
    new[keep[:, None], keep[None, :]] = adj
    # rows of the graph: selected features, then targets (last k)
    row_totals = [ctx.feature_row_totals[int(i)] for i in selected] + [ctx.target_totals[i] for i in range(k)]
    row_ids = torch.cat([torch.arange(n_sel), torch.arange(m + n_res - k, m + n_res)])
    sel_cells = feats[selected, 0] * n_pos + feats[selected, 1]
    flat = torch.stack(row_totals).flatten(1)  # [R, L * P] direct effect of all features per cell
    explored = torch.zeros_like(flat).index_add_(1, sel_cells, new[row_ids, :n_sel].to(flat.dtype))
    new[row_ids[:, None], torch.arange(n_sel, n_sel + n_res)[None, :]] = (flat - explored)[:, cells].to(new.dtype)
    res_feats = torch.stack([cells // n_pos, cells % n_pos, torch.full_like(cells, RESIDUE_FEATURE)], dim=1)
    acts = torch.zeros(n_res, dtype=graph.activation_values.dtype).index_add_(
        0, torch.searchsorted(cells, (feats[unselected, 0] * n_pos + feats[unselected, 1])),
        graph.activation_values[unselected],
    )
    out = Graph(
        input_string=graph.input_string, input_tokens=graph.input_tokens,
        active_features=torch.cat([graph.active_features, res_feats.to(graph.active_features.dtype)]),
        adjacency_matrix=new, cfg=graph.cfg,
        selected_features=torch.cat([selected, n_active + torch.arange(n_res)]),
        activation_values=torch.cat([graph.activation_values, acts]),
        logit_targets=graph.logit_targets, logit_probabilities=graph.logit_probabilities,
        scan=graph.scan, vocab_size=graph.vocab_size,
    )
    return out, n_res
