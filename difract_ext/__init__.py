"""difract-ext: nnsight, SAELens and circuit-tracer for FLUX diffusion transformers.

Importing the package registers our SAELens architectures, so afterwards
``sae_lens.SAE.load_from_disk(path)`` returns :class:`TimestepTranscoder` / :class:`TimestepSAE`.
"""

__version__ = "0.1.0"

from difract_ext.adapters.checkpoints import (  # noqa: E402
    convert_difract_dir,
    load_difract_checkpoint,
    load_difract_dir,
    save_difract_checkpoint,
)
from difract_ext.adapters.dictionaries import (  # noqa: E402
    TimestepSAE,
    TimestepSAEConfig,
    TimestepTranscoder,
    TimestepTranscoderConfig,
    register_architectures,
)
from difract_ext.dictionary import (  # noqa: E402
    CheckpointError,
    DecoderNormError,
    FoldedDictionary,
    TimestepError,
)
from difract_ext.flux.sites import SCHNELL_TIMESTEPS, Site, SiteError  # noqa: E402

_LAZY = {
    "FluxModel": "difract_ext.adapters.tracing",
    "FluxTracer": "difract_ext.adapters.tracing",
}


def __getattr__(name: str) -> object:  # heavy optional parts load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'difract_ext' has no attribute {name!r}")


__all__ = [
    "FluxModel",
    "FluxTracer",
    "SCHNELL_TIMESTEPS",
    "CheckpointError",
    "DecoderNormError",
    "FoldedDictionary",
    "Site",
    "SiteError",
    "TimestepError",
    "TimestepSAE",
    "TimestepSAEConfig",
    "TimestepTranscoder",
    "TimestepTranscoderConfig",
    "__version__",
    "convert_difract_dir",
    "load_difract_checkpoint",
    "load_difract_dir",
    "register_architectures",
    "save_difract_checkpoint",
]
