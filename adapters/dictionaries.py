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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from typing_extensions import override

from difract_ext.dictionary.conditioning import (
    ConditioningFields,
    TimestepConditioned,
    as_aligned,
    as_feature_major,
)
from difract_ext.dictionary.timestep import TimestepLike
from difract_ext.util.atomic import atomic_directory

TRANSCODER_ARCHITECTURE = "difract_timestep_transcoder"
SAE_ARCHITECTURE = "difract_timestep_sae"


def _check_plain(cfg: Any) -> None:
    if isinstance(cfg.metadata, dict):  # accept a plain dict as well as SAEMetadata
        cfg.metadata = SAEMetadata(**cfg.metadata)
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
        for key, value in state_dict.items():
            if key in ("W_enc", "W_dec"):
                value = as_feature_major(value)
            state_dict[key] = as_aligned(value)

    def save_model(self: Any, path: str | Path) -> tuple[Path, Path]:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` to ``path`` atomically."""
        path = Path(path)
        with atomic_directory(path) as tmp:
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
        """Write ``module`` as a SAELens folder into ``path``."""
        SAE.save_model(module, path)  # type: ignore[arg-type]

    def load(self, path: Path, device: str) -> SAE[Any]:
        """Read a SAELens folder (our architectures are registered by this module's import)."""
        return SAE.load_from_disk(str(path), device=device)

    def __repr__(self) -> str:
        return "SAELENS_IO"


#: the one :class:`SAELensDictionaryIO` (pass as ``io=`` to the trainer and the folder loaders)
SAELENS_IO = SAELensDictionaryIO()
