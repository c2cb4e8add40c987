"""An independent re-statement of DifFRACT's transcoder, written from the paper's formula.

It shares no code with difract_ext: the embedding is spelled out element by element (no
diffusers), and the modules are plain ``nn.Linear`` with DifFRACT's key names. Used as the golden
reference.

Formula (difract_reference.md §1.3): emb = [sin(t f_k), cos(t f_k)],
f_k = exp(-ln(10000) k/(half-1)); h = SiLU(W2 SiLU(W1 emb + b1) + b2);
(scale, shift) = split(mod_linear(h)); x_mod = x(1+scale)+shift; z = ReLU(encoder(x_mod));
y = decoder(z).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn


def reference_embedding(t: float, dim: int) -> torch.Tensor:
    """``[1, dim]`` float32 DifFRACT embedding of one timestep."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000) * k / (half - 1))
    arg = torch.tensor([[float(t)]], dtype=torch.float32) * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class ReferenceTranscoder(nn.Module):
    """DifFRACT's TemporalAwareTranscoder, re-stated (state-dict keys identical)."""

    def __init__(self, d_model: int, d_feat: int, d_t: int) -> None:
        super().__init__()
        self.d_t = d_t
        self.time_mlp = nn.Sequential(
            nn.Linear(d_t, d_t), nn.SiLU(), nn.Linear(d_t, d_t), nn.SiLU()
        )
        self.mod_linear = nn.Linear(d_t, 2 * d_model)
        self.encoder = nn.Linear(d_model, d_feat)
        self.decoder = nn.Linear(d_feat, d_model)

    def film_one(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """FiLM of a single timestep, computed on one row: ``([1, d], [1, d])``."""
        m = self.mod_linear(self.time_mlp(reference_embedding(t, self.d_t)))
        return m[:, : m.shape[1] // 2], m[:, m.shape[1] // 2 :]

    def forward_one_t(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, d]`` all at timestep t -> (y [N, d], z [N, d_feat]); FiLM on one row."""
        scale, shift = self.film_one(t)
        z = torch.relu(self.encoder(x * (1 + scale) + shift))
        return self.decoder(z), z

    def forward_per_row(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """DifFRACT's own layout: t repeated per row, the time MLP run on all N rows."""
        half = self.d_t // 2
        k = torch.arange(half, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000) * k / (half - 1))
        arg = t.reshape(-1, 1).float() * freqs[None, :]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        m = self.mod_linear(self.time_mlp(emb))
        scale, shift = m.chunk(2, dim=-1)
        return self.decoder(torch.relu(self.encoder(x * (1 + scale) + shift)))


def make_standin_state_dict(
    d_model: int, d_feat: int, d_t: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random DifFRACT-layout weights with a non-trivial FiLM and unit-norm decoder columns."""
    g = torch.Generator().manual_seed(seed)
    ref = ReferenceTranscoder(d_model, d_feat, d_t)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ref.decoder.weight.div_(ref.decoder.weight.norm(dim=0, keepdim=True))
    return {k: v.clone() for k, v in ref.state_dict().items()}


def write_standin(
    path: Path, d_model: int = 24, d_feat: int = 96, d_t: int = 16, seed: int = 0
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_standin_state_dict(d_model, d_feat, d_t, seed), path)
    return path


def reference_from_file(path: Path) -> ReferenceTranscoder:
    sd = torch.load(path, weights_only=True)
    ref = ReferenceTranscoder(
        sd["decoder.bias"].shape[0], sd["encoder.bias"].shape[0], sd["time_mlp.0.bias"].shape[0]
    )
    ref.load_state_dict(sd)
    return ref.eval()
