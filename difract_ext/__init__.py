"""difract-ext: nnsight, SAELens and circuit-tracer for FLUX diffusion transformers.

Importing the package is cheap: the public names below load on first use, and importing a core
subpackage (``difract_ext.toy.world``, ``difract_ext.dictionary``, ...) never loads SAELens,
nnsight or circuit-tracer. Our SAELens architectures (``difract_timestep_transcoder``,
``difract_timestep_sae``) are registered as soon as SAELens is imported in a process that
imported ``difract_ext`` — before or after — so ``sae_lens.SAE.load_from_disk(path)`` returns
:class:`TimestepTranscoder` / :class:`TimestepSAE` after a plain ``import difract_ext``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from difract_ext._registration import install_saelens_registration
from difract_ext._version import __version__

install_saelens_registration()

_LAZY: dict[str, str] = {
    # core
    "Site": "difract_ext.flux.sites",
    "SiteError": "difract_ext.flux.sites",
    "SCHNELL_TIMESTEPS": "difract_ext.flux.sites",
    "CheckpointError": "difract_ext.dictionary",
    "DecoderNormError": "difract_ext.dictionary",
    "FoldedDictionary": "difract_ext.dictionary",
    "TimestepError": "difract_ext.dictionary",
    # SAELens adapters
    "TimestepSAE": "difract_ext.adapters.dictionaries",
    "TimestepSAEConfig": "difract_ext.adapters.dictionaries",
    "TimestepTranscoder": "difract_ext.adapters.dictionaries",
    "TimestepTranscoderConfig": "difract_ext.adapters.dictionaries",
    "SAELENS_IO": "difract_ext.adapters.dictionaries",
    "register_architectures": "difract_ext.adapters.dictionaries",
    "convert_difract_dir": "difract_ext.adapters.checkpoints",
    "load_difract_checkpoint": "difract_ext.adapters.checkpoints",
    "load_difract_dir": "difract_ext.adapters.checkpoints",
    "load_dictionary_dir": "difract_ext.adapters.checkpoints",
    "load_shapes_dictionaries": "difract_ext.adapters.checkpoints",
    "save_difract_checkpoint": "difract_ext.adapters.checkpoints",
    # nnsight adapter
    "FluxModel": "difract_ext.adapters.tracing",
    "FluxTracer": "difract_ext.adapters.tracing",
}

if TYPE_CHECKING:  # pragma: no cover
    from difract_ext.adapters.checkpoints import (
        convert_difract_dir,
        load_dictionary_dir,
        load_difract_checkpoint,
        load_difract_dir,
        load_shapes_dictionaries,
        save_difract_checkpoint,
    )
    from difract_ext.adapters.dictionaries import (
        SAELENS_IO,
        TimestepSAE,
        TimestepSAEConfig,
        TimestepTranscoder,
        TimestepTranscoderConfig,
        register_architectures,
    )
    from difract_ext.adapters.tracing import FluxModel, FluxTracer
    from difract_ext.dictionary import (
        CheckpointError,
        DecoderNormError,
        FoldedDictionary,
        TimestepError,
    )
    from difract_ext.flux.sites import SCHNELL_TIMESTEPS, Site, SiteError


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'difract_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CheckpointError",
    "DecoderNormError",
    "FluxModel",
    "FluxTracer",
    "FoldedDictionary",
    "SAELENS_IO",
    "SCHNELL_TIMESTEPS",
    "Site",
    "SiteError",
    "TimestepError",
    "TimestepSAE",
    "TimestepSAEConfig",
    "TimestepTranscoder",
    "TimestepTranscoderConfig",
    "__version__",
    "convert_difract_dir",
    "load_dictionary_dir",
    "load_difract_checkpoint",
    "load_difract_dir",
    "load_shapes_dictionaries",
    "register_architectures",
    "save_difract_checkpoint",
]
