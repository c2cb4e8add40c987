"""The local replacement model of one FLUX denoising step, its targets and its validation.

- :mod:`~difract_ext.replacement.inputs`: capture the transformer call of one step;
- :mod:`~difract_ext.replacement.frozen`: ``FrozenFlux``, the step with circuit-tracer's freeze
  points;
- :mod:`~difract_ext.replacement.components`: transcoder activations, encoder/decoder vectors,
  errors;
- :mod:`~difract_ext.replacement.targets`: output (region × direction) and feature targets;
- :mod:`~difract_ext.attribution.validation`: perturbation, conservation and ablation checks.
"""
