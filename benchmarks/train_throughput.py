"""Training throughput (rows/s): our trainer vs a plain DifFRACT-recipe loop, same width and data.

Three measurements on the same rows ``(x, y, t)`` (linear-plus-sparse synthetic MLP, 4 timesteps):

* ``reference``: a plain loop written here, as DifFRACT trains: ``nn.Linear`` encoder/decoder,
  time MLP + FiLM evaluated on every row's embedding, ReLU, nMSE + λ·L1, AdamW, decoder rows
  renormalised after each step; batches sliced from memory.
* ``ours (step)``: our :class:`~difract_ext.training.objective.Objective` + AdamW + schedule +
  renormalisation + dead-feature counters, on the same in-memory batches.
* ``ours (trainer)``: :func:`~difract_ext.training.train_dictionaries` end to end, reading the
  rows from safetensors shards (includes shard loading and shuffling).

Usage::

    python benchmarks/train_throughput.py                       # CPU defaults (d_model 128)
    python benchmarks/train_throughput.py --device cuda --d-model 3072 --expansion 16 --batch 4096
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from difract_ext.adapters.dictionaries import SAELENS_IO
from difract_ext.capture.synthetic import linear_plus_sparse, write_harvest
from difract_ext.flux.sites import Site
from difract_ext.training import DictionarySpec, TrainConfig, build_dictionary, train_dictionaries
from difract_ext.training.objective import Objective


class ReferenceTranscoder(nn.Module):
    """DifFRACT's module, plainly: per-row time embedding -> MLP -> FiLM -> ReLU transcoder."""

    def __init__(self, d_model: int, d_sae: int, d_t: int):
        super().__init__()
        self.d_t = d_t
        self.time_mlp = nn.Sequential(
            nn.Linear(d_t, d_t), nn.SiLU(), nn.Linear(d_t, d_t), nn.SiLU()
        )
        self.mod_linear = nn.Linear(d_t, 2 * d_model)
        nn.init.zeros_(self.mod_linear.weight)
        nn.init.zeros_(self.mod_linear.bias)
        self.encoder = nn.Linear(d_model, d_sae)
        self.decoder = nn.Linear(d_sae, d_model)
        self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.decoder.weight.div_(self.decoder.weight.norm(dim=0, keepdim=True).clamp(min=1e-12))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = get_timestep_embedding(t, self.d_t).to(x.dtype)  # one embedding per row
        scale, shift = self.mod_linear(self.time_mlp(emb)).chunk(2, dim=-1)
        z = torch.relu(self.encoder(x * (1 + scale) + shift))
        return self.decoder(z), z


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_reference(x, y, t, args) -> float:
    torch.manual_seed(0)
    m = ReferenceTranscoder(args.d_model, args.d_sae, args.d_t).to(args.device)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    n = x.shape[0] // args.batch
    start = None
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            _sync(args.device)
            start = time.perf_counter()
        sl = slice((step % n) * args.batch, (step % n + 1) * args.batch)
        xb, yb, tb = x[sl], y[sl], t[sl]
        y_hat, z = m(xb, tb)
        var = yb.var(0, unbiased=False).sum() + 1e-6
        loss = (yb - y_hat).pow(2).sum(-1).mean() / var + 3e-4 * z.abs().sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        m.normalize_decoder()
    _sync(args.device)
    return args.steps * args.batch / (time.perf_counter() - start)


def bench_ours_step(x, y, t, args) -> float:
    spec = DictionarySpec(
        Site(0, "img"), d_sae=args.d_sae, d_t_embed=args.d_t, l1_coefficient=3e-4, lr=2e-4
    )
    d = build_dictionary(spec, args.d_model, io=SAELENS_IO, seed=0, device=args.device)
    obj = Objective(d, "transcoder")
    opt = torch.optim.AdamW(d.parameters(), lr=2e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1, s / args.steps)))
    )
    since = torch.zeros(args.d_sae, dtype=torch.long)
    n = x.shape[0] // args.batch
    start = None
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            _sync(args.device)
            start = time.perf_counter()
        sl = slice((step % n) * args.batch, (step % n + 1) * args.batch)
        out = obj(x[sl], y[sl], t[sl], 3e-4)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        d.normalize_decoder_()
        since += 1
        since[out.fired.cpu()] = 0
    _sync(args.device)
    return args.steps * args.batch / (time.perf_counter() - start)


def bench_ours_trainer(x, y, t, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_harvest(
            Path(tmp) / "data",
            {Site(0, "img"): (x.cpu(), y.cpu())},
            {"img": t.cpu()},
            shard_rows=max(args.batch * 8, 1),
        )
        spec = DictionarySpec(
            Site(0, "img"), d_sae=args.d_sae, d_t_embed=args.d_t, l1_coefficient=3e-4, lr=2e-4
        )
        n_steps = x.shape[0] // args.batch
        cfg = TrainConfig(
            batch_size=args.batch,
            epochs=max(1, math.ceil(args.steps / n_steps)),
            log_every=0,
            resample_every=0,
            checkpoint_every_seconds=1e9,
        )
        _sync(args.device)
        start = time.perf_counter()
        res = train_dictionaries(
            root, [spec], Path(tmp) / "out", cfg, io=SAELENS_IO, progress=False
        )
        _sync(args.device)
        return res.global_step * args.batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=128, help="MLP width D")
    p.add_argument("--expansion", type=int, default=16, help="d_sae = expansion * D")
    p.add_argument("--d-t", type=int, default=256, help="timestep embedding width")
    p.add_argument("--batch", type=int, default=1024, help="rows per step")
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.d_sae = args.expansion * args.d_model
    n_rows = args.batch * 16
    x, y, t = linear_plus_sparse(
        n_rows, args.d_model, n_latents=4 * args.d_model, threshold=1.5, seed=0
    )
    x, y, t = x.to(args.device), y.to(args.device), t.to(args.device)
    results = {
        "reference DifFRACT loop": bench_reference(x, y, t, args),
        "ours: training step": bench_ours_step(x, y, t, args),
        "ours: train_dictionaries (from shards)": bench_ours_trainer(x, y, t, args),
    }
    ref = results["reference DifFRACT loop"]
    print(
        f"D={args.d_model} d_sae={args.d_sae} d_t={args.d_t} batch={args.batch} steps={args.steps} "
        f"device={args.device} threads={torch.get_num_threads()}"
    )
    print(f"{'loop':42s} {'rows/s':>12s} {'vs ref':>8s}")
    for name, rate in results.items():
        print(f"{name:42s} {rate:12,.0f} {rate / ref:8.2f}x")


if __name__ == "__main__":
    main()
