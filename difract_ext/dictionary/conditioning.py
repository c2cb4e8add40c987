"""The timestep-conditioned dictionary (DifFRACT / TIDE), independent of any library.

Forward, for a row ``x [d_in]`` at timestep ``t``::

    emb      = sinusoidal(t)                               [d_t]   (see ``timestep.py``)
    h        = SiLU(W2 · SiLU(W1 · emb + b1) + b2)         [d_t]   (``time_mlp.0``, ``time_mlp.2``)
    scale, shift = split(mod_linear(h))                    [d_in] each (first half scale)
    x_mod    = x ⊙ (1 + scale) + shift
    pre      = W_encᵀ x_mod + b_enc                        [d_sae]
    z        = act(pre)                                    ReLU / TopK / JumpReLU
    ŷ        = W_decᵀ z + b_dec                            [d_out]

``TimestepConditioned`` is a mixin for an ``nn.Module`` that owns ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` (SAELens orientation), the modules
``time_mlp`` and ``mod_linear`` (DifFRACT's names, so its state-dict keys carry over), and
optionally ``threshold [d_sae]`` (JumpReLU). The weights are *stored* feature-major, as
``nn.Linear`` stores them (``W_enc`` is a transposed view of a ``[d_sae, d_in]`` tensor), so the
products run on the same kernels as DifFRACT's ``nn.Linear`` modules and agree bit for bit.

FiLM parameters are computed once per distinct ``t`` on a single row. (A GEMM over N identical rows
can round differently from a 1-row GEMM, so this makes every row's result independent of what else
is in the batch.)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from difract_ext.dictionary.activations import ActivationSpec, activate
from difract_ext.dictionary.timestep import (
    TimestepEmbeddingSpec,
    TimestepError,
    TimestepLike,
    as_timestep_tensor,
    broadcast_shape_for,
)

logger = logging.getLogger(__name__)

TimestepSource = Callable[[], "torch.Tensor | float | None"]


class DecoderNormError(ValueError):
    """Decoder rows (one per feature) are not unit-norm."""


@dataclass(kw_only=True)
class ConditioningFields:
    """Config fields shared by every conditioned dictionary (mixed into SAELens configs).

    Attributes:
        d_t_embed: width of the sinusoidal embedding and the time MLP (DifFRACT: 256).
        t_embed_max_period, t_embed_downscale_freq_shift, t_embed_flip_sin_to_cos, t_embed_scale:
            the embedding convention (see :class:`TimestepEmbeddingSpec`; defaults = DifFRACT).
        timestep_scale: multiplies the incoming t (1.0 for FLUX, whose transformer gets [0, 1]).
        activation: ``"relu"``, ``"topk"`` or ``"jumprelu"``.
        k: active features per row for ``"topk"``.
        trained_timesteps: the t values seen in training, if known; other values log a warning.
    """

    d_t_embed: int = 256
    t_embed_max_period: float = 10000.0
    t_embed_downscale_freq_shift: float = 1.0
    t_embed_flip_sin_to_cos: bool = False
    t_embed_scale: float = 1.0
    timestep_scale: float = 1.0
    activation: str = "relu"
    k: int | None = None
    trained_timesteps: list[float] | None = field(default=None)

    def embedding_spec(self) -> TimestepEmbeddingSpec:
        return TimestepEmbeddingSpec(
            dim=self.d_t_embed,
            max_period=self.t_embed_max_period,
            downscale_freq_shift=self.t_embed_downscale_freq_shift,
            flip_sin_to_cos=self.t_embed_flip_sin_to_cos,
            scale=self.t_embed_scale,
            timestep_scale=self.timestep_scale,
        )

    def activation_spec(self) -> ActivationSpec:
        return ActivationSpec(kind=self.activation, k=self.k)

    def validate_conditioning(self) -> None:
        """Raise ``ValueError`` on an inconsistent conditioning config."""
        self.embedding_spec()
        self.activation_spec()
        if self.trained_timesteps is not None:
            self.trained_timesteps = [float(v) for v in self.trained_timesteps]


class FoldedDictionary(NamedTuple):
    """A conditioned dictionary frozen at one timestep: an ordinary static dictionary.

    ``pre = x @ W_enc + b_enc`` equals the conditioned pre-activation at ``t`` up to float
    reassociation. Shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
    ``b_dec [d_out]``, ``threshold [d_sae]`` or None.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None
    activation: ActivationSpec
    t: float

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` feature activations."""
        return activate(x @ self.W_enc + self.b_enc, self.activation, self.threshold)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_out]``."""
        return z @ self.W_dec + self.b_dec


def as_feature_major(t: torch.Tensor) -> torch.Tensor:
    """Same values as ``t [a, b]``, stored as the transpose of a contiguous ``[b, a]`` tensor."""
    return t if t.T.is_contiguous() else t.T.contiguous().T


def as_aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t``, copied to a fresh allocation if its data is not ``alignment``-byte aligned.

    MKL chooses kernels by alignment, so the same weights at an unaligned address (e.g. read out
    of a safetensors file) can round differently; aligned copies make reloads bit-identical.
    """
    return t.clone() if t.data_ptr() % alignment else t


class TimestepConditioned:
    """Mixin: the conditioned-dictionary math on top of an ``nn.Module`` holding the weights.

    The host provides ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (and ``threshold`` for JumpReLU)
    and calls :meth:`build_conditioning` while creating its parameters.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    time_mlp: nn.Sequential
    mod_linear: nn.Linear
    embedding: TimestepEmbeddingSpec
    activation: ActivationSpec

    # ---- construction -------------------------------------------------------------------------
    def build_conditioning(
        self,
        d_in: int,
        d_sae: int,
        d_out: int,
        embedding: TimestepEmbeddingSpec,
        activation: ActivationSpec,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Create every parameter with DifFRACT's initialisation.

        Decoder Kaiming-uniform then unit-normalised per feature; encoder = transpose of the
        *unnormalised* decoder; biases zero; time-MLP Kaiming-normal (linear gain); ``mod_linear``
        zero so FiLM starts as the identity; JumpReLU thresholds zero.
        """
        host: Any = self
        host.embedding = embedding
        host.activation = activation
        fac = {"dtype": dtype, "device": device}
        d_t = embedding.dim
        dec = torch.empty(d_out, d_sae, **fac)  # nn.Linear layout of the decoder
        nn.init.kaiming_uniform_(dec, a=math.sqrt(5))
        if d_in == d_out:  # encoder.weight [d_sae, d_in] = decoder.weightᵀ, before normalising
            enc = dec.T.contiguous()
        else:
            enc = torch.empty(d_sae, d_in, **fac)
            nn.init.kaiming_uniform_(enc, a=math.sqrt(5))
        host.W_enc = nn.Parameter(enc.T)  # [d_in, d_sae], stored as [d_sae, d_in]
        host.b_enc = nn.Parameter(torch.zeros(d_sae, **fac))
        host.W_dec = nn.Parameter(dec.T)  # [d_sae, d_out], stored as [d_out, d_sae]
        host.b_dec = nn.Parameter(torch.zeros(d_out, **fac))
        host.time_mlp = nn.Sequential(
            nn.Linear(d_t, d_t, **fac), nn.SiLU(), nn.Linear(d_t, d_t, **fac), nn.SiLU()
        )
        host.mod_linear = nn.Linear(d_t, 2 * d_in, **fac)
        if str(device) != "meta":
            for lin in (host.time_mlp[0], host.time_mlp[2]):
                nn.init.kaiming_normal_(lin.weight, nonlinearity="linear")
                nn.init.zeros_(lin.bias)
            nn.init.zeros_(host.mod_linear.weight)
            nn.init.zeros_(host.mod_linear.bias)
            self.normalize_decoder_()
        if activation.kind == "jumprelu":
            host.threshold = nn.Parameter(torch.zeros(d_sae, **fac))

    # ---- timestep resolution ------------------------------------------------------------------
    def _t_stack(self) -> list[torch.Tensor]:
        stack = self.__dict__.get("_difract_t_stack")
        if stack is None:
            stack = []
            self.__dict__["_difract_t_stack"] = stack
        return stack

    def _t_high(self) -> float:
        """The largest t this dictionary takes: 1 over its config's ``timestep_scale``."""
        return 1.0 / float(getattr(getattr(self, "cfg", None), "timestep_scale", 1.0) or 1.0)

    @contextlib.contextmanager
    def timestep(self, t: TimestepLike) -> Iterator[Any]:
        """Scope a timestep for calls that pass only ``x`` (SAELens' own callers)::

        with transcoder.timestep(0.5):
            y = transcoder(x)
        """
        stack = self._t_stack()
        stack.append(as_timestep_tensor(t, high=self._t_high()))
        try:
            yield self
        finally:
            stack.pop()

    def set_timestep(self, t: TimestepLike | None) -> None:
        """Set (or with None clear) a persistent timestep, used when no other t is given."""
        self.__dict__["_difract_t_fixed"] = (
            None if t is None else as_timestep_tensor(t, high=self._t_high())
        )

    def bind_timestep_source(self, source: TimestepSource | None) -> None:
        """Read t from ``source()`` when no t is passed, scoped or set (e.g. a FLUX pre-hook)."""
        self.__dict__["_difract_t_source"] = source

    def resolve_timestep(self, t: TimestepLike | None, x: torch.Tensor) -> torch.Tensor:
        """The t to use for ``x``: explicit, else scoped, else set, else bound source.

        Raises:
            TimestepError: if there is none, or its shape does not fit ``x``.
        """
        if t is None and self._t_stack():
            t = self._t_stack()[-1]
        if t is None:
            t = self.__dict__.get("_difract_t_fixed")
        if t is None:
            source = self.__dict__.get("_difract_t_source")
            t = source() if source is not None else None
        if t is None:
            raise TimestepError(
                f"{type(self).__name__} needs the diffusion timestep t and got none. Pass it "
                "(encode(x, t=...), forward(x, t=...)), or scope it for callers that pass only x: "
                "`with dictionary.timestep(t): ...`. t is the value the transformer receives "
                "(FLUX: in [0, 1]; schnell's 4 steps are 1.0, 0.75390625, 0.5, 0.25)."
            )
        t_tensor = as_timestep_tensor(t, device=x.device, high=self._t_high())
        broadcast_shape_for(t_tensor, x)
        self._warn_unseen(t_tensor)
        return t_tensor

    def _warn_unseen(self, t: torch.Tensor) -> None:
        cfg = getattr(self, "cfg", None)
        trained: Sequence[float] | None = getattr(cfg, "trained_timesteps", None)
        if not trained:
            return
        ref = torch.tensor(list(trained), dtype=torch.float32, device=t.device)
        seen = (t.reshape(-1, 1) - ref).abs().min(dim=1).values <= 1e-6
        if not bool(seen.all()):
            bad = sorted({round(float(v), 8) for v in t.reshape(-1)[~seen][:8]})
            warned: set[float] = self.__dict__.setdefault("_difract_warned_t", set())
            new = [v for v in bad if v not in warned]
            if new:
                warned.update(new)
                logger.warning(
                    "%s was trained on t in %s but got t=%s; its features are untested there",
                    type(self).__name__,
                    list(trained),
                    new,
                )

    # ---- the math ---------------------------------------------------------------------------
    def _film_rows(self, t_rows: torch.Tensor) -> torch.Tensor:
        """``t [n] -> [n, 2 * d_in]`` (scale | shift)."""
        dtype = self.mod_linear.weight.dtype
        emb = self.embedding.embed(t_rows).to(dtype)
        return self.mod_linear(self.time_mlp(emb))

    def film(self, t: TimestepLike) -> tuple[torch.Tensor, torch.Tensor]:
        """FiLM parameters at ``t``.

        Args:
            t: scalar or tensor of timesteps, any shape ``[*T]``.

        Returns:
            ``(scale, shift)``, each ``[*T, d_in]`` in the dictionary dtype.
        """
        t_tensor = as_timestep_tensor(t, device=self.mod_linear.weight.device, high=self._t_high())
        flat = t_tensor.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        if uniq.numel() <= 64:  # one 1-row product per distinct t: batch-independent rounding
            rows = torch.cat([self._film_rows(u.reshape(1)) for u in uniq])
        else:
            rows = self._film_rows(uniq)
        mod = rows[inverse].reshape(*t_tensor.shape, rows.shape[-1])
        scale, shift = mod.chunk(2, dim=-1)
        return scale, shift

    def condition(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x ⊙ (1 + scale(t)) + shift(t)`` for ``x [..., d_in]`` and ``t`` scalar or ``x``'s
        lead.
        """
        scale, shift = self.film(t)
        shape = broadcast_shape_for(t, x) + (scale.shape[-1],)
        return x * (1 + scale.reshape(shape)) + shift.reshape(shape)

    def pre_activations(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` pre-activations at ``t``."""
        return F.linear(self.condition(x, t), self.W_enc.T, self.b_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The sparse nonlinearity on ``[..., d_sae]`` pre-activations."""
        return activate(pre, self.activation, getattr(self, "threshold", None))

    def linear_decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_out]``: ``z @ W_dec + b_dec``."""
        return F.linear(z, self.W_dec.T, self.b_dec)

    @torch.no_grad()
    def fold(self, t: float) -> FoldedDictionary:
        """The static dictionary at one timestep (``W_enc·diag(1+scale)``, ``b_enc + shift·W_enc``).

        Folding reorders float additions, so folded and conditioned pre-activations agree to
        rounding (about 1e-6 relative in float32), not bit for bit.
        """
        if not isinstance(t, (float, int)) or isinstance(t, bool):
            raise TimestepError(f"fold() takes one float timestep, got {t!r}")
        scale, shift = self.film(float(t))
        W_enc = self.W_enc * (1 + scale)[:, None]
        b_enc = self.b_enc + shift @ self.W_enc
        thr = getattr(self, "threshold", None)
        return FoldedDictionary(
            W_enc=W_enc.detach().clone(),
            b_enc=b_enc.detach().clone(),
            W_dec=self.W_dec.detach().clone(),
            b_dec=self.b_dec.detach().clone(),
            threshold=None if thr is None else thr.detach().clone(),
            activation=self.activation,
            t=float(t),
        )

    # ---- decoder norm convention ------------------------------------------------------------
    @torch.no_grad()
    def decoder_norms(self) -> torch.Tensor:
        """``[d_sae]`` L2 norm of each feature's decoder row."""
        return self.W_dec.float().norm(dim=-1)

    def check_unit_norm_decoder(self, atol: float = 1e-4, where: str = "") -> None:
        """Raise :class:`DecoderNormError` unless every decoder row has norm 1 ± ``atol``."""
        dev = (self.decoder_norms() - 1).abs()
        if dev.numel() and float(dev.max()) > atol:
            worst = int(dev.argmax())
            n_bad = int((dev > atol).sum())
            raise DecoderNormError(
                f"{where or type(self).__name__}: {n_bad} of {dev.numel()} decoder rows are not "
                f"unit-norm (feature {worst} has norm {float(self.decoder_norms()[worst]):.6f}, "
                f"tolerance {atol}). Dictionaries here keep each feature's write vector at norm 1; "
                "call normalize_decoder_() if this is intended, or check the file is the right one."
            )

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm in place (rows with norm 0 stay 0)."""
        norms = self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        self.W_dec.div_(norms)
