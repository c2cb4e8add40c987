"""DifFRACT's released ``.pt`` checkpoints as our SAELens objects, and conversion to SAELens'
layout.

::

    tc = load_difract_checkpoint("temporal-aware-transcoders/transcoder_img_3.pt")
    tcs = load_difract_dir("temporal-aware-transcoders", layers=range(16))  # {Site: tc}
    convert_difract_dir("temporal-aware-transcoders", "converted/")  # SAE.load_from_disk-able

Loading memory-maps the file and keeps its tensors as they are (``W_enc``/``W_dec`` are transposed
views), so a 1.2 GB release file is not copied into RAM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata

from difract_ext._version import __version__
from difract_ext.adapters.dictionaries import (
    SAELENS_FILES,
    TimestepSAE,
    TimestepSAEConfig,
    TimestepTranscoder,
    TimestepTranscoderConfig,
    load_dictionary_folder,
)
from difract_ext.dictionary.difract_format import (
    ROLES,
    CheckpointError,
    from_dictionary_state_dict,
    load_state_dict_safely,
    parse_difract_filename,
    sha256_file,
    to_dictionary_state_dict,
    validate_difract_state_dict,
)
from difract_ext.flux.sites import (
    FLUX_SCHNELL,
    SCHNELL_TIMESTEPS,
    Site,
    check_stream,
    dictionary_metadata,
)
from difract_ext.util.atomic import atomic_write_json, atomic_write_with, check_replaceable
from difract_ext.util.files import BadFileError, read_json

logger = logging.getLogger(__name__)

Dictionary = TimestepTranscoder | TimestepSAE

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def load_difract_checkpoint(
    path: str | Path,
    *,
    role: str | None = None,
    stream: str | None = None,
    layer: int | None = None,
    model_name: str = FLUX_SCHNELL,
    trained_timesteps: Sequence[float] | None = SCHNELL_TIMESTEPS,
    device: str = "cpu",
    dtype: str | None = None,
    mmap: bool = True,
    decoder_norm_atol: float | None = 1e-4,
    verify: bool = True,
) -> Dictionary:
    """Load one DifFRACT checkpoint as a :class:`TimestepTranscoder` or :class:`TimestepSAE`.

    Args:
        path: a ``{transcoder|sae}_{img|txt}_{layer}.pt`` file.
        role, stream, layer: override (or supply, for other file names) what the name says.
        model_name: recorded in the SAELens metadata.
        trained_timesteps: the t values the dictionary was trained on (schnell's four by default);
            other values log a warning. None disables the check.
        device, dtype: where to put it; ``dtype=None`` keeps the file's dtype (and its memory map).
        mmap: memory-map the file instead of reading it into RAM.
        decoder_norm_atol: tolerance of the unit-norm decoder check; None skips it.
        verify: check the file's CRC-32 checksums first (~1 s per GB, flat memory).

    Raises:
        CheckpointError: unsafe, corrupt or malformed files (NaN/inf weights included), with the
            file and key named.
    """
    path = Path(path)
    if role is None or stream is None or layer is None:
        parsed = parse_difract_filename(path)
        role = role or parsed.role
        stream = stream or parsed.stream
        layer = parsed.layer if layer is None else layer
    if role not in ROLES:
        raise CheckpointError(f"{path.name}: unknown role {role!r}; expected one of {ROLES}")
    try:
        site = Site(layer=int(layer), stream=check_stream(stream))
    except ValueError as err:
        raise CheckpointError(f"{path.name}: {err}") from err
    sd = load_state_dict_safely(path, mmap=mmap, verify=verify)
    dims = validate_difract_state_dict(sd, where=str(path), decoder_norm_atol=decoder_norm_atol)
    file_dtype = _DTYPE_NAMES.get(sd["decoder.weight"].dtype, "float32")
    metadata = dictionary_metadata(site, role, model_name, source="DifFRACT", source_file=path.name)
    common: dict[str, Any] = {
        "d_in": dims.d_model,
        "d_sae": dims.d_feat,
        "d_t_embed": dims.d_t,
        "dtype": file_dtype,
        "device": "meta",
        "trained_timesteps": None if trained_timesteps is None else list(trained_timesteps),
        "metadata": SAEMetadata(**metadata),
    }
    if role == "transcoder":
        module: Dictionary = TimestepTranscoder(
            TimestepTranscoderConfig(d_out=dims.d_model, **common)
        )
    else:
        module = TimestepSAE(TimestepSAEConfig(**common))
    module.cfg.device = device
    state = to_dictionary_state_dict(sd)
    module.prepare_state_dict(state)  # checked above; no copies for a memory-mapped file
    module.load_state_dict(state, strict=True, assign=True)
    target = dtype or file_dtype
    return module.to(device=device, dtype=getattr(torch, target))


def save_difract_checkpoint(module: Dictionary, path: str | Path) -> Path:
    """Write a ReLU dictionary in DifFRACT's ``.pt`` layout (a plain state dict), atomically.

    Useful for stand-in files and for handing our dictionaries to DifFRACT's own code.
    """
    if module.activation.kind != "relu":
        raise CheckpointError(
            f"DifFRACT's format has no {module.activation.kind!r} activation; only ReLU "
            "dictionaries can be written as .pt files (use save_model for the SAELens layout)"
        )
    path = Path(path)
    sd = from_dictionary_state_dict({k: v.detach().cpu() for k, v in module.state_dict().items()})
    return atomic_write_with(path, lambda tmp: torch.save(sd, tmp))


def _discover(folder: Path, prefix: str, streams: Sequence[str]) -> dict[Site, Path]:
    found: dict[Site, Path] = {}
    for file in sorted(folder.glob(f"{prefix}_*.pt")):
        try:
            name = parse_difract_filename(file)
        except CheckpointError:
            continue
        if name.role == prefix and name.stream in streams:
            site = Site(name.layer, name.stream)
            if site in found:
                raise CheckpointError(
                    f"{folder}: two files for {prefix} {site}: {found[site].name} and {file.name}; "
                    "remove or rename one (e.g. transcoder_img_03.pt is layer 3 too)"
                )
            found[site] = file
    return found


def load_difract_dir(
    folder: str | Path,
    layers: Iterable[int] | None = None,
    streams: Sequence[str] = ("img", "txt"),
    prefix: str = "transcoder",
    skip_missing: bool = False,
    **kwargs: Any,
) -> dict[Site, Dictionary]:
    """Load ``{prefix}_{stream}_{layer}.pt`` files from a folder, keyed :class:`Site`.

    Args:
        folder: e.g. DifFRACT's ``temporal-aware-transcoders/``.
        layers: which layers; None loads every layer present.
        streams: any of ``"img"``, ``"txt"``.
        prefix: ``"transcoder"`` or ``"sae"``.
        skip_missing: skip requested files that are absent instead of raising.
        **kwargs: passed to :func:`load_difract_checkpoint`.

    Raises:
        CheckpointError: a requested layer or stream has no file (unless ``skip_missing``).
    """
    folder = Path(folder)
    if prefix not in ROLES:
        raise CheckpointError(f"prefix must be one of {ROLES}, got {prefix!r}")
    for s in streams:
        check_stream(s)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    found = _discover(folder, prefix, streams)
    if layers is None:
        wanted = sorted(found)
        if not wanted:
            raise CheckpointError(f"{folder}: no {prefix}_{{img,txt}}_{{layer}}.pt files found")
    else:
        wanted = [Site(int(layer), s) for layer in layers for s in streams]
    out: dict[Site, Dictionary] = {}
    for key in wanted:
        if key not in found:
            if skip_missing:
                logger.info("skipping missing %s_%s.pt", prefix, key)
                continue
            have = sorted(site.layer for site in found if site.stream == key.stream)
            raise CheckpointError(
                f"{folder}: missing layer {key.layer} for stream {key.stream!r}: expected "
                f"{prefix}_{key}.pt; layers present for {key.stream!r}: {have}. "
                "Pass skip_missing=True to load what exists."
            )
        out[key] = load_difract_checkpoint(found[key], **kwargs)
    return out


MANIFEST = "manifest.json"


def _previous_conversion(dst: Path) -> dict[str, dict[str, Any]]:
    """The entries (by ``path``) of an earlier ``difract convert`` into ``dst``; ``{}`` for a new
    or empty folder.

    Raises:
        FileExistsError: ``dst`` is not a folder, or holds files but no manifest of ours.
    """
    if not os.path.lexists(dst):
        return {}
    if dst.is_symlink() or not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder; choose another output folder")
    if not any(dst.iterdir()):
        return {}
    manifest = dst / MANIFEST
    refuse = (
        f"{dst} is not empty and was not written by `difract convert` (no {MANIFEST} of ours); "
        "converting into it could overwrite your files, so nothing was written. Choose a new or "
        "empty output folder"
    )
    if not os.path.lexists(manifest):
        raise FileExistsError(refuse)
    try:
        data = read_json(manifest, "conversion manifest", required=["converted_by", "files"])
    except BadFileError as e:
        raise FileExistsError(f"{refuse} ({e})") from None
    files = data["files"]
    if not str(data["converted_by"]).startswith("difract-ext") or not isinstance(files, list):
        raise FileExistsError(refuse)
    return {str(e["path"]): e for e in files if isinstance(e, dict) and "path" in e}


def convert_difract_dir(
    src: str | Path,
    dst: str | Path,
    prefixes: Sequence[str] = ROLES,
    streams: Sequence[str] = ("img", "txt"),
    **kwargs: Any,
) -> Path:
    """Convert every DifFRACT file in ``src`` to SAELens' layout under ``dst``.

    Writes ``dst/{transcoders,saes}/{stream}_{layer}/{cfg.json, sae_weights.safetensors}`` (each
    atomically) and ``dst/manifest.json`` listing source file, SHA-256, role, stream, layer and
    sizes. Each result loads with ``SAE.load_from_disk`` once ``difract_ext`` is imported.

    ``dst`` must be new, empty, or an earlier conversion's folder (its manifest says which
    sub-folders are ours); only those sub-folders are replaced, and only while they hold nothing
    but the two files. Everything is checked before anything is written; nothing else is ever
    deleted. Entries of the earlier manifest that are not converted again are kept.

    Returns:
        The manifest path.

    Raises:
        CheckpointError: no checkpoints in ``src``, or a bad checkpoint.
        FileExistsError: ``dst`` holds files this tool did not write.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    targets = [
        (file, Path(f"{prefix}s") / str(site))
        for prefix in prefixes
        for site, file in sorted(_discover(src, prefix, streams).items())
    ]
    if not targets:
        raise CheckpointError(f"{src}: no DifFRACT checkpoints ({'/'.join(prefixes)}_*.pt) found")
    previous = _previous_conversion(dst)
    for _, rel in targets:
        if os.path.lexists(dst / rel):
            if rel.as_posix() not in previous:
                raise FileExistsError(
                    f"{dst / rel} exists but is not listed in {dst / MANIFEST}; it is not ours to "
                    "replace. Move it away or choose another output folder"
                )
            check_replaceable(dst / rel, SAELENS_FILES)
    entries: list[dict[str, Any]] = []
    for file, rel in targets:
        module = load_difract_checkpoint(file, **kwargs)
        module.save_model(dst / rel)
        entries.append(
            {
                "source_file": file.name,
                "sha256": sha256_file(file),
                "role": module.role,
                "stream": module.cfg.metadata.stream,
                "layer": module.cfg.metadata.layer,
                "d_in": module.cfg.d_in,
                "d_sae": module.cfg.d_sae,
                "path": rel.as_posix(),
                "architecture": module.cfg.architecture(),
            }
        )
        logger.info("converted %s -> %s", file.name, rel)
    written = {e["path"] for e in entries}
    kept = [e for p, e in sorted(previous.items()) if p not in written]
    return atomic_write_json(
        dst / MANIFEST,
        {
            "converted_by": f"difract-ext {__version__}",
            "source_dir": str(src),
            "files": entries + kept,
        },
    )


def _role_of(module: Any) -> str:
    return "transcoder" if isinstance(module, TimestepTranscoder) else "sae"


def load_dictionary_dir(
    path: str | Path,
    role: str = "transcoder",
    layers: Iterable[int] | None = None,
    streams: Sequence[str] = ("img", "txt"),
    device: str = "cpu",
) -> dict[Site, Dictionary]:
    """Every dictionary of one role in a folder, keyed :class:`Site`.

    Reads SAELens folders (``**/cfg.json``, e.g. ``difract train`` output or ``difract convert``
    output) or, when there are none, DifFRACT ``{role}_{stream}_{layer}.pt`` files.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        CheckpointError: no dictionary of that role; a folder whose metadata names no site; or
            several dictionaries for one site (they are listed: pass the one you mean).
    """
    if role not in ROLES:
        raise CheckpointError(f"role must be one of {ROLES}, got {role!r}")
    for s in streams:
        check_stream(s)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dictionary folder")
    wanted_layers = None if layers is None else {int(x) for x in layers}
    found: dict[Site, list[tuple[Path, Dictionary]]] = {}
    others: list[str] = []
    for cfg in sorted(root.glob("**/cfg.json")):
        if any(part.startswith(".") for part in cfg.relative_to(root).parts):
            continue  # unfinished atomic writes (hidden temporaries) are never results
        module = load_dictionary_folder(cfg.parent, device=device)
        if _role_of(module) != role:
            others.append(str(cfg.parent))
            continue
        md = module.cfg.metadata
        if getattr(md, "layer", None) is None or getattr(md, "stream", None) is None:
            raise CheckpointError(f"{cfg.parent}/cfg.json: metadata names no layer/stream")
        site = Site(int(md.layer), str(md.stream))
        if site.stream in streams and (wanted_layers is None or site.layer in wanted_layers):
            found.setdefault(site, []).append((cfg.parent, module))
    if not found and not others:
        return load_difract_dir(
            root, layers=wanted_layers, streams=streams, prefix=role, device=device
        )
    loose = _discover(root, role, streams)
    if loose:
        raise CheckpointError(
            f"{root}: holds both SAELens folders and DifFRACT files "
            f"({', '.join(p.name for p in loose.values())}); which one is meant is unclear. Pass "
            "a folder with one kind (e.g. move the .pt files, or convert them with difract convert)"
        )
    clashes = {site: [str(p) for p, _ in items] for site, items in found.items() if len(items) > 1}
    if clashes:
        lines = "; ".join(f"{site}: {', '.join(paths)}" for site, paths in sorted(clashes.items()))
        raise CheckpointError(
            f"{root}: several {role}s for one site ({lines}); pass the folder of the one you mean "
            "(e.g. the variant's own sub-folder)"
        )
    if not found:
        raise CheckpointError(
            f"{root}: no {role} here (found {len(others)} dictionaries of the other role, e.g. "
            f"{others[0]}); pass role='{'sae' if role == 'transcoder' else 'transcoder'}' or "
            "another folder"
        )
    return {site: items[0][1] for site, items in sorted(found.items())}


def load_shapes_dictionaries(
    role: str = "transcoder",
    layers: Iterable[int] | None = None,
    streams: Sequence[str] = ("img", "txt"),
) -> dict[Site, Dictionary]:
    """The dictionaries shipped with the shapes model, keyed :class:`Site`.

    Args:
        role: ``"transcoder"`` (all 8 double-block MLPs) or ``"sae"`` (layers 1–2).
        layers: which double blocks (None: all shipped).
        streams: ``"img"`` and/or ``"txt"``.
    """
    from difract_ext.toy.pipeline import shapes_dictionaries_path

    return load_dictionary_dir(
        shapes_dictionaries_path() / f"{role}s", role=role, layers=layers, streams=streams
    )
