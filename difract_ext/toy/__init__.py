"""The shapes world and the trained toy FLUX pipeline.

``difract_ext.toy.world`` / ``difract_ext.toy.analyzer`` are numpy-only; the pipeline helpers
below are imported lazily (on first attribute access) so importing the world stays torch-free.

* :func:`load_shapes_pipeline` — the shipped ``FluxPipeline`` (offline).
* :data:`SHAPES_CALL_DEFAULTS` — the call keywords (32×32, 4 steps, no guidance, 16 tokens);
  :func:`shapes_call_defaults` — the same with the trained range, as the folder records them.
* :func:`shapes_pipeline_path` — the folder of the shipped weights.
* :func:`shapes_dictionaries_path` — the folder of the shipped dictionaries (load them with
  :func:`difract_ext.load_shapes_dictionaries`, keyed ``Site``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from difract_ext.toy.pipeline import (
        SHAPES_CALL_DEFAULTS,
        load_shapes_pipeline,
        shapes_call_defaults,
        shapes_dictionaries_path,
        shapes_pipeline_path,
    )

__all__ = [
    "SHAPES_CALL_DEFAULTS",
    "load_shapes_pipeline",
    "shapes_call_defaults",
    "shapes_dictionaries_path",
    "shapes_pipeline_path",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from difract_ext.toy import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
