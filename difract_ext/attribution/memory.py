"""How much memory, and how many backward passes, an attribution graph will take: before running.

:func:`estimate_attribution` adds up the tensors :func:`~difract_ext.attribution.build.build_graph`
and the graph's pruning allocate, from sizes alone (:class:`AttributionSize`), phase by phase:

- **resident**: the runtime, the transformer's weights, the transcoders (what a process holds
  before attribution starts);
- **components**: the transcoders encode the step, one at a time (the full model is on the
  device, and the feature vectors until they move to the host);
- **step**: the clean cache and taped attention inputs (``4L + 2`` tensors ``[P, d]``), the
  transcoder components (reconstruction, error, bias) and the feature totals (``4L``);
- **features**: encoder and decoder vectors of the ``N`` active features (``2 N d``; in host
  memory on a GPU), the edge kernels' padded decoder blocks (``N d`` times the padding) and the
  sparse bookkeeping;
- **selection**: the ranking rows (:func:`~difract_ext.attribution.ranking.plan_ranking`), the
  row buffer ``[N + (L + 1) P, B]`` and a backward pass's activation gradients (a few
  ``[B, P, d]``);
- **exact / assembly**: the graph's rows ``(F + K) × M`` with the ranking rows still alive, the
  narrowed row buffer and a backward;
- **prune**: the rows, their edge mask and the sorted edge scores of the kept nodes.

The peak is the largest phase (each counts what is alive then: the step and the features in all;
the affine path's weights only while a GPU build offloads the rest). On a GPU the device and the
host are counted apart (``device_bytes``, ``host_bytes``; ``peak_bytes`` their sum); on the CPU
all three are the process's RSS.
Constants were fitted on measured CPU runs (``benchmarks/flux_scale.py`` prints predictions
beside measurements; ``tests/test_memory_model.py`` checks small cases within 20 %).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from difract_ext.attribution.edges import group_by_count
from difract_ext.attribution.ranking import RANK_BYTES, plan_ranking
from difract_ext.replacement.frozen import linear_path_unused

#: A CPU process with torch, diffusers, circuit-tracer and difract_ext's attribution and graph
#: modules imported (measured RSS, torch 2.13).
RUNTIME_BYTES = 560 * 2**20
#: RSS per byte that attribution allocates on the CPU (glibc keeps some freed chunks; fitted:
#: measured increments were 6-16 % above the allocations counted here).
CPU_ALLOCATOR_OVERHEAD = 1.12
#: Activation-gradient tensors ``[B, P, d]`` alive at once in a backward pass (fitted).
BACKWARD_TENSORS = 8.0
#: Share of the graph's entries with a non-zero edge score after node pruning: the sort of
#: those scores is pruning's largest temporary. Measured 0.2 % (FLUX.1's block types, 500
#: features, default thresholds); this bound is 25 times that.
PRUNE_EDGE_SHARE = 0.05
#: Bytes per sorted edge score: the scores, the sorted copy, int64 indices, the cumulative sum.
_SORT_BYTES = 20
_CHUNK = 2 * (1 << 27)  # row chunks of influence products (normalised chunk + its |A|)


@dataclass(frozen=True)
class AttributionSize:
    """Everything the memory of one attribution graph depends on.

    ``n_active`` is the number of active transcoder features ``N`` (positions with a transcoder
    times its mean L0, summed over sites); ``budget`` is ``max_feature_nodes``; ``*_params``
    count parameters (``linear_params``: those the affine path keeps on the device when
    offloading, see ``FrozenFlux.unused_by_linear_path``). ``kernel_padding``: the edge kernels'
    padded decoder blocks over ``N d`` (at most 1.125: positions are grouped by count; use
    :func:`kernel_padding` when the components are at hand).
    """

    n_double: int
    n_single: int
    d_model: int
    n_txt: int
    n_img: int
    n_active: int
    budget: int
    n_targets: int = 1
    batch_size: int = 128
    backward_batch: int = 32
    update_interval: int = 4
    dtype_bytes: int = 4
    transformer_params: int = 0
    linear_params: int = 0
    dictionary_params: int = 0
    dictionary_bytes: int = 4
    device: str = "cpu"
    offload: bool | None = None
    host_vectors: bool | None = None
    rank_entries: int | None = None
    rank_bytes: int = RANK_BYTES
    kernel_padding: float = 1.125
    d_sae: int = 0
    resident_other: int = 0

    @property
    def n_layers(self) -> int:
        return self.n_double + self.n_single

    @property
    def n_pos(self) -> int:
        return self.n_txt + self.n_img


@dataclass
class MemoryEstimate:
    """Predicted peaks (bytes) and backward passes; ``terms`` names every part."""

    peak_bytes: int
    device_bytes: int
    host_bytes: int
    backward_passes: int
    one_pass: bool
    rank_entries: int
    peak_phase: str
    terms: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        gib = {k: round(v / 2**30, 3) for k, v in self.terms.items()}
        out = asdict(self)
        out["terms_gib"] = gib
        del out["terms"]
        out["peak_gib"] = round(self.peak_bytes / 2**30, 3)
        return out


def backward_passes(
    n_targets: int, budget: int, batch_size: int, backward_batch: int, update_interval: int = 4
) -> int:
    """Backward passes of the selection pass (targets, then ranking batches of ``batch_size``
    cut into passes of ``min(batch_size, backward_batch)``)."""
    b = min(batch_size, backward_batch)
    passes = sum(
        math.ceil(min(batch_size, n_targets - i) / b) for i in range(0, n_targets, batch_size)
    )
    done = 0
    while done < budget:
        queue = min(update_interval * batch_size, budget - done)
        for start in range(0, queue, batch_size):
            passes += math.ceil(min(batch_size, queue - start) / b)
        done += queue
    return passes


def estimate_attribution(size: AttributionSize) -> MemoryEstimate:
    """Predict the peak memory and backward passes of one graph (see the module docstring)."""
    s = size
    e, n, d, n_pos, n_layers = s.dtype_bytes, s.n_active, s.d_model, s.n_pos, s.n_layers
    budget = min(s.budget, n)
    rows_k = budget + s.n_targets
    b = min(s.batch_size, s.backward_batch)
    cuda = s.device.startswith("cuda")
    offload = cuda if s.offload is None else s.offload
    host_vectors = cuda if s.host_vectors is None else s.host_vectors
    n_tail, n_cells = (n_layers + 1) * n_pos, n_layers * n_pos
    plan = plan_ranking(n, rows_k, n_tail, n_cells, s.rank_entries, s.rank_bytes)
    n_res = min(s.n_double * n_pos, n) if budget < n else 0
    m = budget + n_res + n_tail + s.n_targets

    weights = s.transformer_params * e
    t: dict[str, int] = {
        "runtime": RUNTIME_BYTES + s.resident_other,
        "weights": weights,
        "dictionaries": s.dictionary_params * s.dictionary_bytes,
        "step": (8 * n_layers + 2) * n_pos * d * e,
        "feature_vectors": 2 * n * d * e,
        "feature_kernels": int(s.kernel_padding * n * d * e),
        "feature_index": 48 * n,
        "ranking_rows": plan.row_bytes(n, n_tail, n_cells) * rows_k,
        "row_buffer": (n + n_tail) * b * 4 + b * n_cells * 4,
        "row_copies": 2 * b * (n + n_tail) * 4,  # |rows| for the sums and the top-k
        "backward": int(BACKWARD_TENSORS * b * n_pos * d * max(e, 2)),
        "graph_rows": rows_k * m * 4,
        "exact_buffer": 0 if plan.one_pass else (budget + n_tail) * b * 4 + 3 * b * n_cells * 4,
        "assembly": 3 * min(rows_k, 256) * (budget + 2 * n_cells) * 4,
        "edge_mask": rows_k * m,
        "edge_sort": int(PRUNE_EDGE_SHARE * rows_k * m * _SORT_BYTES),
        "influence_chunks": min(_CHUNK, 2 * rows_k * m * 4),
        # one transcoder encoding its stream's positions (moved to the GPU if kept elsewhere)
        "encoding": 3 * max(s.n_img, s.n_txt) * s.d_sae * s.dictionary_bytes
        + (2 * s.d_sae * d * s.dictionary_bytes if cuda else 0),
    }
    # what every phase holds on the model's device: the step's tensors, the sparse bookkeeping,
    # the feature vectors unless they live on the host; the weights: all of them except while
    # the graph is built with the unused modules offloaded
    common = t["step"] + t["feature_index"] + (0 if host_vectors else t["feature_vectors"])
    build_weights = (s.linear_params * e) if (cuda and offload) else weights
    kernels = t["feature_kernels"]
    phases = {
        "components": weights + common + t["encoding"],
        "selection": build_weights
        + common
        + kernels
        + t["ranking_rows"]
        + t["row_buffer"]
        + t["row_copies"]
        + t["backward"],
        "exact": build_weights
        + common
        + kernels
        + t["ranking_rows"]
        + t["graph_rows"]
        + (t["exact_buffer"] + t["backward"] if not plan.one_pass else t["assembly"]),
        "prune": weights
        + common
        + t["graph_rows"]
        + t["edge_mask"]
        + t["edge_sort"]
        + t["influence_chunks"],
    }
    peak_phase = max(phases, key=lambda k: phases[k])
    host = t["runtime"] + t["dictionaries"]
    if cuda:
        device = phases[peak_phase]
        host += (weights - build_weights) + (t["feature_vectors"] if host_vectors else 0)
    else:  # glibc's heaps keep some freed chunks: attribution's own allocations cost more RSS
        own = phases[peak_phase] - weights
        device = host = host + weights + int(CPU_ALLOCATOR_OVERHEAD * own)
    passes = backward_passes(s.n_targets, budget, s.batch_size, s.backward_batch, s.update_interval)
    if not plan.one_pass:
        passes += math.ceil(budget / b) + math.ceil(s.n_targets / b)
    t.update({f"phase_{k}": v for k, v in phases.items()})
    return MemoryEstimate(
        peak_bytes=device + host if cuda else device,
        device_bytes=device,
        host_bytes=host,
        backward_passes=passes,
        one_pass=plan.one_pass,
        rank_entries=plan.entries,
        peak_phase=peak_phase,
        terms=t,
    )


def attribution_size(
    transformer: Any,
    dictionaries: Mapping[Any, Any],
    n_txt: int,
    n_img: int,
    n_active: int,
    budget: int | None,
    **options: Any,
) -> AttributionSize:
    """:class:`AttributionSize` of a transformer (a real one, or one built on the ``meta``
    device), its transcoders and a step's positions; ``options`` are the other fields
    (``n_targets``, ``batch_size``, ``backward_batch``, ``device``, ``resident_other``...; the
    device, dtype and dictionary sizes default to those of the arguments).
    ``budget`` None means every active feature."""
    params = list(transformer.parameters())
    unused = sum(p.numel() for m in linear_path_unused(transformer) for p in m.parameters())
    total = sum(p.numel() for p in params)
    dics = list(dictionaries.values())
    options.setdefault("device", params[0].device.type)
    options.setdefault("dtype_bytes", params[0].element_size())
    options.setdefault(
        "dictionary_params", sum(p.numel() for dic in dics for p in dic.parameters())
    )
    options.setdefault("dictionary_bytes", dics[0].W_dec.element_size() if dics else 4)
    options.setdefault("d_sae", max((int(dic.cfg.d_sae) for dic in dics), default=0))
    return AttributionSize(
        n_double=len(transformer.transformer_blocks),
        n_single=len(transformer.single_transformer_blocks),
        d_model=int(transformer.inner_dim),
        n_txt=n_txt,
        n_img=n_img,
        n_active=n_active,
        budget=n_active if budget is None else min(budget, n_active),
        transformer_params=total,
        linear_params=total - unused,
        **options,
    )


def kernel_padding(decoder_locations: Any) -> float:
    """The edge kernels' padded entries over ``N`` for a step's components (``decoder_locations
    [2, N]``: layer, position), grouped as :class:`~difract_ext.attribution.edges.FeatureKernel`
    groups them."""
    layers, positions = decoder_locations[0].cpu(), decoder_locations[1].cpu()
    padded = 0
    for layer in layers.unique().tolist():
        counts = positions[layers == layer].bincount()
        counts = counts[counts > 0]
        padded += sum(int(counts[g[0]]) * len(g) for g in group_by_count(counts))
    return padded / max(1, len(layers))
