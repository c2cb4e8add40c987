"""Held-out evaluation of conditioned dictionaries: FVU, cosine, L0, dead and dense features.

For a dictionary at site ``s`` and a group of held-out rows ``G`` (all rows, the rows of one
timestep ``t``, or, for the text stream of a harvest that tags T5 padding, the real-token rows or
the padding rows), with targets ``y [N, D]`` and reconstructions ``ŷ`` (transcoder: from ``x``; SAE:
from ``y``) and activations ``z [N, d_sae]``::

    FVU                = Σ_n ‖y_n − ŷ_n‖² / Σ_n ‖y_n − ȳ‖²        (ȳ: mean over G)
    explained_variance = 1 − FVU
    cosine             = mean_n cos(y_n, ŷ_n)
    l0                 = mean_n #{i : z_n,i > 0}
    dead_fraction      = #{i : z_·,i = 0 on every row of G} / d_sae
    dense_fraction     = #{i : feature i is active on > dense_threshold of G's rows} / d_sae
    overactive_fraction = the same with 30 % for the threshold (see ``quality.py``)

Sums are accumulated in float64 over batches, so the numbers do not depend on the batch size.
Group ``"all"`` holds every row of the harvest: for text, padding included when it was kept
(FLUX attends to every T5 position); ``"real"`` and ``"padding"`` split it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difract_ext.capture.format import HarvestReader
from difract_ext.training.quality import OVERACTIVE_RATE, quality_problems
from difract_ext.training.store import TrainedDictionary
from difract_ext.util.config import config_to_dict
from difract_ext.util.files import read_json

logger = logging.getLogger(__name__)

ALL = "all"
#: text rows of real T5 tokens / of T5 padding (harvests with ``text_padding="tag"`` only)
REAL, PADDING = "real", "padding"


class _Acc:
    """Streaming sums for one (dictionary, group)."""

    def __init__(self, d: int, d_sae: int):
        self.n = 0
        self.sse = 0.0
        self.sum_y = torch.zeros(d, dtype=torch.float64)
        self.sum_y2 = torch.zeros(d, dtype=torch.float64)
        self.cos = 0.0
        self.l0 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, active: torch.Tensor) -> None:
        y64, e = y.double(), (y - y_hat).double()
        self.n += y.shape[0]
        self.sse += float(e.pow(2).sum())
        self.sum_y += y64.sum(0).cpu()
        self.sum_y2 += y64.pow(2).sum(0).cpu()
        self.cos += float(
            torch.nn.functional.cosine_similarity(y64, y_hat.double(), dim=-1, eps=1e-12).sum()
        )
        self.l0 += float(active.sum())
        self.fires += active.sum(0).double().cpu()

    def result(self, dense_threshold: float) -> dict[str, float]:
        n = max(self.n, 1)
        sst = float((self.sum_y2 - self.sum_y.pow(2) / n).sum())
        fvu = self.sse / sst if sst > 0 else float("nan")
        freq = self.fires / n
        return {
            "n_rows": float(self.n),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / n,
            "cosine": self.cos / n,
            "l0": self.l0 / n,
            "l0_fraction": self.l0 / n / self.fires.numel(),
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((freq > dense_threshold).double().mean()),
            "overactive_fraction": float((freq > OVERACTIVE_RATE).double().mean()),
        }


@dataclass
class DictionaryEval:
    """Metrics of one dictionary: ``groups["all"]`` and ``groups["t=0.5"]`` etc."""

    name: str
    site: str
    role: str
    activation: str
    sparsity: float
    d_sae: int
    groups: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return config_to_dict(self)


def t_label(t: float) -> str:
    return f"t={t:g}"


def is_t_label(group: str) -> bool:
    """Whether ``group`` is a per-timestep group (``"t=0.5"``)."""
    return group.startswith("t=")


@torch.no_grad()
def evaluate_dictionaries(
    dictionaries: Sequence[TrainedDictionary],
    data: str | Path | HarvestReader,
    *,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    per_timestep: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[DictionaryEval]:
    """Evaluate every dictionary on the held-out rows of its site (one pass over the shards).

    Args:
        dictionaries: loaded dictionaries (:func:`~difract_ext.training.store.load_dictionaries`).
        data: held-out harvest folder (or reader) containing every dictionary's site.
        batch_size: rows per forward pass (results do not depend on it).
        dense_threshold: firing rate above which a feature counts as dense.
        per_timestep: also report one group per distinct t.

    Text dictionaries evaluated on a harvest that tags T5 padding also get groups ``"real"`` and
    ``"padding"`` (``"all"`` is both).

    Returns:
        one :class:`DictionaryEval` per dictionary, in input order.
    """
    reader = data if isinstance(data, HarvestReader) else HarvestReader(data)
    have = {str(s) for s in reader.sites}
    for d in dictionaries:
        if str(d.spec.site) not in have:
            raise ValueError(f"{reader.root} has no rows of {d.spec.site} (needed by {d.name})")
    accs: list[dict[str, _Acc]] = [{} for _ in dictionaries]
    streams = sorted({d.spec.site.stream for d in dictionaries})
    for i in tqdm(range(len(reader.shards)), desc="eval", unit="shard", disable=not progress):
        for stream in streams:
            idx = [j for j, d in enumerate(dictionaries) if d.spec.site.stream == stream]
            sites = sorted({dictionaries[j].spec.site for j in idx})
            rows = reader.stream_rows(i, stream, sites, valid_only=False)
            if not rows:
                continue
            valid_rows = rows.pop("valid", None)
            n = rows["t"].shape[0]
            for lo in range(0, n, batch_size):
                t = rows["t"][lo : lo + batch_size].to(device)
                groups: dict[str, torch.Tensor | None] = {ALL: None}
                if valid_rows is not None:
                    valid = valid_rows[lo : lo + batch_size].to(device)
                    groups.update({REAL: valid, PADDING: ~valid})
                if per_timestep:
                    for tv in torch.unique(t).tolist():
                        groups[t_label(tv)] = t == tv
                for j in idx:
                    d = dictionaries[j]
                    key = str(d.spec.site)
                    x = rows[f"{key}.x"][lo : lo + batch_size].to(
                        device=device, dtype=torch.float32
                    )
                    y = rows[f"{key}.y"][lo : lo + batch_size].to(
                        device=device, dtype=torch.float32
                    )
                    z = d.module.encode(y if d.spec.role == "sae" else x, t=t)
                    y_hat = d.module.linear_decode(z)
                    active = z > 0
                    for g, mask in groups.items():
                        if mask is not None and not bool(mask.any()):
                            continue
                        acc = accs[j].get(g)
                        if acc is None:
                            acc = accs[j][g] = _Acc(y.shape[-1], z.shape[-1])
                        if mask is None:
                            acc.add(y, y_hat, active)
                        else:
                            acc.add(y[mask], y_hat[mask], active[mask])
    out = []
    for d, acc in zip(dictionaries, accs):
        ev = DictionaryEval(
            d.name,
            str(d.spec.site),
            d.spec.role,
            d.spec.activation,
            d.spec.sparsity,
            int(d.module.cfg.d_sae),
        )
        order = [ALL, REAL, PADDING] + sorted(
            (g for g in acc if is_t_label(g)), key=lambda s: -float(s[2:])
        )
        ev.groups = {g: acc[g].result(dense_threshold) for g in order if g in acc}
        out.append(ev)
    return out


def check_disjoint(
    eval_data: HarvestReader, dictionaries: Sequence[TrainedDictionary]
) -> list[str]:
    """Prompts of the evaluation data that some dictionary was trained on.

    Uses the training harvest's prompt list when its folder is still readable; otherwise compares
    the recorded SHA-256 of the whole prompt list (and logs that overlap could not be ruled out).
    """
    import hashlib

    eval_prompts = set(eval_data.prompts)
    overlap: set[str] = set()
    digest = hashlib.sha256("\n".join(eval_data.prompts).encode()).hexdigest()
    for root in sorted({d.training.get("data", {}).get("root", "") for d in dictionaries}):
        cfg = Path(root) / "harvest_config.json"
        if root and cfg.is_file():
            prompts = read_json(cfg, "harvest config", required=["prompts"])["prompts"]
            overlap |= eval_prompts & {p for p in prompts if isinstance(p, str)}
        else:
            logger.warning(
                "training data %r not readable: held-out disjointness only checked by digest", root
            )
    for d in dictionaries:
        if d.training.get("data", {}).get("prompts_sha256") == digest:
            overlap |= eval_prompts
    return sorted(overlap)


def eval_table(evals: Sequence[DictionaryEval], group: str = ALL) -> str:
    """Markdown table: one row per dictionary (metrics of ``group``), with the quality verdict."""
    head = (
        "| dictionary | site | role | act. | sparsity | d_sae | EV | FVU | cosine | L0 | "
        "L0/d_sae | dead | dense | check |\n" + "|---" * 14 + "|\n"
    )
    lines = []
    for e in evals:
        m = e.groups.get(group)
        if m is None:
            continue
        lines.append(
            f"| {e.name} | {e.site} | {e.role} | {e.activation} | {e.sparsity:g} | {e.d_sae} | "
            f"{m['explained_variance']:.4f} | {m['fvu']:.4f} | {m['cosine']:.4f} | {m['l0']:.2f} | "
            f"{m['l0_fraction']:.2%} | {m['dead_fraction']:.2%} | {m['dense_fraction']:.2%} | "
            f"{verdict(m)} |"
        )
    return head + "\n".join(lines) + "\n"


def verdict(metrics: dict[str, float]) -> str:
    """``"ok"`` or ``"**FAIL**: <why>"`` (see :mod:`~difract_ext.training.quality`)."""
    problems = quality_problems(metrics)
    return "ok" if not problems else "**FAIL**: " + "; ".join(problems)


def per_timestep_table(evals: Sequence[DictionaryEval]) -> str:
    """Markdown table of explained variance and L0 per dictionary and timestep."""
    groups = sorted(
        {g for e in evals for g in e.groups if is_t_label(g)}, key=lambda s: -float(s[2:])
    )
    head = "| dictionary | " + " | ".join(f"EV {g} | L0 {g}" for g in groups) + " |\n"
    head += "|---|" + "---|---|" * len(groups) + "\n"
    lines = []
    for e in evals:
        cells = []
        for g in groups:
            m = e.groups.get(g)
            cells += [f"{m['explained_variance']:.4f}", f"{m['l0']:.2f}"] if m else ["", ""]
        lines.append(f"| {e.name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def padding_table(evals: Sequence[DictionaryEval]) -> str:
    """Markdown table of the text dictionaries evaluated with tagged padding: EV, cosine and L0
    over every position, real tokens and padding (empty if none)."""
    rows = [e for e in evals if PADDING in e.groups]
    if not rows:
        return ""
    head = (
        "| dictionary | EV all | EV real | EV padding | cosine real | cosine padding | "
        "L0 real | L0 padding | padding rows |\n" + "|---" * 9 + "|\n"
    )
    lines = []
    for e in rows:
        a, r, p = e.groups[ALL], e.groups[REAL], e.groups[PADDING]
        lines.append(
            f"| {e.name} | {a['explained_variance']:.4f} | {r['explained_variance']:.4f} | "
            f"{p['explained_variance']:.4f} | {r['cosine']:.4f} | {p['cosine']:.4f} | "
            f"{r['l0']:.2f} | {p['l0']:.2f} | {p['n_rows'] / a['n_rows']:.0%} |"
        )
    return head + "\n".join(lines) + "\n"
