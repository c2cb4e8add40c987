"""A small random but valid dashboard folder, for tests and frontend work (no model needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from difract_ext.dashboards.store import HIST_EDGES, write_index, write_labels, write_site
from difract_ext.flux.sites import Site, as_site
from difract_ext.util.atomic import atomic_write_with

__all__ = ["synthetic_dashboards"]

_PROMPTS = ("a red circle on the left", "a blue square at the top", "a green triangle on the right")
_GRID = (4, 4)
_N_TXT = 8
_STEPS = 4
_TOP_K = 3


def _tokens(prompt: str) -> list[str]:
    words = prompt.split() + ["</s>"]
    return (words + ["<pad>"] * _N_TXT)[:_N_TXT]


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    atomic_write_with(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


def synthetic_dashboards(
    path: str | Path, sites: Sequence[Site | str], d_sae: int = 8, seed: int = 0
) -> Path:
    """Write a random dashboard folder at ``path`` for ``sites`` (``d_sae`` features each): 3
    prompts × 1 seed, 4 steps, a 4×4 patch grid, 8 text tokens, top 3, 8×8 px images, and a label
    on every other feature. Returns ``path``."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prompts = list(_PROMPTS)
    prompt_tokens = [_tokens(p) for p in prompts]
    vocab = sorted({w for toks in prompt_tokens for w in toks if w not in ("<pad>", "</s>")})
    ids = [[vocab.index(w) if w in vocab else -1 for w in toks] for toks in prompt_tokens]
    examples = []
    for i in range(len(prompts)):
        image = f"images/p{i:04d}_s0.png"
        _write_png(path / image, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        examples.append({"prompt": i, "seed": 0, "image": image})
    n_ex, rows_cols = len(examples), _GRID[0] * _GRID[1]
    entries = {}
    for key in sites:
        site = as_site(key)
        n_pos = rows_cols if site.stream == "img" else _N_TXT
        acts = torch.relu(torch.randn(d_sae, _STEPS, n_ex, n_pos, generator=gen))
        best = acts.amax(-1)  # [F, S, E]
        top_act, top_ex = torch.sort(best, dim=-1, descending=True, stable=True)
        top_act, top_ex = top_act[..., :_TOP_K], top_ex[..., :_TOP_K]
        idx = top_ex[..., None].expand(-1, -1, -1, n_pos)
        top_map = torch.gather(acts, 2, idx)
        pos = acts[acts > 0]
        hist = torch.zeros(d_sae, len(HIST_EDGES) - 1, dtype=torch.int64)
        edges = torch.tensor(HIST_EDGES[1:-1], dtype=torch.float32)
        for f in range(d_sae):
            a = acts[f][acts[f] > 0]
            hist[f] = torch.bincount(torch.bucketize(a, edges), minlength=hist.shape[1])
        token_sum = torch.rand(d_sae, len(vocab), generator=gen)
        tensors = {
            "top_act": top_act.float(),
            "top_example": top_ex.to(torch.int32),
            "top_map": top_map.half(),
            "act_max": acts.amax((1, 2, 3)).float(),
            "act_min": acts.amin((1, 2, 3)).float(),
            "hist": hist,
            "profile_sum": acts.sum((2, 3)).float(),
            "profile_fire": (acts > 0).sum((2, 3)).to(torch.int64),
            "token_sum": token_sum,
            "token_count": torch.ones(len(vocab), dtype=torch.int64),
        }
        del pos
        write_site(path, site, tensors)
        labels = {
            f: {
                "label": f"colour={['red', 'blue', 'green'][f % 3]}",
                "f1": 0.95,
                "precision": 0.9,
                "recall": 1.0,
            }
            for f in range(0, d_sae, 2)
        }
        write_labels(path, site, labels)
        entries[str(site)] = {
            "file": f"{site}.safetensors",
            "kind": "transcoder",
            "d_sae": d_sae,
            "stream": site.stream,
            "layer": site.layer,
            "positions_per_step": n_ex * n_pos,
        }
    write_index(
        path,
        {
            "scan": "synthetic",
            "model": "synthetic",
            "prompts": prompts,
            "seeds": [0],
            "num_inference_steps": _STEPS,
            "timesteps": [1.0, 0.75, 0.5, 0.25],
            "height": 8,
            "width": 8,
            "grid": list(_GRID),
            "n_txt": _N_TXT,
            "top_k": _TOP_K,
            "sites": entries,
            "images": "images/",
            "examples": examples,
            "prompt_tokens": prompt_tokens,
            "prompt_token_ids": ids,
            "vocab": vocab,
        },
    )
    return path
