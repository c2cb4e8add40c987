"""The training objective of one dictionary, and dead-feature resampling.

Loss for a batch of ``B`` rows (``x [B, d_in]``, target ``y [B, d_out]``, ``t [B]``)::

    z, pre = encode(x, t)                  [B, d_sae]   (SAE role: x = y)
    ŷ      = decode(z)                     [B, d_out]
    nMSE   = mean_b ‖y_b − ŷ_b‖² / (Σ_d Var_b(y_{b,d}) + 1e-6)   (population variance)
    L1     = mean_b Σ_i |z_b,i|                                  (ReLU; decoder rows are unit-norm)
    aux    = ‖e − ê‖² / ‖e − mean(e)‖²,  e = y − ŷ (detached),
             ê = decode_nobias(TopK_aux(pre | dead))
    loss   = nMSE + λ(step)·L1 + α·aux

:class:`Objective` is an ``nn.Module`` whose ``forward`` returns the loss so that
``accelerate``/DDP can wrap it (gradients are synchronised only through the wrapper's forward).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from difract_ext.dictionary.activations import topk_relu


class StepOutput(NamedTuple):
    """What one forward pass reports (all detached except ``loss``).

    ``fired [d_sae]`` bool: features active on some row of the batch; ``fire_counts [d_sae]``:
    rows of the batch each feature is active on; ``sq_err [B]``:
    per-row squared error; ``sse``/``sst``: sums for the batch FVU.
    """

    loss: torch.Tensor
    nmse: torch.Tensor
    l0: torch.Tensor
    aux: torch.Tensor
    fired: torch.Tensor
    sq_err: torch.Tensor
    fire_counts: torch.Tensor


class Objective(nn.Module):
    """Wraps a conditioned dictionary; ``forward(x, y, t, l1, dead)`` -> :class:`StepOutput`."""

    def __init__(
        self,
        dictionary: nn.Module,
        role: str,
        auxk_k: int | None = None,
        auxk_coefficient: float = 0.0,
    ):
        super().__init__()
        self.dictionary = dictionary
        self.role = role
        self.auxk_k = auxk_k
        self.auxk_coefficient = auxk_coefficient

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        l1_coefficient: float = 0.0,
        dead: torch.Tensor | None = None,
    ) -> StepOutput:
        """``x [B, d_in]``, ``y [B, d_out]``, ``t [B]``, ``dead [d_sae]`` bool or None."""
        d: Any = self.dictionary
        z, pre = d.encode_with_hidden_pre(y if self.role == "sae" else x, t=t)
        y_hat = d.linear_decode(z)
        err = y - y_hat
        sq_err = err.pow(2).sum(-1)
        var = y.var(dim=0, unbiased=False).sum() + 1e-6
        nmse = sq_err.mean() / var
        loss = nmse
        if l1_coefficient:
            loss = loss + l1_coefficient * z.abs().sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        if self.auxk_coefficient and dead is not None and bool(dead.any()):
            aux = self._aux_loss(pre, err.detach(), dead)
            loss = loss + self.auxk_coefficient * aux
        active = z > 0
        return StepOutput(
            loss=loss,
            nmse=nmse.detach(),
            l0=active.sum(-1).float().mean().detach(),
            aux=aux.detach(),
            fired=active.any(0).detach(),
            sq_err=sq_err.detach(),
            fire_counts=active.sum(0).detach(),
        )

    def _aux_loss(self, pre: torch.Tensor, e: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """How well the top ``auxk_k`` dead latents reconstruct the residual ``e [B, d_out]``."""
        d: Any = self.dictionary
        k = min(int(self.auxk_k or e.shape[-1] // 2), int(dead.sum()))
        z_aux = topk_relu(pre.masked_fill(~dead, float("-inf")), k)
        e_hat = z_aux @ d.W_dec
        denom = (e - e.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-6)
        return (e - e_hat).pow(2).sum(-1).mean() / denom


@torch.no_grad()
def resample_dead(
    dictionary: Any,
    optimizer: torch.optim.Optimizer,
    role: str,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    dead_idx: torch.Tensor,
    generator: torch.Generator,
    encoder_scale: float = 0.2,
) -> int:
    """Re-initialise dead features towards badly reconstructed rows (Anthropic-style resampling).

    Rows are drawn with probability ∝ squared error²; feature ``i`` gets decoder row = unit
    residual direction ``(y − ŷ)/‖·‖`` of its row, encoder column = ``encoder_scale`` × mean alive
    encoder norm × the unit, centred, conditioned input direction of that row, and a bias that
    puts the batch mean at pre-activation 0. The optimiser's moments of those entries are reset.

    Args:
        x, y, t: a batch ``[B, d_in]``, ``[B, d_out]``, ``[B]`` (SAE role: ``x`` is ignored).
        dead_idx: ``[n]`` feature indices to resample.
        generator: CPU generator (its state is part of the trainer's checkpoint).

    Returns:
        the number of features resampled.
    """
    n = int(dead_idx.numel())
    if n == 0:
        return 0
    x_in = y if role == "sae" else x
    z = dictionary.encode(x_in, t=t)
    err = y - dictionary.linear_decode(z)
    w = err.pow(2).sum(-1).pow(2).double().cpu()
    if float(w.sum()) <= 0:
        return 0
    rows = torch.multinomial(w, n, replacement=True, generator=generator).to(x_in.device)
    dec = err[rows]
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    x_mod = dictionary.condition(x_in, t)
    mu = x_mod.mean(0)
    enc = x_mod[rows] - mu
    enc = enc / enc.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    alive = torch.ones(dictionary.W_enc.shape[1], dtype=torch.bool, device=x_in.device)
    alive[dead_idx] = False
    scale = float(dictionary.W_enc[:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0
    enc = enc * (encoder_scale * scale)
    dictionary.W_dec[dead_idx] = dec.to(dictionary.W_dec.dtype)
    dictionary.W_enc[:, dead_idx] = enc.T.to(dictionary.W_enc.dtype)
    dictionary.b_enc[dead_idx] = -(enc @ mu).to(dictionary.b_enc.dtype)
    for param, index in (
        (dictionary.W_dec, (dead_idx,)),
        (dictionary.W_enc, (slice(None), dead_idx)),
        (dictionary.b_enc, (dead_idx,)),
    ):
        st = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][index] = 0
    return n
