"""The science of attribution graphs of one FLUX denoising step (no circuit-tracer import).

- :mod:`~difract_ext.attribution.step`: ``AttributionStep``, a step made ready (frozen model,
  clean cache, components at t, metadata, targets);
- :mod:`~difract_ext.attribution.edges`: ``StepEdges``, direct-effect rows in batched backward
  passes (edge kernels, layer-sorted chunks, integer row bookkeeping, row totals);
- :mod:`~difract_ext.attribution.residue`: residue nodes for features left unexpanded;
- :mod:`~difract_ext.attribution.graph_meta`: what a graph is about (positions, layers, run);
- :mod:`~difract_ext.attribution.validation`: perturbation, conservation and ablation checks.

circuit-tracer drives a run through :mod:`difract_ext.adapters.attribution`.
"""
