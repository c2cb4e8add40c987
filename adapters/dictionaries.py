"""Conditioned transcoders and SAEs as real SAELens objects.

``TimestepTranscoder`` subclasses SAELens' ``Transcoder`` and ``TimestepSAE`` its ``StandardSAE``;
both are registered (on import of ``difract_ext``) under the architecture keys
``difract_timestep_transcoder`` and ``difract_timestep_sae``, so ``SAE.load_from_disk`` and
``SAE.from_pretrained`` return them. The math lives in
:class:`difract_ext.dictionary.TimestepConditioned`; this module wires it to SAELens' hooks,
config and file format.

Passing t::

    z = tc.encode(x, t=0.5)                # explicit
    with tc.timestep(0.5):                 # scoped, for SAELens callers that pass only x
        y = tc(x)

Saved layout: ``cfg.json`` (SAELens fields + the conditioning convention + metadata) and
``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``,
``b_dec``, ``time_mlp.{0,2}.{weight,bias}``, ``mod_linear.{weight,bias}`` (+ ``threshold``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from safetensors import SafetensorError, safe_open
from typing_extensions import override

from difract_ext.dictionary.conditioning import (
    ConditioningFields,
    TimestepConditioned,
    as_aligned,
    as_feature_major,
)
from difract_ext.dictionary.difract_format import CheckpointError, check_finite
from difract_ext.dictionary.timestep import TimestepLike
from difract_ext.flux.sites import STREAMS, Site
from difract_ext.util.atomic import atomic_directory
from difract_ext.util.config import ConfigError, check_value
from difract_ext.util.files import BadFileError, read_json, read_safetensors_header

logger = logging.getLogger(__name__)

TRANSCODER_ARCHITECTURE = "difract_timestep_transcoder"
SAE_ARCHITECTURE = "difract_timestep_sae"
#: the files of one saved dictionary (what :meth:`save_model` may replace in a folder)
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_CHECKED_FIELDS = ("d_in", "d_sae", "d_out", "dtype", "apply_b_dec_to_input") + tuple(
    f.name for f in dataclasses.fields(ConditioningFields)
)
_FLUX_HOOK = re.compile(r"^transformer_blocks\.\d+\.(ff|ff_context)\.(input|output)$")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_types(cfg: Any) -> None:
    """Every field we rely on has its annotated type (a bool is a bool, not ``"false"``)."""
    hints = _hints(type(cfg))
    for name in _CHECKED_FIELDS:
        if name in hints:
            setattr(cfg, name, check_value(hints[name], getattr(cfg, name), name))
    for name in ("d_in", "d_sae", "d_out", "d_t_embed"):
        if getattr(cfg, name, 1) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype: must be one of {FLOAT_DTYPES}, got {cfg.dtype!r}")
    if cfg.activation == "topk" and isinstance(cfg.k, int) and cfg.k > cfg.d_sae:
        raise ConfigError(f"k: {cfg.k} active features of d_sae={cfg.d_sae}; k must be <= d_sae")


def _check_metadata(md: SAEMetadata, role: str) -> None:
    """The metadata's site and hooks are well-typed and fit ``role``."""
    layer, stream = getattr(md, "layer", None), getattr(md, "stream", None)
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ConfigError(f"metadata.layer: must be a non-negative integer, got {layer!r}")
    if stream is not None and stream not in STREAMS:
        raise ConfigError(f"metadata.stream: must be one of {STREAMS}, got {stream!r}")
    hook, hook_out = getattr(md, "hook_name", None), getattr(md, "hook_name_out", None)
    if role == "sae" and hook_out is not None:
        raise ConfigError(
            f"metadata names hook_name_out={hook_out!r}, which only a transcoder has, but the "
            f"architecture is {SAE_ARCHITECTURE!r}: transcoder weights under an SAE key? Use "
            f"architecture {TRANSCODER_ARCHITECTURE!r} (with d_out) for a transcoder"
        )
    if isinstance(hook, str) and _FLUX_HOOK.match(hook):
        site = Site(layer, stream) if layer is not None and stream is not None else None
        want = "input" if role == "transcoder" else "output"
        site_hook = None if site is None else (site.hook_in if want == "input" else site.hook_out)
        if not hook.endswith(f".{want}") or (site_hook is not None and hook != site_hook):
            expected = site_hook or f"an MLP {want} hook"
            raise ConfigError(
                f"metadata.hook_name={hook!r} does not fit a {role} at layer={layer!r}, "
                f"stream={stream!r} (expected {expected!r}): the metadata contradicts itself or "
                "names another dictionary's hook"
            )


def _check_plain(cfg: Any) -> None:
    if isinstance(cfg.metadata, dict):  # accept a plain dict as well as SAEMetadata
        cfg.metadata = SAEMetadata(**cfg.metadata)
    try:
        _check_types(cfg)
        _check_metadata(cfg.metadata, "transcoder" if hasattr(cfg, "d_out") else "sae")
    except ConfigError as e:
        raise ConfigError(f"{type(cfg).__name__}: {e}") from None
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"normalize_activations={cfg.normalize_activations!r} is not supported: the FiLM shift "
            "makes activation normalisation inexact; use 'none'"
        )
    if cfg.reshape_activations != "none":
        raise ValueError("reshape_activations must be 'none' for FLUX MLP dictionaries")


@dataclass
class TimestepTranscoderConfig(TranscoderConfig, ConditioningFields):
    """SAELens ``TranscoderConfig`` plus the timestep-conditioning convention."""

    apply_b_dec_to_input: bool = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return TRANSCODER_ARCHITECTURE

    def __post_init__(self) -> None:
        _check_plain(self)
        TranscoderConfig.__post_init__(self)
        self.validate_conditioning()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TimestepTranscoderConfig:  # type: ignore[override]
        """SAELens' ``from_dict`` after checking the keys (a transcoder's ``cfg.json`` has
        ``d_out``); values are type-checked by ``__post_init__``."""
        _check_keys(cls, config_dict, TRANSCODER_ARCHITECTURE)
        return super().from_dict(config_dict)


@dataclass
class TimestepSAEConfig(StandardSAEConfig, ConditioningFields):
    """SAELens ``StandardSAEConfig`` plus the timestep-conditioning convention."""

    apply_b_dec_to_input: bool = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return SAE_ARCHITECTURE

    def __post_init__(self) -> None:
        _check_plain(self)
        StandardSAEConfig.__post_init__(self)
        self.validate_conditioning()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TimestepSAEConfig:  # type: ignore[override]
        """SAELens' ``from_dict`` after checking the keys (an SAE's ``cfg.json`` has no
        ``d_out``); values are type-checked by ``__post_init__``."""
        _check_keys(cls, config_dict, SAE_ARCHITECTURE)
        return super().from_dict(config_dict)


def _check_keys(cls: type, d: Any, architecture: str) -> None:
    """Refuse a config dict of another architecture or role, or one missing a required key."""
    if not isinstance(d, dict):
        raise ConfigError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
    if d.get("architecture") != architecture:
        raise ConfigError(
            f"architecture is {d.get('architecture')!r}, expected {architecture!r} for "
            f"{cls.__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if architecture == TRANSCODER_ARCHITECTURE:
        required.append("d_out")  # SAELens defaults it to 768: never guess a width
    elif "d_out" in d:
        raise ConfigError(
            f"d_out={d['d_out']!r} is a transcoder's field, but the architecture is "
            f"{architecture!r}: transcoder weights under an SAE key? Use architecture "
            f"{TRANSCODER_ARCHITECTURE!r} for a transcoder"
        )
    missing = [n for n in required if n not in d]
    if missing:
        raise ConfigError(f"missing key(s) {missing} of {cls.__name__}")
    if not isinstance(d.get("metadata", {}), dict):
        raise ConfigError(f"metadata must be a JSON object, got {d['metadata']!r}")
    unknown = sorted(set(d) - set(fields) - {"architecture"})
    if unknown:
        logger.warning("%s: ignoring unknown config key(s) %s", cls.__name__, unknown)


class _SAELensConditioned(TimestepConditioned):
    """What both SAELens classes share: weights, t scoping, saving, folds."""

    cfg: Any

    def _build(self: Any, d_out: int) -> None:
        self.build_conditioning(
            self.cfg.d_in,
            self.cfg.d_sae,
            d_out,
            self.cfg.embedding_spec(),
            self.cfg.activation_spec(),
            dtype=self.dtype,
            device=self.device,
        )

    def get_activation_fn(self) -> Any:
        return self.activate  # bound method: follows the module through copies

    def _scoped(self, t: TimestepLike | None) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if t is None else self.timestep(t)

    def encode_with_hidden_pre(
        self: Any, x: torch.Tensor, t: TimestepLike | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., d_in]`` -> (activations, pre-activations), each ``[..., d_sae]``."""
        sae_in = self.process_sae_in(x)
        t_res = self.resolve_timestep(t, sae_in)
        hidden_pre = self.hook_sae_acts_pre(self.pre_activations(sae_in, t_res))
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    def encode(self, x: torch.Tensor, t: TimestepLike | None = None) -> torch.Tensor:
        """``x [..., d_in]`` at timestep ``t`` -> feature activations ``[..., d_sae]``."""
        return self.encode_with_hidden_pre(x, t)[0]

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            state_dict[key] = value.contiguous()  # safetensors stores contiguous tensors

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Refuse NaN/inf weights (naming the key), then lay the weights out for loading."""
        check_finite(state_dict, f"{type(self).__name__} weights")
        self.prepare_state_dict(state_dict)

    def prepare_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Feature-major, aligned storage (in place); no checks (the caller made them)."""
        for key, value in state_dict.items():
            if key in ("W_enc", "W_dec"):
                value = as_feature_major(value)
            state_dict[key] = as_aligned(value)

    def save_model(self: Any, path: str | Path) -> tuple[Path, Path]:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` to ``path`` atomically.

        An existing ``path`` is replaced only if it holds nothing but those two files.

        Raises:
            FileExistsError: ``path`` holds other files (they are never deleted).
        """
        path = Path(path)
        with atomic_directory(path, owned=SAELENS_FILES) as tmp:
            weights, cfg = SAE.save_model(self, tmp)
        return path / weights.name, path / cfg.name

    @torch.no_grad()
    def fold_W_dec_norm(self: Any) -> None:
        """Make decoder rows unit-norm, rescaling the encoder so that outputs are unchanged."""
        norms = self.W_dec.norm(dim=-1).clamp(min=1e-8)
        if self.activation.kind == "topk" and not torch.allclose(norms, torch.ones_like(norms)):
            raise NotImplementedError(
                "fold_W_dec_norm would change which features win the TopK; keep decoders unit-norm"
            )
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        if getattr(self, "threshold", None) is not None:
            self.threshold.mul_(norms)

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError(
            "activation-norm folding is inexact with a FiLM shift; these dictionaries take raw "
            "FLUX MLP activations (normalize_activations='none')"
        )

    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("activation whitening cannot be folded through a FiLM shift")


class TimestepTranscoder(_SAELensConditioned, Transcoder):
    """A timestep-conditioned transcoder: MLP input ``[..., d_in]`` -> MLP output ``[..., d_out]``.

    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]`` (unit rows),
    ``b_dec [d_out]``, plus ``time_mlp`` and ``mod_linear`` (FiLM on the input).
    """

    cfg: TimestepTranscoderConfig  # type: ignore[assignment]
    role: ClassVar[str] = "transcoder"  # read by difract_ext.flux.roles (no SAELens import there)

    def __init__(self, cfg: TimestepTranscoderConfig, use_error_term: bool = False):
        if use_error_term:
            raise ValueError(
                "transcoders have no error term inside forward(); see difract_ext.FluxModel"
            )
        super().__init__(cfg)

    @override
    def initialize_weights(self) -> None:
        self._build(self.cfg.d_out)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_out]``."""
        return self.hook_sae_recons(self.linear_decode(feature_acts))

    @override
    def forward(self, x: torch.Tensor, t: TimestepLike | None = None) -> torch.Tensor:  # type: ignore[override]
        """MLP input ``[..., d_in]`` at ``t`` -> reconstructed MLP output ``[..., d_out]``."""
        with self._scoped(t):
            return self.decode(self.encode(x))

    @override
    def forward_with_activations(  # type: ignore[override]
        self, x: torch.Tensor, t: TimestepLike | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output ``[..., d_out]``, feature activations ``[..., d_sae]``)."""
        with self._scoped(t):
            acts = self.encode(x)
            return self.decode(acts), acts

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TimestepTranscoder:  # type: ignore[override]
        return cls(TimestepTranscoderConfig.from_dict(config_dict))


class TimestepSAE(_SAELensConditioned, StandardSAE):
    """A timestep-conditioned SAE on an MLP output: ``[..., d_in] -> [..., d_in]``."""

    cfg: TimestepSAEConfig  # type: ignore[assignment]
    role: ClassVar[str] = "sae"  # an SAE of the MLP output: never a stand-in for the MLP

    @override
    def initialize_weights(self) -> None:
        self._build(self.cfg.d_in)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_in]``."""
        out = self.hook_sae_recons(self.linear_decode(feature_acts))
        return self.run_time_activation_norm_fn_out(out)

    @override
    def forward(self, x: torch.Tensor, t: TimestepLike | None = None) -> torch.Tensor:  # type: ignore[override]
        """``[..., d_in]`` at ``t`` -> reconstruction (plus SAELens' error term if enabled)."""
        with self._scoped(t):
            return SAE.forward(self, x)


ARCHITECTURES: dict[str, tuple[type[SAE[Any]], type[Any]]] = {
    TRANSCODER_ARCHITECTURE: (TimestepTranscoder, TimestepTranscoderConfig),
    SAE_ARCHITECTURE: (TimestepSAE, TimestepSAEConfig),
}


def register_architectures() -> None:
    """Register our classes in SAELens' registry. Idempotent.

    Raises:
        RuntimeError: if one of our keys is already taken by a different class.
    """
    for name, (cls, cfg_cls) in ARCHITECTURES.items():
        existing = SAE_CLASS_REGISTRY.get(name)
        if existing is None:
            register_sae_class(name, cls, cfg_cls)
        elif existing[0] is not cls:
            other = f"{existing[0].__module__}.{existing[0].__qualname__}"
            raise RuntimeError(
                f"SAELens architecture {name!r} is already registered to {other}, not to "
                f"{cls.__module__}.{cls.__qualname__}. Two copies of difract_ext imported, or "
                "another package uses our key; uninstall one of them."
            )


register_architectures()


class SAELensDictionaryIO:
    """The trainer's :class:`~difract_ext.training.dictionary_io.DictionaryIO` for SAELens.

    Builds :class:`TimestepTranscoder` / :class:`TimestepSAE`, writes SAELens folders
    (``cfg.json`` + ``sae_weights.safetensors``) and reads them with ``SAE.load_from_disk``.
    Use the shared instance :data:`SAELENS_IO`.
    """

    def build(
        self,
        role: str,
        d_model: int,
        d_sae: int,
        *,
        activation: str,
        k: int | None,
        d_t_embed: int,
        trained_timesteps: list[float] | None,
        metadata: dict[str, Any],
        device: str,
    ) -> TimestepTranscoder | TimestepSAE:
        """A fresh dictionary on ``[..., d_model]`` activations (from the global torch RNG)."""
        common: dict[str, Any] = dict(
            d_in=d_model,
            d_sae=d_sae,
            d_t_embed=d_t_embed,
            activation=activation,
            k=k,
            trained_timesteps=trained_timesteps,
            metadata=metadata,
            device=device,
        )
        if role == "transcoder":
            return TimestepTranscoder(TimestepTranscoderConfig(d_out=d_model, **common))
        if role == "sae":
            return TimestepSAE(TimestepSAEConfig(**common))
        raise ValueError(f"role must be 'transcoder' or 'sae', got {role!r}")

    def save(self, module: torch.nn.Module, path: Path) -> None:
        """Write ``module`` as a SAELens folder into ``path``.

        Raises:
            CheckpointError: NaN/inf weights (training diverged): nothing is written.
        """
        check_finite(
            {k: v.detach() for k, v in module.state_dict().items()}, f"dictionary for {path}"
        )
        SAE.save_model(module, path)  # type: ignore[arg-type]

    def load(self, path: Path, device: str) -> SAE[Any]:
        """Read a SAELens folder of ours, checked (:func:`load_dictionary_folder`)."""
        return load_dictionary_folder(path, device=device)

    def __repr__(self) -> str:
        return "SAELENS_IO"


#: the one :class:`SAELensDictionaryIO` (pass as ``io=`` to the trainer and the folder loaders)
SAELENS_IO = SAELensDictionaryIO()


def load_dictionary_folder(
    path: str | Path, device: str = "cpu", dtype: str | None = None
) -> TimestepTranscoder | TimestepSAE:
    """Read a SAELens folder of ours, checking everything before a tensor is read.

    ``SAE.load_from_disk`` gives the same module; this adds: ``cfg.json`` read bounded and
    type-checked, the weights' declared keys, shapes and dtypes (from the safetensors header)
    compared with what the config implies *before* anything is allocated, no silent cast of
    non-float weights, NaN/inf refused, and every error naming the file.

    Args:
        path: the folder (``cfg.json`` + ``sae_weights.safetensors``).
        device: where to put the module.
        dtype: override the config's dtype (a float dtype name).

    Raises:
        FileNotFoundError: a missing file.
        CheckpointError: anything else wrong, naming the file (and key).
    """
    folder = Path(path)
    cfg_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    try:
        cfg = read_json(cfg_path, "SAELens cfg.json", max_bytes=16 << 20)
    except BadFileError as e:
        raise CheckpointError(str(e)) from None
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{cfg_path}: architecture {arch!r} is not a difract-ext dictionary "
            f"({sorted(ARCHITECTURES)}); load other SAEs with sae_lens.SAE.load_from_disk"
        )
    cls, cfg_cls = ARCHITECTURES[arch]
    try:
        config = cfg_cls.from_dict({**cfg, "device": device, **({"dtype": dtype} if dtype else {})})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    try:
        header, _ = read_safetensors_header(weights, "SAELens weights file")
    except BadFileError as e:
        raise CheckpointError(str(e)) from None
    config.device = "meta"  # shapes without memory
    module = cls(config)
    module.cfg.device = device
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _check_declared(weights, header, expected, cfg_path)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in expected:
                state[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    check_finite(state, str(weights))
    target = getattr(torch, config.dtype)
    state = {k: v.to(target) for k, v in state.items()}
    module.prepare_state_dict(state)
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device=device, dtype=target)


def _check_declared(
    weights: Path, header: dict[str, Any], expected: dict[str, tuple[int, ...]], cfg_path: Path
) -> None:
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: tensors do not match {cfg_path.name} (missing {missing}, unexpected "
            f"{unexpected}); the weights belong to another dictionary or architecture"
        )
    for key, shape in expected.items():
        declared = header[key]
        if declared.shape != shape:
            raise CheckpointError(
                f"{weights}: tensor {key!r} is declared {declared.dtype} {list(declared.shape)}, "
                f"but {cfg_path.name} implies {list(shape)}; the weights and the config belong "
                "to different dictionaries"
            )
        if not declared.is_float:
            raise CheckpointError(
                f"{weights}: tensor {key!r} has dtype {declared.dtype}; dictionary weights must "
                "be floating point (F32, F16, BF16, F64), and integers are never cast silently"
            )
