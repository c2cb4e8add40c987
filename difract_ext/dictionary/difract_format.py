"""Reading DifFRACT's released checkpoints (``{transcoder,sae}_{img,txt}_{layer}.pt``).

A DifFRACT file is a plain ``state_dict`` of a ``TemporalAwareTranscoder`` (the SAE baseline has
the same keys): ``time_mlp.{0,2}.{weight,bias}``, ``mod_linear.{weight,bias}`` (scale rows first,
then shift), ``encoder.{weight,bias}`` (``[d_feat, d_model]``) and ``decoder.{weight,bias}``
(``[d_model, d_feat]``, unit-norm columns). This module reads and validates such a file without
copying its tensors (``torch.load(weights_only=True, mmap=True)``) and maps it to our parameter
names (``W_enc = encoder.weightᵀ``, ``W_dec = decoder.weightᵀ``: views, not copies).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from difract_ext.util.files import check_regular_file
from difract_ext.util.finite import nonfinite

STREAMS: tuple[str, ...] = ("img", "txt")
ROLES: tuple[str, ...] = ("transcoder", "sae")
_NAME = re.compile(r"^(?P<role>[A-Za-z]+)_(?P<stream>[A-Za-z]+)_(?P<layer>\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or not in the expected layout."""


@dataclass(frozen=True)
class DifFRACTFileName:
    """What a DifFRACT file name says: ``{role}_{stream}_{layer}.pt``."""

    role: str
    stream: str
    layer: int

    @property
    def filename(self) -> str:
        return f"{self.role}_{self.stream}_{self.layer}.pt"


@dataclass(frozen=True)
class DifFRACTDims:
    """Sizes read off a checkpoint's tensors."""

    d_model: int
    d_feat: int
    d_t: int


def parse_difract_filename(path: str | Path) -> DifFRACTFileName:
    """Parse ``transcoder_img_3.pt`` into role, stream and layer.

    Raises:
        CheckpointError: if the name does not follow ``{transcoder|sae}_{img|txt}_{layer}.pt``.
    """
    name = Path(path).name
    m = _NAME.match(name)
    if m is None:
        raise CheckpointError(
            f"{name}: cannot read role/stream/layer from the file name; DifFRACT files are named "
            "'{transcoder|sae}_{img|txt}_{layer}.pt' (e.g. transcoder_img_3.pt). Pass role=, "
            "stream= and layer= explicitly for other names."
        )
    role, stream = m["role"], m["stream"]
    if role not in ROLES:
        raise CheckpointError(f"{name}: unknown role {role!r}; expected one of {ROLES}")
    if stream not in STREAMS:
        raise CheckpointError(
            f"{name}: unknown stream {stream!r}; expected one of {STREAMS} "
            "(img = FLUX's image MLP `ff`, txt = the text MLP `ff_context`)"
        )
    return DifFRACTFileName(role=role, stream=stream, layer=int(m["layer"]))


def expected_shapes(d_model: int, d_feat: int, d_t: int) -> dict[str, tuple[int, ...]]:
    """The 10 keys of a DifFRACT state dict and their shapes."""
    return {
        "time_mlp.0.weight": (d_t, d_t),
        "time_mlp.0.bias": (d_t,),
        "time_mlp.2.weight": (d_t, d_t),
        "time_mlp.2.bias": (d_t,),
        "mod_linear.weight": (2 * d_model, d_t),
        "mod_linear.bias": (2 * d_model,),
        "encoder.weight": (d_feat, d_model),
        "encoder.bias": (d_feat,),
        "decoder.weight": (d_model, d_feat),
        "decoder.bias": (d_model,),
    }


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_zip_checksums(path: str | Path) -> None:
    """Check the CRC-32 of every record of a zip-format ``.pt`` file (``torch.load`` never does).

    Streams each record in 1 MiB blocks (memory stays flat; ~1 s per GB). Files in the legacy,
    non-zip ``torch.save`` format carry no checksums and pass unchecked.

    Raises:
        CheckpointError: a record whose bytes do not match its checksum, or a broken zip.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt checkpoint ({err}); download it again") from err
    if bad is not None:
        raise CheckpointError(
            f"{path}: record {bad!r} fails its CRC-32 check: the file is corrupt (flipped or "
            "truncated bytes); download or copy it again"
        )


def load_state_dict_safely(
    path: str | Path, mmap: bool = True, verify: bool = True
) -> dict[str, torch.Tensor]:
    """``torch.load`` restricted to tensors (``weights_only=True``), memory-mapped when possible.

    Args:
        path: the ``.pt`` file.
        mmap: memory-map it instead of reading it into RAM.
        verify: check every record's CRC-32 first (:func:`verify_zip_checksums`).

    Raises:
        CheckpointError: missing or non-regular file, corrupt bytes, pickled code or objects, or
            not a dict of tensors.
    """
    path = Path(path)
    try:
        check_regular_file(path, "checkpoint file")
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(str(err)) from None
    if verify:
        verify_zip_checksums(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if not mmap or "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "GLOBAL" not in msg:  # no blocked global: the bytes are not a checkpoint at all
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_reason(msg)})"
            ) from err
        first = _reason(msg)
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled Python code or objects, which "
            f"weights-only loading forbids ({first}). DifFRACT checkpoints are plain state dicts "
            "of tensors. If you trust the file's origin, re-save its tensors only: "
            "torch.save(dict(state_dict), new_path)."
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a state dict (dict of tensors), found {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            hint = (
                " (a nested checkpoint? pass its 'state_dict' entry)"
                if isinstance(value, dict)
                else ""
            )
            raise CheckpointError(
                f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor{hint}"
            )
    return obj


def _reason(msg: str) -> str:
    """The informative line of a torch.load error (its preamble is generic)."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln
    return lines[-1] if lines else "unknown error"


def validate_difract_state_dict(
    sd: dict[str, torch.Tensor], where: str, decoder_norm_atol: float | None = 1e-4
) -> DifFRACTDims:
    """Check a DifFRACT state dict: exact key set, shapes, float dtype, finite values (no NaN or
    ±inf anywhere), unit decoder columns.

    Args:
        sd: the loaded state dict.
        where: the file name, used in error messages.
        decoder_norm_atol: tolerance on ``| ‖decoder.weight[:, i]‖ − 1 |``; None skips the check.

    Raises:
        CheckpointError: naming the file and the offending key.
    """
    keys = set(sd)
    for probe in ("decoder.bias", "encoder.bias", "time_mlp.0.bias"):
        if probe not in keys:
            raise CheckpointError(
                f"{where}: missing key {probe!r}; a DifFRACT checkpoint has the keys "
                f"{sorted(expected_shapes(1, 1, 1))}. Found: {sorted(keys)[:12]}"
            )
    dims = DifFRACTDims(
        d_model=int(sd["decoder.bias"].shape[0]),
        d_feat=int(sd["encoder.bias"].shape[0]),
        d_t=int(sd["time_mlp.0.bias"].shape[0]),
    )
    shapes = expected_shapes(dims.d_model, dims.d_feat, dims.d_t)
    missing = sorted(set(shapes) - keys)
    unexpected = sorted(keys - set(shapes))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r} (all missing: {missing})")
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected key {unexpected[0]!r} (all unexpected: {unexpected}); a DifFRACT "
            f"checkpoint has exactly {sorted(shapes)}"
        )
    for key, shape in shapes.items():
        got = tuple(sd[key].shape)
        if got != shape:
            raise CheckpointError(
                f"{where}: key {key!r} has shape {list(got)}, expected {list(shape)} "
                f"(d_model={dims.d_model}, d_feat={dims.d_feat}, d_t={dims.d_t} "
                "read from the biases)"
            )
        if not sd[key].is_floating_point():
            raise CheckpointError(
                f"{where}: key {key!r} has dtype {sd[key].dtype}, expected a float"
            )
    dtypes = {sd[k].dtype for k in shapes}
    if len(dtypes) > 1:
        raise CheckpointError(f"{where}: mixed dtypes {sorted(map(str, dtypes))}; expected one")
    check_finite(sd, where)
    if decoder_norm_atol is not None:
        norms = sd["decoder.weight"].float().norm(dim=0)
        dev = (norms - 1).abs()
        if not float(dev.max()) <= decoder_norm_atol:  # NaN-safe: a NaN norm fails too
            worst = int(dev.argmax())
            raise CheckpointError(
                f"{where}: key 'decoder.weight' has non-unit columns "
                f"({int((dev > decoder_norm_atol).sum())} of {dev.numel()}; feature {worst} has "
                f"norm {float(norms[worst]):.6f}, tolerance {decoder_norm_atol}). DifFRACT "
                "renormalises every decoder column to 1, so this is not a DifFRACT checkpoint or "
                "it is corrupted; pass decoder_norm_atol=None to load anyway."
            )
    return dims


def check_finite(sd: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or ±inf anywhere in ``sd`` (blockwise: no full-size mask, ~5 GB/s).

    Raises:
        CheckpointError: naming ``where``, the key, how many entries and the first one.
    """
    for key, value in sd.items():
        count, first = nonfinite(value)
        if count:
            raise CheckpointError(
                f"{where}: key {key!r} holds {count} NaN/inf value(s) of {value.numel()} (first at "
                f"index {list(first or ())}); the weights are corrupt or diverged in training. "
                "Use another file, or retrain"
            )


def to_dictionary_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a DifFRACT state dict to our (SAELens-orientation) parameter names, without copies.

    ``W_enc [d_model, d_feat] = encoder.weightᵀ``, ``W_dec [d_feat, d_model] = decoder.weightᵀ``;
    biases and the time-conditioning keys are kept as they are.
    """
    out = {k: v for k, v in sd.items() if k.startswith(("time_mlp.", "mod_linear."))}
    out["W_enc"] = sd["encoder.weight"].T
    out["b_enc"] = sd["encoder.bias"]
    out["W_dec"] = sd["decoder.weight"].T
    out["b_dec"] = sd["decoder.bias"]
    return out


def from_dictionary_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_dictionary_state_dict`: our names back to DifFRACT's (contiguous)."""
    out = {k: v.contiguous() for k, v in sd.items() if k.startswith(("time_mlp.", "mod_linear."))}
    out["encoder.weight"] = sd["W_enc"].T.contiguous()
    out["encoder.bias"] = sd["b_enc"].contiguous()
    out["decoder.weight"] = sd["W_dec"].T.contiguous()
    out["decoder.bias"] = sd["b_dec"].contiguous()
    return out
