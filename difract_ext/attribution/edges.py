"""Direct-effect rows of one step's frozen replacement model, many rows per backward pass.

A *row* holds the direct effects of every source node on one node: a transcoder feature (its
pre-activation, injected as the encoder vector at its (layer, position)) or a target (its
functional's vectors, injected at any layers and positions). Rows follow circuit-tracer's
layout: ``[active features (N), error nodes (l * P + p), input nodes (P)]``.

:class:`StepEdges` runs one forward of the frozen model at ``B`` copies (``B`` rows per backward
pass), then for each batch of rows injects their vectors as gradients, runs one backward and
contracts the gradients at every MLP output with

- the active features' decoder vectors (:class:`FeatureKernel`: one batched matmul per layer over
  zero-padded per-position blocks instead of a gather of ``[B, N, d]`` gradients);
- each position's error vector and *feature total* (``Σ a W_dec`` of all active features there,
  for the residue nodes; :class:`PositionKernel`, one batched matmul per layer);
- the input embeddings at ``hook_embed``.

Rows are addressed by integer index (feature ``i`` of the components, target ``k``): float
columns cannot carry indices in low precision (bf16 has 8 significant bits). Rows are float32
whatever the model's dtype. The feature columns can be narrowed to a subset
(:meth:`StepEdges.set_columns`: the expanded features of a graph) without a new forward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from difract_ext.replacement.components import StepComponents
from difract_ext.replacement.targets import TargetSpec

#: A TransformerLens-style hook: ``(hook point name, fn(tensor, hook))``.
Hook = tuple[str, Callable[..., Any]]
#: One injection of a backward batch: ``(batch row, positions [k], vectors [k, d])``.
Injection = tuple[int, torch.Tensor, torch.Tensor]


def group_by_count(counts: torch.Tensor, max_padding: float = 0.125) -> list[list[int]]:
    """Slots (positions) grouped for :class:`FeatureKernel`: by count, largest first; a group
    closes when padding its slots to its first (largest) count would add more than
    ``max_padding`` of its real entries."""
    groups: list[list[int]] = []
    real = 0
    for slot in torch.argsort(counts, descending=True, stable=True).tolist():
        c = int(counts[slot])
        if groups and int(counts[groups[-1][0]]) * (len(groups[-1]) + 1) <= (1 + max_padding) * (
            real + c
        ):
            groups[-1].append(slot)
            real += c
        else:
            groups.append([slot])
            real = c
    return groups


class FeatureKernel:
    """``grad [B, P, d] -> [n, B]``: ``grad[b, pos_f] · vecs[f]`` for one layer's ``n`` features.

    The features are laid out per position in zero-padded blocks ``[U, c, d]`` (``U``
    positions, ``c`` the largest count among them); one ``bmm`` with the gradients ``[U, d, B]``
    gives ``[U, c, B]``, from which the real entries are read back in feature order. Positions
    are grouped by their number of features (largest first; a group closes when padding would
    exceed ``max_padding`` of its entries), so a layer whose counts vary (ReLU transcoders) does
    not pad every position to the layer's largest count.

    Args:
        positions: ``[n]`` position of each feature.
        vecs: ``[n, d]`` decoder vectors (scaled by the activations).
        max_padding: padded entries a group may add, as a share of its real ones.
    """

    def __init__(
        self, positions: torch.Tensor, vecs: torch.Tensor, max_padding: float = 0.125
    ) -> None:
        dev = vecs.device
        uniq, slot_of = torch.unique(positions, return_inverse=True)
        counts = torch.bincount(slot_of, minlength=len(uniq)).cpu()
        order = torch.argsort(slot_of, stable=True)
        starts = torch.cumsum(counts.to(dev), 0) - counts.to(dev)
        rank = torch.empty_like(slot_of)
        rank[order] = torch.arange(len(slot_of), device=dev) - starts[slot_of[order]]
        groups = group_by_count(counts, max_padding)
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions [U], [U, c, d])
        group_of = torch.empty(len(uniq), dtype=torch.long)
        local_of = torch.empty(len(uniq), dtype=torch.long)
        offsets, offset = [], 0
        for g, slots in enumerate(groups):
            idx = torch.tensor(slots)
            group_of[idx], local_of[idx] = g, torch.arange(len(slots))
            width = int(counts[slots[0]])
            self.blocks.append(
                (
                    uniq[idx.to(dev)],
                    torch.zeros(len(slots), width, vecs.shape[1], dtype=vecs.dtype, device=dev),
                )
            )
            offsets.append(offset)
            offset += len(slots) * width
        g_of, l_of = group_of.to(dev)[slot_of], local_of.to(dev)[slot_of]
        widths = torch.tensor([b.shape[1] for _, b in self.blocks], device=dev)
        for g, (_, block) in enumerate(self.blocks):
            mine = g_of == g
            block[l_of[mine], rank[mine]] = vecs[mine]
        # [n] entry of each feature in the concatenated [Σ U_g c_g, B] products
        self.flat = torch.tensor(offsets, device=dev)[g_of] + l_of * widths[g_of] + rank
        self.dtype = vecs.dtype

    @property
    def padded_entries(self) -> int:
        """Vectors held, padding included."""
        return sum(b.shape[0] * b.shape[1] for _, b in self.blocks)

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        g = grads.to(self.dtype)
        prods = [
            torch.bmm(block, g[:, pos].permute(1, 2, 0)).view(-1, grads.shape[0])
            for pos, block in self.blocks
        ]  # [U_g * c_g, B] each
        prod = prods[0] if len(prods) == 1 else torch.cat(prods)
        return prod.index_select(0, self.flat)  # [n, B]


class PositionKernel:
    """``grad [B, P, d] -> [P, B, k]``: each position's gradient contracted with ``k`` vectors
    of that position, each ``[P, d]`` (one ``bmm`` each, on views: no copies are kept)."""

    def __init__(self, *vecs: torch.Tensor) -> None:
        self.vecs = [v.unsqueeze(-1) for v in vecs]  # [P, d, 1] views

    @property
    def n_pos(self) -> int:
        return int(self.vecs[0].shape[0])

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        g = grads.to(self.vecs[0].dtype).transpose(0, 1)  # [P, B, d]
        return torch.cat([torch.bmm(g, v) for v in self.vecs], dim=-1)


@dataclass
class RowTotals:
    """Per row, the summed direct effect of *all* active features at each cell ``[L, P]``.

    ``features[i]`` is the row of feature ``i`` (index into the step's components),
    ``targets[k]`` the row of target ``k``. Residue nodes are these totals minus the expanded
    features' edges (:func:`~difract_ext.attribution.residue.add_residue`).
    """

    features: dict[int, torch.Tensor] = field(default_factory=dict)
    targets: dict[int, torch.Tensor] = field(default_factory=dict)

    def stack(self, features: torch.Tensor, n_targets: int) -> torch.Tensor:
        """``[len(features) + n_targets, L, P]``: the rows of ``features`` then targets ``0..K-1``.

        Raises:
            KeyError: a row that was never computed.
        """
        missing = [int(i) for i in features if int(i) not in self.features]
        missing_t = [k for k in range(n_targets) if k not in self.targets]
        if missing or missing_t:
            raise KeyError(
                f"row totals were never computed for features {missing[:5]} / targets "
                f"{missing_t[:5]}: run the rows of every selected node first"
            )
        rows = [self.features[int(i)] for i in features] + [
            self.targets[k] for k in range(n_targets)
        ]
        return torch.stack(rows)


class StepEdges:
    """The rows of one step's attribution graph, computed in batches of backward passes.

    Usage: install :meth:`forward_hooks` and :meth:`backward_hooks` on the frozen model, run its
    forward at ``B`` copies (``FrozenFlux.linear_forward(batch=B)``), call
    :meth:`release_forward_values`, then ask for rows (:meth:`row_chunks`, or :meth:`rows`, which
    circuit-tracer's ``compute_batch`` uses) as often as needed; ``retain_graph=False`` on the
    last call frees the graph.

    Args:
        components: the step's transcoder quantities (``N`` active features, ``L`` layers,
            ``P`` positions, width ``d``).
        token_vectors: ``[P, d]`` input embeddings (the input nodes' vectors).
        targets: the targets rows ``0..K-1`` refer to.
    """

    def __init__(
        self, components: StepComponents, token_vectors: torch.Tensor, targets: Sequence[TargetSpec]
    ) -> None:
        c = components
        self.components = c
        self.token_vectors = token_vectors
        self.targets = list(targets)
        self.n_layers, self.n_pos = (
            int(c.activation_matrix.shape[0]),
            int(c.activation_matrix.shape[1]),
        )
        self.n_features = c.n_active
        self.dtype = torch.float32  # rows, totals and the sums built from them
        self.device = c.error_vectors.device  # the model's (feature vectors may be on the host)
        self.feature_totals = c.reconstruction - c.bias  # [L, P, d]: Σ a W_dec at (l, p)
        self.totals = RowTotals()
        #: MLP inputs ``[B, P, d]`` of layers ``0..L-1`` and the final residual (index ``L``),
        #: cached by :meth:`forward_hooks`
        self.resid: list[torch.Tensor | None] = [None] * (self.n_layers + 1)
        self._release = False
        self._kernels: dict[int, tuple[FeatureKernel, torch.Tensor]] = {}
        self.columns = torch.arange(self.n_features)
        self.set_columns(None)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows: torch.Tensor | None = None  # [row_size, B] of the backward in flight
        self._totals: torch.Tensor | None = None  # [B, L, P] of the backward in flight

    @property
    def n_columns(self) -> int:
        """Feature columns of a row (all active features, or those of :meth:`set_columns`)."""
        return len(self.columns)

    @property
    def row_size(self) -> int:
        """``n_columns + (L + 1) * P``: feature columns, error nodes, input nodes."""
        return self.n_columns + (self.n_layers + 1) * self.n_pos

    @property
    def batch(self) -> int:
        """Rows per backward pass: the forward's batch."""
        if self.resid[0] is None:
            raise RuntimeError(
                "run the frozen model's forward with forward_hooks() installed first"
            )
        return int(self.resid[0].shape[0])

    def set_columns(self, features: torch.Tensor | None) -> None:
        """Make the feature columns of later rows ``features`` (ascending indices into the
        components' active features; None: all of them). Takes effect without a new forward:
        the backward hooks read the kernels at call time.
        """
        c = self.components
        cols = (
            torch.arange(self.n_features) if features is None else features.reshape(-1).long().cpu()
        )
        if len(cols) and not bool((cols[1:] > cols[:-1]).all()):
            raise ValueError("set_columns needs ascending, distinct feature indices")
        self.columns = cols
        layers, positions = c.decoder_locations[0].cpu(), c.decoder_locations[1].cpu()
        kernels: dict[int, tuple[FeatureKernel, torch.Tensor]] = {}
        col_layers = layers[cols]
        for layer in torch.unique(col_layers).tolist():
            slots = torch.nonzero(col_layers == layer, as_tuple=True)[0]  # rows of the buffer
            feats = cols[slots]
            vecs = c.decoder_vecs[feats.to(c.decoder_vecs.device)].to(self.device)
            kernels[int(layer)] = (
                FeatureKernel(positions[feats].to(self.device), vecs),
                slots.to(self.device),
            )
        self._kernels = kernels
        self._buffers = None

    # ---- hooks --------------------------------------------------------------------------------
    def forward_hooks(
        self, input_hook: str = "mlp.hook_in", final_hook: str = "unembed.hook_pre"
    ) -> list[Hook]:
        """Hooks caching each layer's MLP input and the final residual (the injection points)."""
        proxy = weakref.proxy(self)

        def cache(acts: torch.Tensor, hook: Any, *, layer: int) -> torch.Tensor:
            proxy.resid[layer] = acts
            if proxy._release and layer > 0:  # the previous block is done with its MLP input
                _drop_values(proxy.resid[layer - 1])
            return acts

        hooks: list[Hook] = [
            (f"blocks.{layer}.{input_hook}", partial(cache, layer=layer))
            for layer in range(self.n_layers)
        ]
        hooks.append((final_hook, partial(cache, layer=self.n_layers)))
        return hooks

    def release_forward_values(self, during_forward: bool = True) -> None:
        """Free the values of the cached injection points (``(L + 1)`` tensors ``[B, P, d]``).

        Backward passes need them only as graph nodes: the frozen model's linear path saves no
        activation when the weights do not require gradients (run inside
        :func:`~difract_ext.replacement.frozen.frozen_parameters`; otherwise backward raises
        "data is not allocated"). Call after the forward; with ``during_forward`` (before it),
        each layer's input is freed as soon as the next layer starts, so the forward never holds
        more than two.
        """
        if during_forward and self.resid[0] is None:
            self._release = True
            return
        self._release = False
        for r in self.resid:
            _drop_values(r)

    def backward_hooks(
        self, output_hook: str = "mlp.hook_out", embed_hook: str = "hook_embed"
    ) -> list[Hook]:
        """Hooks contracting the gradients at every MLP output and at the input embeddings."""
        c, n_pos = self.components, self.n_pos
        hooks: list[Hook] = [
            (f"blocks.{layer}.{output_hook}", self._feature_hook(int(layer)))
            for layer in torch.unique(c.decoder_locations[0].cpu()).tolist()
        ]
        for layer in range(self.n_layers):
            # error node and feature total of every position: [P, B, d] x [P, d, 1], twice
            kernel = PositionKernel(c.error_vectors[layer], self.feature_totals[layer])
            hooks.append(
                (
                    f"blocks.{layer}.{output_hook}",
                    self._position_hook(kernel, layer * n_pos, layer),
                )
            )
        hooks.append(
            (
                embed_hook,
                self._position_hook(PositionKernel(self.token_vectors), self.n_layers * n_pos),
            )
        )
        return hooks

    def _feature_hook(self, layer: int) -> Callable[..., None]:
        proxy = weakref.proxy(self)

        def hook(grads: torch.Tensor, hook: Any) -> None:
            entry = proxy._kernels.get(layer)
            if entry is not None:
                kernel, slots = entry
                proxy._rows.index_copy_(0, slots, kernel(grads).to(proxy.dtype))

        return hook

    def _position_hook(
        self, kernel: PositionKernel, offset: int, totals_layer: int | None = None
    ) -> Callable[..., None]:
        """Column 0 of the product fills rows ``n_columns + offset ..`` (``P`` of them);
        column 1 (if any) the feature totals of ``totals_layer``."""
        n_pos = kernel.n_pos
        proxy = weakref.proxy(self)

        def hook(grads: torch.Tensor, hook: Any) -> None:
            out = kernel(grads)  # [P, B, k]
            start = proxy.n_columns + offset
            proxy._rows[start : start + n_pos] += out[..., 0]
            if totals_layer is not None:
                proxy._totals[:, totals_layer] += out[..., 1].T

        return hook

    # ---- rows -----------------------------------------------------------------------------------
    def rows(
        self, index: torch.Tensor, *, targets: bool, retain_graph: bool = True
    ) -> torch.Tensor:
        """Rows ``[n, row_size]`` of features ``index`` (or of targets ``index``), float32.

        Each row's totals also go to :attr:`totals` (see :meth:`row_chunks` for the passes).
        The result may be a view of a buffer reused by the next call: copy it out first.
        """
        index = index.reshape(-1).long()
        if len(index) <= self.batch:
            ((_, rows, totals),) = list(
                self.row_chunks(index, targets=targets, retain_graph=retain_graph)
            )
            self._keep_totals(index, totals, targets)
            return rows
        out = torch.empty(len(index), self.row_size, dtype=self.dtype, device=self.device)
        for sel, rows, totals in self.row_chunks(index, targets=targets, retain_graph=retain_graph):
            out.index_copy_(0, sel.to(self.device), rows)
            self._keep_totals(index[sel], totals, targets)
        return out

    def _keep_totals(self, index: torch.Tensor, totals: torch.Tensor, targets: bool) -> None:
        store = self.totals.targets if targets else self.totals.features
        for b, i in enumerate(index.tolist()):
            store[i] = totals[b].clone()

    def row_chunks(
        self, index: torch.Tensor, *, targets: bool, retain_graph: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Backward passes over the rows of features (or targets) ``index``.

        More rows than the forward's batch are sorted by layer and cut into backward passes of
        that size, so each pass starts at its own rows' deepest layer (a feature's row never
        needs the layers above it). ``retain_graph`` applies to the last pass.

        Yields:
            ``(sel, rows, totals)`` per pass: ``sel`` the positions in ``index`` (CPU), ``rows
            [n, row_size]`` and ``totals [n, L, P]`` (each row's direct effect of *all* active
            features per cell), float32 views of buffers the next pass reuses.
        """
        index = index.reshape(-1).long().cpu()
        chunk, n = self.batch, len(index)
        if n <= chunk:
            yield (torch.arange(n), *self._backward(index, targets, retain_graph))
            return
        order = torch.argsort(self._row_layers(index, targets), stable=True)
        for start in range(0, n, chunk):
            sel = order[start : start + chunk]
            last = start + chunk >= n
            yield (sel, *self._backward(index[sel], targets, retain_graph if last else True))

    def row_layers(self, index: torch.Tensor, *, targets: bool) -> torch.Tensor:
        """``[n]`` the deepest layer each row injects at (``L``: the final residual)."""
        return self._row_layers(index.reshape(-1).long().cpu(), targets)

    def _row_layers(self, index: torch.Tensor, targets: bool) -> torch.Tensor:
        if targets:
            return torch.tensor(
                [max(layer for layer, _, _ in self.targets[i].injections) for i in index.tolist()],
                dtype=torch.long,
            )
        return self.components.decoder_locations[0].cpu()[index]

    def _injections(self, index: torch.Tensor, targets: bool) -> dict[int, list[Injection]]:
        """``{layer: [(batch row, positions, vectors)]}`` of a backward batch."""
        by_layer: dict[int, list[Injection]] = {}
        if targets:
            for b, i in enumerate(index.tolist()):
                for layer, pos, vecs in self.targets[i].injections:
                    by_layer.setdefault(layer, []).append((b, pos, vecs))
            return by_layer
        c = self.components
        dev = c.decoder_locations.device
        layers = c.decoder_locations[0][index.to(dev)].cpu()
        positions = c.decoder_locations[1][index.to(dev)].cpu()
        vecs = c.encoder_vecs[index.to(c.encoder_vecs.device)]
        for b in range(len(index)):
            by_layer.setdefault(int(layers[b]), []).append(
                (b, positions[b : b + 1], vecs[b : b + 1])
            )
        return by_layer

    def _backward(
        self, index: torch.Tensor, targets: bool, retain_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, batch = len(index), self.batch
        injections = self._injections(index, targets)
        # reused across passes (a fresh allocation per pass costs page faults); the rows this
        # returns are a view, copied out by the caller before the next pass
        if self._buffers is None or self._buffers[0].shape != (self.row_size, batch):
            self._buffers = (
                torch.empty(self.row_size, batch, dtype=self.dtype, device=self.device),
                torch.empty(batch, self.n_layers, self.n_pos, dtype=self.dtype, device=self.device),
            )
        self._rows, self._totals = self._buffers[0].zero_(), self._buffers[1].zero_()
        handles = [
            self.resid[layer].register_hook(  # type: ignore[union-attr]
                partial(_inject, items=items)
            )
            for layer, items in injections.items()
        ]
        try:
            # every injected layer is a root: an MLP input has no path to later layers (frozen MLP)
            roots = [self.resid[layer] for layer in injections]
            torch.autograd.backward(
                roots,
                grad_tensors=[torch.zeros_like(r) for r in roots],  # type: ignore[arg-type]
                retain_graph=retain_graph,
            )
        finally:
            for h in handles:
                h.remove()
        rows = self._rows[:, :n].T  # a view of the reused buffer (see above)
        totals = self._totals[:n]
        self._rows = None
        return rows, totals


def _drop_values(t: torch.Tensor | None) -> None:
    """Free a tensor's values, keeping it as a node of the autograd graph (shape, dtype)."""
    if t is not None and t.untyped_storage().nbytes():
        t.untyped_storage().resize_(0)


def _inject(grads: torch.Tensor, *, items: list[Injection]) -> torch.Tensor:
    """Every (row, position, vector) of one layer added to its gradient in one ``index_put``."""
    rows = torch.cat([torch.full((len(pos),), b, dtype=torch.long) for b, pos, _ in items])
    pos = torch.cat([p.reshape(-1).long().cpu() for _, p, _ in items])
    vals = torch.cat([v.reshape(-1, grads.shape[-1]) for _, _, v in items]).to(
        grads.device, grads.dtype
    )
    return grads.index_put((rows.to(grads.device), pos.to(grads.device)), vals, accumulate=True)
