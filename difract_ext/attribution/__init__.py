"""The science of attribution graphs of one FLUX denoising step (no circuit-tracer import).

- :mod:`~difract_ext.attribution.step`: ``AttributionStep``, a step made ready (frozen model,
  clean cache, components at t, metadata, targets);
- :mod:`~difract_ext.attribution.edges`: ``StepEdges``, direct-effect rows in batched backward
  passes (edge kernels, layer-sorted chunks, integer row bookkeeping, row totals);
- :mod:`~difract_ext.attribution.build`: ``build_graph``, the driver (circuit-tracer's ranking,
  compact ranking rows, an exact pass when they were truncated, residue nodes);
- :mod:`~difract_ext.attribution.ranking`: the selection pass's rows and partial influences;
- :mod:`~difract_ext.attribution.row_graph`: ``RowGraph``, a graph as the rows of its expanded
  nodes, with circuit-tracer's influence, pruning and scores computed on them;
- :mod:`~difract_ext.attribution.memory`: peak memory and backward passes, before running;
- :mod:`~difract_ext.attribution.residue`: residue nodes of a dense graph (circuit-tracer path);
- :mod:`~difract_ext.attribution.graph_meta`: what a graph is about (positions, layers, run);
- :mod:`~difract_ext.attribution.validation`: perturbation, conservation and ablation checks.
- :mod:`~difract_ext.attribution.effects`: value-normalised total effects of every node on every
  target (``x = e (I − A D⁻¹)⁻¹``, then ``x A``), on the rows;
- :mod:`~difract_ext.attribution.partial`: ``PartialFlux``, the step with each freeze of the
  replacement model lifted in turn, for batched interventions (the real model when all are);
- :mod:`~difract_ext.attribution.faithfulness`: the per-graph faithfulness report (ablation
  agreement at several sizes, which freeze leaks, node selection, DifFRACT's pairwise check).

:mod:`difract_ext.adapters.attribution` runs a step (``attribute_step``) and bridges to
circuit-tracer (its own ``attribute()`` and ``Graph``, for small graphs).
"""
