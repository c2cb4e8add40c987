"""What a dictionary was trained for: its *role* and its *site*, read by duck typing.

A **transcoder** reads an MLP's input and writes its output (``[..., d_in] -> [..., d_out]``); an
**SAE** here reads and writes the MLP *output*. Only a transcoder can stand in for an MLP, so
splicing, tracing and attribution check the role (and the site) of every dictionary they are
given. Nothing here imports SAELens: a dictionary is read through

1. a ``role`` attribute (``"transcoder"`` / ``"sae"``), as our SAELens classes have;
2. its config: a ``d_out`` field (SAELens' ``TranscoderConfig``) means a transcoder;
3. its SAELens metadata: ``hook_name_out`` means a transcoder; a ``hook_name`` ending in
   ``.output`` (and no ``hook_name_out``) means a dictionary of the MLP output, i.e. an SAE.

A dictionary none of these describe (e.g. a plain test module) has an unknown role and passes.
"""

from __future__ import annotations

import re
from typing import Any

from difract_ext.flux.sites import STREAM_MODULES, Site, SiteError

ROLES: tuple[str, ...] = ("transcoder", "sae")
_HOOK_RE = re.compile(
    r"^transformer_blocks\.(?P<layer>\d+)\.(?P<module>ff|ff_context)\.(?P<end>input|output)$"
)
_STREAM_OF_MODULE = {module: stream for stream, module in STREAM_MODULES.items()}


class DictionaryRoleError(SiteError):
    """A dictionary used in a role it was not trained for (an SAE where a transcoder is needed)."""


class DictionarySiteError(SiteError):
    """A dictionary used at another site than the one its metadata names."""


def _metadata(dictionary: Any) -> Any:
    return getattr(getattr(dictionary, "cfg", None), "metadata", None)


def _meta_get(metadata: Any, key: str) -> Any:
    if metadata is None:
        return None
    getter = getattr(metadata, "get", None)
    return getter(key) if callable(getter) else getattr(metadata, key, None)


def dictionary_role(dictionary: Any) -> str | None:
    """``"transcoder"``, ``"sae"`` or None (unknown), by the rules in the module docstring."""
    role = getattr(dictionary, "role", None)
    if isinstance(role, str) and role in ROLES:
        return role
    cfg = getattr(dictionary, "cfg", None)
    if cfg is not None and getattr(cfg, "d_out", None) is not None:
        return "transcoder"
    meta = _metadata(dictionary)
    if _meta_get(meta, "hook_name_out"):
        return "transcoder"
    hook = _meta_get(meta, "hook_name")
    if isinstance(hook, str) and hook.endswith(".output"):
        return "sae"
    return None


def dictionary_site(dictionary: Any) -> Site | None:
    """The site its metadata names (``layer`` + ``stream``, else the FLUX module in ``hook_name``),
    or None when the metadata names none."""
    meta = _metadata(dictionary)
    layer, stream = _meta_get(meta, "layer"), _meta_get(meta, "stream")
    if layer is not None and stream is not None:
        try:
            return Site(int(layer), str(stream))
        except (SiteError, TypeError, ValueError):
            return None
    hook = _meta_get(meta, "hook_name")
    m = _HOOK_RE.match(hook) if isinstance(hook, str) else None
    if m is None:
        return None
    return Site(int(m.group("layer")), _STREAM_OF_MODULE[m.group("module")])


def check_transcoder(site: Site, dictionary: Any, where: str = "here") -> None:
    """Raise if ``dictionary`` is not a transcoder, or if its metadata names another site.

    Args:
        site: where it is about to be used.
        dictionary: the dictionary.
        where: what needs it, for the message (e.g. ``"attach_transcoders"``).

    Raises:
        DictionaryRoleError: an SAE (or another non-transcoder) where a transcoder is needed.
        DictionarySiteError: its metadata names another site.
    """
    role = dictionary_role(dictionary)
    if role is not None and role != "transcoder":
        hook = _meta_get(_metadata(dictionary), "hook_name")
        trained_on = f" (trained on {hook!r})" if hook else ""
        raise DictionaryRoleError(
            f"{where} needs a transcoder (MLP input -> MLP output) at {site}, "
            f"but got an SAE{trained_on}"
            ": an SAE reconstructs the MLP output and cannot replace the MLP. "
            f"Load the transcoder instead, e.g. load_dictionary_dir(path, role='transcoder') or "
            f"load_shapes_dictionaries(role='transcoder')"
        )
    named = dictionary_site(dictionary)
    if named is not None and named != site:
        raise DictionarySiteError(
            f"the dictionary given for site {site} was trained at {named} (its metadata names "
            f"{named.module_path}); key it by Site({named.layer}, {named.stream!r}) ('{named}'), "
            "or "
            f"pass the dictionary trained at {site}"
        )


__all__ = [
    "ROLES",
    "DictionaryRoleError",
    "DictionarySiteError",
    "check_transcoder",
    "dictionary_role",
    "dictionary_site",
]
