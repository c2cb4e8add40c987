"""The one pipeline loader: a ``FluxPipeline`` object, a local folder or a Hub id.

Every entry point (the CLI, ``FluxModel``, ``difract_ext.toy.load_shapes_pipeline``) loads through
:func:`load_pipeline`, which also attaches the pipeline's call defaults
(:mod:`difract_ext.flux.defaults`) so later calls can fill what the caller leaves out::

    pipe = load_pipeline("path/to/folder")       # or a hub id, or a pipeline object
    pipe(prompt, **resolve(pipe))                 # the folder's own size, T5 length, steps
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from difract_ext.flux.defaults import (
    CALL_DEFAULTS_FILE,
    CallDefaults,
    read_call_defaults,
    set_call_defaults,
)

logger = logging.getLogger(__name__)

__all__ = ["find_call_defaults", "hub_offline", "load_pipeline"]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read now, and as huggingface_hub read it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if isinstance(value, torch.dtype):
        return value
    raise ValueError(
        f"unknown dtype {dtype!r}; use a torch.dtype or a name like 'float32' / 'bfloat16'"
    )


def _looks_local(spec: str | Path) -> bool:
    """A path rather than a Hub id (``owner/name``: exactly one ``/``, no leading ``.``/``~``)."""
    text = str(spec)
    return (
        isinstance(spec, Path)
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") != 1
    )


def _hub_call_defaults(repo_id: str, revision: str | None, offline: bool) -> CallDefaults | None:
    """The defaults file of a Hub repo, or ``None`` if it has none (or cannot be reached)."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            repo_id, CALL_DEFAULTS_FILE, revision=revision, local_files_only=offline
        )
    except OSError:  # no such file / repo, offline without a cached copy, no network
        return None
    return read_call_defaults(Path(path).parent)


def find_call_defaults(spec: str | Path, revision: str | None = None) -> CallDefaults | None:
    """The call defaults stored with a folder or Hub id, without loading the pipeline."""
    folder = Path(spec).expanduser()
    if folder.is_dir() or _looks_local(spec):
        return read_call_defaults(folder)
    return _hub_call_defaults(str(spec), revision, hub_offline())


def load_pipeline(
    spec: Any,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    defaults: CallDefaults | None = None,
    pipeline_class: Any = None,
    **from_pretrained: Any,
) -> Any:
    """Load (or adopt) a diffusers pipeline and attach its call defaults.

    Args:
        spec: a ``DiffusionPipeline`` object (used as is), a local ``save_pretrained`` folder,
            or a Hub id (loaded with ``local_files_only`` when ``HF_HUB_OFFLINE`` is set).
        device: move every component there (default: leave where loaded, i.e. CPU).
        dtype: parameter dtype (``torch.float32`` or a name like ``"bfloat16"``).
        defaults: call defaults to attach instead of the folder's own (e.g. for another save of a
            model whose folder lacks the file).
        pipeline_class: the diffusers class to load with (default ``DiffusionPipeline``, which
            builds the class ``model_index.json`` declares).
        **from_pretrained: other ``from_pretrained`` arguments (``revision``, ``variant``...).

    Returns:
        the pipeline, progress bar disabled, with its call defaults attached when it has any
        (read them with :func:`difract_ext.flux.defaults.call_defaults`).

    Raises:
        FileNotFoundError: a local path that does not exist or has no ``model_index.json``.
    """
    from diffusers import DiffusionPipeline

    torch_dtype = _as_dtype(dtype)
    if isinstance(spec, DiffusionPipeline):
        pipe = spec
        if device is not None:
            pipe = pipe.to(device)
        if torch_dtype is not None:
            pipe = pipe.to(dtype=torch_dtype)
    else:
        if not isinstance(spec, (str, Path)):
            raise TypeError(
                f"load_pipeline takes a pipeline, a folder or a hub id, not {type(spec).__name__}"
            )
        cls = pipeline_class or DiffusionPipeline
        if torch_dtype is not None:
            from_pretrained.setdefault("torch_dtype", torch_dtype)
        folder = Path(spec).expanduser()
        if folder.is_dir() or _looks_local(spec):
            if not (folder / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"no pipeline at {folder} (missing model_index.json): give a folder written by "
                    "save_pretrained(), or a Hub id 'owner/name'"
                )
            from_pretrained.setdefault("local_files_only", True)
            pipe = cls.from_pretrained(str(folder), **from_pretrained)
            if defaults is None:
                defaults = read_call_defaults(folder)
        else:
            offline = hub_offline()
            from_pretrained.setdefault("local_files_only", offline)
            pipe = cls.from_pretrained(str(spec), **from_pretrained)
            if defaults is None:
                defaults = _hub_call_defaults(str(spec), from_pretrained.get("revision"), offline)
        if device is not None:
            pipe = pipe.to(device)
    if defaults is not None:
        set_call_defaults(pipe, defaults)
    pipe.set_progress_bar_config(disable=True)
    logger.debug("pipeline %s loaded; call defaults %s", type(pipe).__name__, defaults)
    return pipe
