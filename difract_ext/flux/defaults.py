"""A pipeline's own call defaults: the size, T5 length and steps it is meant to run at.

A pipeline folder may hold ``difract_call_defaults.json`` next to ``model_index.json``::

    {
      "format": "difract_call_defaults",
      "version": 1,
      "height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 0.0,
      "max_sequence_length": 16,
      "trained_heights": [32], "trained_widths": [32], "trained_max_sequence_lengths": [16]
    }

The first five keys are ``FluxPipeline.__call__`` keywords (``null`` or absent: diffusers' own
default); the ``trained_*`` lists are the values the model was trained at (empty or absent: any).
A pipeline without the file (real FLUX) keeps diffusers' defaults, except the number of steps,
which follows :func:`default_num_inference_steps` — the one rule for it in this project.

:func:`resolve` fills what a caller did not pass and warns (:class:`TrainedRangeWarning`) when a
call leaves the trained range::

    call = resolve(pipe, height=256)   # warns: trained at height 32
    pipe(prompt, **call)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from difract_ext.util.atomic import atomic_write_json
from difract_ext.util.config import config_from_dict, config_to_dict
from difract_ext.util.files import read_json

__all__ = [
    "CALL_DEFAULTS_FILE",
    "CALL_KEYS",
    "CallDefaults",
    "TrainedRangeWarning",
    "call_defaults",
    "default_num_inference_steps",
    "read_call_defaults",
    "resolve",
    "set_call_defaults",
    "write_call_defaults",
]

CALL_DEFAULTS_FILE = "difract_call_defaults.json"
"""File name of a pipeline folder's call defaults (next to ``model_index.json``)."""

CALL_KEYS: tuple[str, ...] = (
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "max_sequence_length",
)
"""The ``FluxPipeline.__call__`` keywords a :class:`CallDefaults` can fill."""

_FORMAT = "difract_call_defaults"
_VERSION = 1
_ATTR = "difract_call_defaults"  # where the loader leaves a pipeline's CallDefaults


class TrainedRangeWarning(UserWarning):
    """A call asks a pipeline for a size or T5 length it was not trained at."""


@dataclass(frozen=True)
class CallDefaults:
    """Call keywords a pipeline is meant to run with, and the range it was trained at.

    ``None`` call fields mean diffusers' own default; empty ``trained_*`` tuples mean any value.
    ``source`` (not stored) says where the defaults came from, for messages.
    """

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    trained_heights: tuple[int, ...] = ()
    trained_widths: tuple[int, ...] = ()
    trained_max_sequence_lengths: tuple[int, ...] = ()
    source: str | None = field(default=None, compare=False, metadata={"config": False})

    def call_kwargs(self) -> dict[str, Any]:
        """The call keywords that are set (``{"height": 32, ...}``)."""
        return {k: getattr(self, k) for k in CALL_KEYS if getattr(self, k) is not None}

    def to_json(self) -> dict[str, Any]:
        """The file's content (see the module docstring)."""
        return {"format": _FORMAT, "version": _VERSION, **config_to_dict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str | None = None) -> CallDefaults:
        """Parse the file's content.

        Raises:
            ValueError: another format or version, an unknown key, or a wrong type.
        """
        where = source or "call defaults"
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(
                f"{where}: expected format {_FORMAT!r} version {_VERSION}, got "
                f"{data.get('format')!r} version {data.get('version')!r}; "
                "rewrite it with write_call_defaults()"
            )
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        return replace(config_from_dict(cls, body, where), source=source)

    def check(self, call: dict[str, Any]) -> list[str]:
        """Messages for every call keyword outside the trained range (empty: all inside)."""
        out = []
        origin = f", per {self.source}" if self.source else ""
        for key, allowed in (
            ("height", self.trained_heights),
            ("width", self.trained_widths),
            ("max_sequence_length", self.trained_max_sequence_lengths),
        ):
            value = call.get(key)
            if value is None or not allowed or int(value) in allowed:
                continue
            trained = allowed[0] if len(allowed) == 1 else list(allowed)
            default = getattr(self, key)
            fix = (
                f"drop {key}= to use the trained {default}"
                if default is not None
                else f"pass {key}={trained}"
            )
            out.append(
                f"{key}={value} is outside what this pipeline was trained at "
                f"({key} {trained}{origin}): "
                f"expect meaningless output; {fix}"
            )
        return out


def default_num_inference_steps(pipeline: Any) -> int:
    """The one default-steps rule: 4 for schnell-style transformers (no guidance embedding,
    timestep-distilled), 28 for dev-style (guidance-embedded) ones."""
    guidance = bool(getattr(pipeline.transformer.config, "guidance_embeds", False))
    return 28 if guidance else 4


def read_call_defaults(folder: str | Path) -> CallDefaults | None:
    """The defaults stored in a pipeline folder, or ``None`` if it has no such file.

    Raises:
        ValueError: a file that is not valid (see :meth:`CallDefaults.from_json`).
    """
    path = Path(folder) / CALL_DEFAULTS_FILE
    if not os.path.lexists(path):
        return None
    data = read_json(path, "call-defaults file (rewrite it with write_call_defaults())")
    return CallDefaults.from_json(data, source=str(path))


def write_call_defaults(folder: str | Path, defaults: CallDefaults) -> Path:
    """Store ``defaults`` in a pipeline folder (atomically); returns the file's path."""
    return atomic_write_json(Path(folder) / CALL_DEFAULTS_FILE, defaults.to_json())


def set_call_defaults(pipeline: Any, defaults: CallDefaults | None) -> None:
    """Attach ``defaults`` to a pipeline object (``None`` detaches them)."""
    if defaults is None:
        pipeline.__dict__.pop(_ATTR, None)
    else:
        object.__setattr__(pipeline, _ATTR, defaults)


def _local_folder(pipeline: Any) -> Path | None:
    config = getattr(pipeline, "config", None)
    name = (
        config.get("_name_or_path")
        if isinstance(config, dict)
        else getattr(config, "_name_or_path", None)
    )
    if not name:
        return None
    folder = Path(str(name))
    return folder if (folder / "model_index.json").is_file() else None


def call_defaults(pipeline: Any) -> CallDefaults:
    """A pipeline's own defaults: those its loader attached, else those of the folder it was
    loaded from (``config._name_or_path``), else diffusers' own with
    :func:`default_num_inference_steps`."""
    attached = getattr(pipeline, _ATTR, None)
    if isinstance(attached, CallDefaults):
        found: CallDefaults | None = attached
    else:
        folder = _local_folder(pipeline)
        found = read_call_defaults(folder) if folder is not None else None
    if found is None:
        found = CallDefaults(source="diffusers' defaults")
    if found.num_inference_steps is None:
        found = replace(found, num_inference_steps=default_num_inference_steps(pipeline))
    return found


def resolve(pipeline: Any, **overrides: Any) -> dict[str, Any]:
    """Call keywords for ``pipeline``: ``overrides`` (``None`` values dropped) plus its own
    defaults for the :data:`CALL_KEYS` not given. Other keywords pass through unchanged.

    Warns:
        TrainedRangeWarning: a height, width or T5 length outside the trained range.
    """
    defaults = call_defaults(pipeline)
    call = {**defaults.call_kwargs(), **{k: v for k, v in overrides.items() if v is not None}}
    for message in defaults.check(call):
        warnings.warn(message, TrainedRangeWarning, stacklevel=2)
    return call
