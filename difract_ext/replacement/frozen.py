"""The frozen local replacement model of one FLUX denoising step.

:class:`FrozenFlux` re-runs a ``FluxTransformer2DModel`` on one captured step (its own weights,
no copies) with one joint position axis, text first: ``P = n_txt + n_img``. It exposes
TransformerLens hook points, named as circuit-tracer expects:

- ``hook_embed`` ``[B, P, d]``: ``cat(context_embedder(T5 states), x_embedder(latents))``;
- ``blocks.{l}.mlp.hook_in`` ``[B, P, d]``: the MLP input of every position (double block: the
  AdaLN-modulated ``norm2`` outputs of both streams; single block: the shared modulated norm);
  the block consumes this tensor, so gradients injected here reach the residual;
- ``blocks.{l}.mlp.hook_out`` ``[B, P, d]``: the MLP output before its gate (double: ``ff`` /
  ``ff_context``; single: the MLP columns of ``proj_out``, ``W_mlp · GELU(proj_mlp(x))``);
- ``unembed.hook_pre`` ``[B, P, d]``: ``norm_out`` of the final residual (image rows feed
  ``proj_out``, the velocity).

Layers ``0 .. n_double - 1`` are double blocks, then the single blocks. With ``freeze=True`` the
map from ``hook_embed`` and the MLP outputs to anything downstream is affine: attention patterns
(q and k after RoPE), LayerNorm denominators and all AdaLN modulations and gates are constants,
and MLP outputs are detached from their inputs. Forward *values* are those of the real model:
every frozen quantity is computed exactly as diffusers does and only its gradient is linearised
(``value.detach() + (linear - linear.detach())``).

``live`` lifts freezes from the gradients of :meth:`FrozenFlux.linear_forward` (the pass whose
backward gives attribution edges): ``"layernorm"`` differentiates the LayerNorm denominators,
``"attention"`` the attention patterns (through q and k). Edges are then the model's exact
first-order derivatives at the clean step (the MLPs still frozen), not the terms of an affine
model: they no longer sum to a node's value.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn
from transformer_lens.hook_points import HookedRootModule, HookPoint

from difract_ext.replacement.inputs import FluxStepInput

#: Freezes whose gradient ``live`` can lift.
LIVE_PARTS = ("layernorm", "attention")


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``module`` inside the block (restored
    after).

    Attribution needs gradients with respect to activations only: with trainable weights every
    backward pass would also compute (and accumulate into ``.grad``) weight gradients, which
    costs as much again and leaves ``.grad`` tensors on the user's model.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _straight(exact: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """Value of ``exact``, gradient of ``linear``."""
    return exact.detach() + (linear - linear.detach())


class _Constant(torch.autograd.Function):
    """``value`` (broadcast to ``like``'s shape) as a node of ``like``'s graph that passes no
    gradient.

    Downstream backward hooks still fire on it (it requires grad), but backward does no work
    for it: cheaper than ``value + like * 0``.
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return value.expand_as(like).clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:  # noqa: ARG004
        return None, None


def _pattern(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[H, S, S]`` attention pattern of one step's taped ``q, k [S, H, D]``."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * scale, dim=-1).to(dtype)


class _FrozenPattern(torch.autograd.Function):
    """``pattern @ v`` for a batch of ``v [B, S, H, D]`` sharing one frozen pattern of ``q, k``.

    One ``[S, S] @ [S, B * D]`` product per head, forward and backward; the backward recomputes
    the pattern from the saved ``q, k`` rather than keeping ``[H, S, S]`` per layer alive for
    every backward pass (at FLUX.1 1024 px that would be ~1 GB a layer).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, h, d = v.shape
        out = torch.bmm(_pattern(q, k, v.dtype), v.permute(2, 1, 0, 3).reshape(h, n, b * d))
        ctx.save_for_backward(q, k)
        ctx.v_shape = v.shape
        return out.view(h, n, b, d).permute(2, 1, 0, 3)  # [B, S, H, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        q, k = ctx.saved_tensors
        b, n, h, d = ctx.v_shape
        g = grad.permute(2, 1, 0, 3).reshape(h, n, b * d)
        grad_v = torch.bmm(_pattern(q, k, grad.dtype).transpose(1, 2), g)
        return None, None, grad_v.view(h, n, b, d).permute(2, 1, 0, 3)


def linear_path_unused(transformer: nn.Module) -> list[nn.Module]:
    """Modules :meth:`FrozenFlux.linear_forward` and :meth:`FrozenFlux.replay` never touch once
    :meth:`FrozenFlux.record` has run: MLPs, q/k projections, AdaLN and time-embedding linears
    (their outputs are taped or precomputed constants). About three quarters of FLUX.1's weights.
    """
    tf = transformer
    mods: list[nn.Module] = [tf.time_text_embed, tf.norm_out.linear]
    for b in tf.transformer_blocks:
        mods += [b.norm1.linear, b.norm1_context.linear, b.ff, b.ff_context]
        mods += [b.attn.to_q, b.attn.to_k, b.attn.add_q_proj, b.attn.add_k_proj]
    for b in tf.single_transformer_blocks:
        mods += [b.norm.linear, b.attn.to_q, b.attn.to_k, b.proj_mlp]
    return mods


class _MLPHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _MLPHooks()


class _Unembed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_pre = HookPoint()


class FrozenFlux(HookedRootModule):
    """One denoising step of a FLUX transformer with circuit-tracer's freeze points.

    Args:
        transformer: the pipeline's ``FluxTransformer2DModel`` (shared, never modified).
        step: the captured transformer call (batch 1).
        freeze: linearise gradients (attention patterns, LayerNorm scales, MLPs frozen).
        live: parts of :data:`LIVE_PARTS` whose gradient :meth:`linear_forward` does not freeze
            (first-order edges instead of an affine model; see the module docstring).

    Raises:
        ValueError: an unknown part in ``live``.
    """

    def __init__(
        self,
        transformer: nn.Module,
        step: FluxStepInput,
        freeze: bool = True,
        live: Collection[str] = (),
    ) -> None:
        super().__init__()
        unknown = sorted(set(live) - set(LIVE_PARTS))
        if isinstance(live, str) or unknown:
            raise ValueError(
                f"live takes parts of {LIVE_PARTS} (a collection, e.g. ('layernorm',)); "
                f"got {live!r}"
            )
        self.live = frozenset(live)
        self.flux = transformer
        self.step_input = step
        self.freeze = freeze
        self.n_txt = step.n_txt
        self.n_img = step.n_img
        self.n_double = len(transformer.transformer_blocks)
        self.n_single = len(transformer.single_transformer_blocks)
        self.n_layers = self.n_double + self.n_single
        self.d_model = int(transformer.inner_dim)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(_Layer() for _ in range(self.n_layers))
        self.unembed = _Unembed()
        self.setup()
        self._precompute()
        self._mode = "live"  # "record" (clean pass, keep q/k and LN scales) or "replay"
        self._tape: list[torch.Tensor] = []
        self._cursor = 0
        self._mlp_override: torch.Tensor | None = None
        self._clean_mlp_out: torch.Tensor | None = None  # [1, L, P, d], set by record()

    @torch.no_grad()
    def _precompute(self) -> None:
        """Constants of the step: time embedding, RoPE, every AdaLN modulation."""
        tf, s = self.flux, self.step_input
        dtype = tf.x_embedder.weight.dtype
        timestep = s.timestep.to(dtype) * 1000
        if s.guidance is None:
            temb = tf.time_text_embed(timestep, s.pooled_projections)
        else:
            temb = tf.time_text_embed(timestep, s.guidance.to(dtype) * 1000, s.pooled_projections)
        self._temb = temb
        self._rotary = tf.pos_embed(torch.cat((s.txt_ids, s.img_ids), dim=0))
        self._double_mod = []
        for block in tf.transformer_blocks:
            img = block.norm1.linear(block.norm1.silu(temb)).chunk(6, dim=1)
            txt = block.norm1_context.linear(block.norm1_context.silu(temb)).chunk(6, dim=1)
            self._double_mod.append((img, txt))
        self._single_mod = [
            block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)
            for block in tf.single_transformer_blocks
        ]
        emb = tf.norm_out.linear(tf.norm_out.silu(temb).to(dtype))
        self._out_scale, self._out_shift = torch.chunk(emb, 2, dim=1)

    # ---- frozen pieces -----------------------------------------------------------------------
    def _active(self) -> bool:
        return self.freeze and torch.is_grad_enabled()

    def _taped(self, value: torch.Tensor | None) -> torch.Tensor:
        """Record ``value`` (clean pass) or return the recorded one (replay, ``value`` unused)."""
        if self._mode == "record":
            assert value is not None
            self._tape.append(value.detach())
        elif self._mode == "replay":
            value = self._tape[self._cursor]
            self._cursor += 1
        assert value is not None
        return value

    def _ln(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An affine-free LayerNorm whose denominator is a constant for gradients."""
        centred = x - x.mean(dim=-1, keepdim=True)
        if self._mode == "replay":
            sigma = self._taped(None)
            if "layernorm" in self.live:  # the same value, differentiated
                sigma = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + module.eps)
            return centred / sigma
        if self._mode == "record":
            sigma = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + module.eps)
            return centred / self._taped(sigma)
        exact = module(x)
        if not self._active():
            return exact
        sigma = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + module.eps).detach()
        return _straight(exact, centred / sigma)

    def _attention(
        self, attn: Any, x_img: torch.Tensor, x_txt: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FLUX joint attention with q and k (after norms and RoPE) frozen; gradient through v.

        Double blocks pass image and text inputs separately; single blocks pass the joint
        sequence as ``x_img`` and ``None``.
        """
        v = attn.to_v(x_img).unflatten(-1, (attn.heads, -1))
        if x_txt is not None:
            ev = attn.add_v_proj(x_txt).unflatten(-1, (attn.heads, -1))
            v = torch.cat([ev, v], dim=1)
        replay = self._mode == "replay"
        if replay and "attention" not in self.live:
            # the pattern is a constant of the step: one [1, H, S, S] softmax, shared by the batch
            q, k = self._taped(None), self._taped(None)
            out = _FrozenPattern.apply(q[0], k[0], v)  # [B, S, H, D]
        else:
            if replay:  # live attention: q and k recomputed (and differentiated)
                self._cursor += 2
            q = attn.norm_q(attn.to_q(x_img).unflatten(-1, (attn.heads, -1)))
            k = attn.norm_k(attn.to_k(x_img).unflatten(-1, (attn.heads, -1)))
            if x_txt is not None:
                eq = attn.norm_added_q(attn.add_q_proj(x_txt).unflatten(-1, (attn.heads, -1)))
                ek = attn.norm_added_k(attn.add_k_proj(x_txt).unflatten(-1, (attn.heads, -1)))
                q, k = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1)
            q = apply_rotary_emb(q, self._rotary, sequence_dim=1)
            k = apply_rotary_emb(k, self._rotary, sequence_dim=1)
            if self._active() and not replay:
                q, k = q.detach(), k.detach()
            if self._mode == "record":
                q, k = self._taped(q), self._taped(k)
            proc = attn.processor
            out = dispatch_attention_fn(
                q,
                k,
                v,
                attn_mask=None,
                backend=getattr(proc, "_attention_backend", None),
                parallel_config=getattr(proc, "_parallel_config", None),
            )
        out = out.flatten(2, 3).to(v.dtype)
        if x_txt is None:
            return out, None
        out_txt, out_img = out.split_with_sizes(
            [x_txt.shape[1], out.shape[1] - x_txt.shape[1]], dim=1
        )
        out_img = attn.to_out[1](attn.to_out[0](out_img.contiguous()))
        return out_img, attn.to_add_out(out_txt.contiguous())

    def _mlp_out(self, layer: int, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """MLP output as a constant, still attached to the graph so backward hooks fire.

        In replay mode the MLP output is the override ``[B, P, d]`` for this layer.
        """
        if self._mode == "replay":
            assert self._mlp_override is not None
            const = self._mlp_override[:, layer]
            # attached to x's graph when gradients are on, so hook_out's backward hooks fire
            return _Constant.apply(const, x) if torch.is_grad_enabled() else const.expand_as(x)
        assert y is not None
        return _Constant.apply(y.detach(), x) if self._active() else y

    # ---- blocks ---------------------------------------------------------------------------------
    def _double(
        self, layer: int, block: Any, txt: torch.Tensor, img: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (
            (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp),
            (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp),
        ) = self._double_mod[layer]
        n_img = self._ln(block.norm1.norm, img) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        n_txt = (
            self._ln(block.norm1_context.norm, txt) * (1 + c_scale_msa[:, None])
            + c_shift_msa[:, None]
        )
        attn_img, attn_txt = self._attention(block.attn, n_img, n_txt)
        img = img + gate_msa.unsqueeze(1) * attn_img
        txt = txt + c_gate_msa.unsqueeze(1) * attn_txt
        m_img = self._ln(block.norm2, img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        m_txt = (
            self._ln(block.norm2_context, txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        )
        hooks = self.blocks[layer].mlp
        x = hooks.hook_in(torch.cat([m_txt, m_img], dim=1))
        m_txt, m_img = x.split_with_sizes(
            [self.n_txt, self.n_img], dim=1
        )  # backward: one cat, no zero-fill
        y = (
            None
            if self._mode == "replay"
            else torch.cat([block.ff_context(m_txt), block.ff(m_img)], dim=1)
        )
        y = hooks.hook_out(self._mlp_out(layer, y, x))
        y_txt, y_img = y.split_with_sizes(
            [self.n_txt, self.n_img], dim=1
        )  # split: one cat in backward
        img = img + gate_mlp.unsqueeze(1) * y_img
        txt = txt + c_gate_mlp.unsqueeze(1) * y_txt
        return txt, img

    def _single(self, layer: int, block: Any, h: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self._single_mod[layer - self.n_double]
        hooks = self.blocks[layer].mlp
        x = hooks.hook_in(self._ln(block.norm.norm, h) * (1 + scale[:, None]) + shift[:, None])
        attn_out, _ = self._attention(block.attn, x, None)
        d_attn = attn_out.shape[-1]
        w_attn, w_mlp = block.proj_out.weight[:, :d_attn], block.proj_out.weight[:, d_attn:]
        if self._mode == "replay":
            y = hooks.hook_out(self._mlp_out(layer, None, x))
            return h + gate.unsqueeze(1) * (F.linear(attn_out, w_attn, block.proj_out.bias) + y)
        mlp_hidden = block.act_mlp(block.proj_mlp(x))
        exact = block.proj_out(torch.cat([attn_out, mlp_hidden], dim=2))
        y = hooks.hook_out(self._mlp_out(layer, F.linear(mlp_hidden, w_mlp), x))
        if self._active():
            exact = _straight(exact, F.linear(attn_out, w_attn) + y)
        return h + gate.unsqueeze(1) * exact

    # ---- forward ------------------------------------------------------------------------------
    def embed(self, batch: int = 1) -> torch.Tensor:
        """``[batch, P, d]`` input embeddings (text then image), a leaf when grad is enabled."""
        s = self.step_input
        with torch.no_grad():
            txt = self.flux.context_embedder(s.encoder_hidden_states)
            img = self.flux.x_embedder(s.hidden_states)
            h = torch.cat([txt, img], dim=1).expand(batch, -1, -1).contiguous()
        return h.requires_grad_(torch.is_grad_enabled())

    def forward(self, batch: int = 1, embed: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``[batch, n_img, C_out]``; ``embed`` overrides the input embeddings."""
        h = self.hook_embed(self.embed(batch) if embed is None else embed)
        txt, img = h.split_with_sizes([self.n_txt, self.n_img], dim=1)
        for layer, block in enumerate(self.flux.transformer_blocks):
            txt, img = self._double(layer, block, txt, img)
        h = torch.cat([txt, img], dim=1)
        for j, block in enumerate(self.flux.single_transformer_blocks):
            h = self._single(self.n_double + j, block, h)
        normed = (
            self._ln(self.flux.norm_out.norm, h) * (1 + self._out_scale)[:, None, :]
            + self._out_shift[:, None, :]
        )
        normed = self.unembed.hook_pre(normed)
        return self.flux.proj_out(normed[:, self.n_txt :])

    def unused_by_linear_path(self) -> list[nn.Module]:
        """:func:`linear_path_unused` of this step's transformer (with ``"attention"`` live, the
        q and k projections are used)."""
        mods = linear_path_unused(self.flux)
        if "attention" in self.live:
            blocks = (*self.flux.transformer_blocks, *self.flux.single_transformer_blocks)
            names = ("to_q", "to_k", "add_q_proj", "add_k_proj")
            qk = {id(getattr(b.attn, n)) for b in blocks for n in names if getattr(b.attn, n, None)}
            mods = [m for m in mods if id(m) not in qk]
        return mods

    @contextmanager
    def offload_unused(self, device: str | torch.device = "cpu") -> Iterator[None]:
        """Move :meth:`unused_by_linear_path` to ``device`` inside the block (moved back after),
        as circuit-tracer's ``offload``: attribution's device then holds only the affine path.
        """
        mods = self.unused_by_linear_path()
        homes = [next(m.parameters()).device for m in mods]
        try:
            for m in mods:
                m.to(device)
            yield
        finally:
            for m, home in zip(mods, homes, strict=True):
                m.to(home)

    # ---- record / replay (the affine model evaluated at other source values) ------------------
    @torch.no_grad()
    def record(self) -> dict[str, torch.Tensor]:
        """Clean pass that tapes attention q/k and LayerNorm scales for :meth:`replay`.

        Returns the clean cache: ``embed [P, d]``, ``mlp_in [L, P, d]``, ``mlp_out [L, P, d]``,
        ``resid_final [P, d]`` (``unembed.hook_pre``) and ``velocity [n_img, C_out]``.
        """
        cache: dict[str, list[torch.Tensor]] = {"mlp_in": [], "mlp_out": []}
        fwd = [("hook_embed", lambda t, hook: cache.__setitem__("embed", t[0].clone()))]
        for layer in range(self.n_layers):
            fwd.append(
                (
                    f"blocks.{layer}.mlp.hook_in",
                    lambda t, hook: cache["mlp_in"].append(t[0].clone()),
                )
            )
            fwd.append(
                (
                    f"blocks.{layer}.mlp.hook_out",
                    lambda t, hook: cache["mlp_out"].append(t[0].clone()),
                )
            )
        fwd.append(
            ("unembed.hook_pre", lambda t, hook: cache.__setitem__("resid_final", t[0].clone()))
        )
        self._tape, self._mode = [], "record"
        try:
            with self.hooks(fwd_hooks=fwd):
                velocity = self.forward(batch=1)
        finally:
            self._mode = "live"
        mlp_out = torch.stack(cache["mlp_out"])
        self._clean_mlp_out = mlp_out[None]  # the same storage: read-only constants
        return {
            "embed": cache["embed"],  # type: ignore[dict-item]
            "mlp_in": torch.stack(cache["mlp_in"]),
            "mlp_out": mlp_out,
            "resid_final": cache["resid_final"],  # type: ignore[dict-item]
            "velocity": velocity[0],
        }

    def linear_forward(self, batch: int = 1) -> torch.Tensor:
        """The affine model at the clean sources, ``batch`` copies, built for backward passes.

        Fires the same hooks as :meth:`forward` with ``freeze=True`` and gives the same
        gradients, but computes only the linear path: value projections, the taped attention
        patterns and LayerNorm scales, the recorded MLP outputs as constants (no MLP, q/k or
        RoPE work at batch size). Forward values equal the clean ones up to float rounding.
        Requires :meth:`record`.

        Returns:
            velocity ``[batch, n_img, C_out]``.
        """
        if not self._tape:
            raise RuntimeError("call record() on the clean step before linear_forward()")
        self._mode, self._cursor, self._mlp_override = "replay", 0, self._clean_mlp_out
        try:
            return self.forward(batch=batch)
        finally:
            self._mode, self._mlp_override = "live", None

    @torch.no_grad()
    def replay(self, embed: torch.Tensor, mlp_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen (affine) model at other sources, in a batch.

        Args:
            embed: ``[B, P, d]`` input embeddings.
            mlp_out: ``[B, L, P, d]`` every layer's MLP output (constants of the frozen model).

        Returns:
            ``mlp_in [B, L, P, d]``, ``resid_final [B, P, d]``, ``velocity [B, n_img, C_out]``.
        """
        if not self._tape:
            raise RuntimeError("call record() on the clean step before replay()")
        cache: dict[str, list[torch.Tensor]] = {"mlp_in": []}
        fwd = [
            (f"blocks.{layer}.mlp.hook_in", lambda t, hook: cache["mlp_in"].append(t))
            for layer in range(self.n_layers)
        ]
        fwd.append(("unembed.hook_pre", lambda t, hook: cache.__setitem__("resid_final", [t])))
        self._mode, self._cursor, self._mlp_override = "replay", 0, mlp_out
        try:
            with self.hooks(fwd_hooks=fwd):
                velocity = self.forward(batch=embed.shape[0], embed=embed)
        finally:
            self._mode, self._mlp_override = "live", None
        return {
            "mlp_in": torch.stack(cache["mlp_in"], dim=1),
            "resid_final": cache["resid_final"][0],
            "velocity": velocity,
        }
