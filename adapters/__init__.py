"""Thin bridges from difract-ext's core to the libraries our users already use.

The only place that imports SAELens and nnsight (checked by the import contracts of
``pyproject.toml``, see ``ARCHITECTURE.md``); the core reaches them through protocols it owns,
e.g. :class:`~difract_ext.training.dictionary_io.DictionaryIO`.

- :mod:`~difract_ext.adapters.dictionaries`: conditioned transcoders / SAEs as SAELens classes,
  registered under ``difract_timestep_transcoder`` and ``difract_timestep_sae``, and
  ``SAELENS_IO``, the trainer's way to build, save and load them;
- :mod:`~difract_ext.adapters.checkpoints`: DifFRACT ``.pt`` files as those SAELens objects;
- :mod:`~difract_ext.adapters.tracing`: ``FluxModel``, an nnsight model over a ``FluxPipeline``
  with transcoder features as traceable, editable per-step sites.
"""
