"""Thin bridges from difract-ext's core to the libraries our users already use.

Installed as ``difract_ext.adapters`` (``adapters/`` in the source tree).

- :mod:`~difract_ext.adapters.dictionaries`: conditioned transcoders / SAEs as SAELens classes,
  registered under ``difract_timestep_transcoder`` and ``difract_timestep_sae``;
- :mod:`~difract_ext.adapters.checkpoints`: DifFRACT ``.pt`` files as those SAELens objects;
- :mod:`~difract_ext.adapters.tracing`: ``FluxModel``, an nnsight model over a ``FluxPipeline``
  with transcoder features as traceable, editable per-step sites.
"""
