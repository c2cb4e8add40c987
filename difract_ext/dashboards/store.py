"""A dashboard folder on disk: its format, its writer and its reader (:class:`DashboardStore`).

A folder ``DASH/`` holds

- ``index.json``: what was scanned (``format`` = :data:`FORMAT`, ``scan``, ``model``,
  ``prompts``, ``seeds``, ``num_inference_steps``, ``timesteps``, ``height``, ``width``,
  ``grid`` = [rows, cols], ``n_txt`` = T, ``top_k``, ``sites``, ``images``) plus the examples
  (``examples[e] = {"prompt": i, "seed": s, "image": "images/..png"}``, ``e = i·n_seeds + j``),
  each prompt's T tokens (``prompt_tokens``, padding included), the token vocabulary of the
  prompt set (``vocab``; ``prompt_token_ids[i][p]`` indexes it, -1 for padding / special tokens)
  and the histogram bins (:data:`HIST_EDGES`);
- ``{site}.safetensors`` with, for a dictionary of ``F`` features, ``S`` steps, top ``k``,
  ``P`` positions of the site's stream (``rows·cols`` image patches, or ``T`` text tokens) and
  ``V`` vocabulary entries:

  ============== ============= =========================================================
  ``top_act``    f32 [F, S, k] the k largest example activations per step (max over P),
                               best first; ties broken by the smaller example index
  ``top_example`` i32 [F, S, k] their example indices (-1: empty slot)
  ``top_map``    f16 [F,S,k,P] the activation at every position of those examples
  ``act_max``    f32 [F]       largest activation seen; ``act_min`` the smallest
  ``hist``       i32 [F, B']   counts of positive activations in the bins :data:`HIST_EDGES`
                               ``hist_lo .. hist_lo+B'`` (the site's non-empty range)
  ``profile_sum`` f32 [F, S]   sum of activations per step; ``profile_fire`` i64: count > 0
  ``token_sum``  f32 [F, V]    see :func:`top_tokens`; ``token_count`` i64 [V]
  ============== ============= =========================================================

- ``{site}.labels.json`` (optional): ``{"<feature>": {"label", "f1", "precision", "recall"}}``;
- ``images/``: one PNG per example.

An activation *fires* where it is > 0. Quantiles (``quantiles`` in a payload) are those of the
firing activations, read from the histogram (geometric bins, ~15 % wide), so they are exact to a
bin; ``1.0`` is the exact maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difract_ext.flux.sites import Site, SiteError, as_site
from difract_ext.util.atomic import atomic_write_json, atomic_write_with
from difract_ext.util.files import BadFileError, read_json, read_safetensors_header

__all__ = [
    "FORMAT",
    "HIST_EDGES",
    "QUANTILES",
    "SITE_TENSORS",
    "LABEL_MIN_F1",
    "DashboardError",
    "DashboardStore",
    "quantiles_from_hist",
    "write_index",
    "write_labels",
    "write_site",
]

#: Graph nodes show a concept label only when the feature detects it with at least this F1.
LABEL_MIN_F1 = 0.5

FORMAT = "difract-dashboards/1"
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 1.0)
#: Histogram bins of positive activations: 1e-4 .. 1e4 in 128 geometric steps (ratio ~1.155);
#: values below the first edge count in bin 0, above the last in the last bin.
HIST_EDGES: tuple[float, ...] = tuple(10.0 ** (-4 + 8 * i / 128) for i in range(129))
SITE_TENSORS: tuple[str, ...] = (
    "top_act",
    "top_example",
    "top_map",
    "act_max",
    "act_min",
    "hist",
    "profile_sum",
    "profile_fire",
    "token_sum",
    "token_count",
)
_DISPLAY_BINS = 32
_TOP_TOKENS = 8


class DashboardError(ValueError):
    """Not a dashboard folder, an unknown site, or a feature out of range; the message says which
    and how to fix it."""


def write_site(dash: str | Path, site: Site | str, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Atomically write ``DASH/{site}.safetensors`` (the tensors of the module docstring)."""
    missing = [n for n in SITE_TENSORS if n not in tensors]
    if missing:
        raise ValueError(f"site tensors missing {missing}")
    data = {n: tensors[n].detach().cpu().contiguous() for n in SITE_TENSORS}
    hist = data["hist"]
    if hist.shape[1] != len(HIST_EDGES) - 1:
        raise ValueError(f"hist must have {len(HIST_EDGES) - 1} bins, got {hist.shape[1]}")
    used = torch.nonzero(hist.sum(0)).flatten()
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 0)
    data["hist"] = hist[:, lo:hi].to(torch.int32).contiguous()
    data["hist_lo"] = torch.tensor([lo], dtype=torch.int64)
    path = Path(dash) / f"{as_site(site)}.safetensors"
    atomic_write_with(path, lambda tmp: save_file(data, str(tmp)))
    path.chmod(0o644)  # safetensors creates 0600 files; dashboards are shared, read-only data
    return path


def write_index(dash: str | Path, index: Mapping[str, Any]) -> Path:
    """Atomically write ``DASH/index.json`` (``format`` is set to :data:`FORMAT`)."""
    return atomic_write_json(Path(dash) / "index.json", {**index, "format": FORMAT})


def write_labels(
    dash: str | Path, site: Site | str, labels: Mapping[int, Mapping[str, Any]]
) -> Path:
    """Atomically write ``DASH/{site}.labels.json``: ``{feature: {"label", "f1", ...}}``."""
    body = {str(int(f)): dict(v) for f, v in sorted(labels.items())}
    return atomic_write_json(Path(dash) / f"{as_site(site)}.labels.json", body)


def quantiles_from_hist(
    counts: torch.Tensor, act_max: float, levels: tuple[float, ...] = QUANTILES
) -> dict[str, float]:
    """Quantiles of the positive activations from their histogram ``counts`` [B] over
    :data:`HIST_EDGES` (geometric interpolation inside a bin); level 1.0 is ``act_max``. All 0.0
    for a feature that never fired."""
    counts = counts.to(torch.float64)
    total = float(counts.sum())
    out: dict[str, float] = {}
    cum = torch.cumsum(counts, 0)
    for q in levels:
        if total == 0:
            out[str(q)] = 0.0
            continue
        if q >= 1.0:
            out[str(q)] = float(act_max)
            continue
        target = q * total
        b = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)))
        b = min(b, len(counts) - 1)
        before = float(cum[b - 1]) if b > 0 else 0.0
        frac = (target - before) / max(float(counts[b]), 1.0)
        lo, hi = HIST_EDGES[b], HIST_EDGES[b + 1]
        val = lo * (hi / lo) ** min(max(frac, 0.0), 1.0)
        out[str(q)] = float(min(val, act_max))
    return out


def _display_histogram(counts: torch.Tensor) -> dict[str, list]:
    """The non-empty range of the fine histogram in at most 32 groups of whole fine bins."""
    nz = torch.nonzero(counts).flatten()
    if nz.numel() == 0:
        return {"bin_edges": [], "counts": []}
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    width = max(1, math.ceil((hi - lo) / _DISPLAY_BINS))
    edges, out = [], []
    for b in range(lo, hi, width):
        e = min(b + width, hi)
        edges.append(HIST_EDGES[b])
        out.append(int(counts[b:e].sum()))
    edges.append(HIST_EDGES[min(lo + width * len(out), hi)])
    return {"bin_edges": edges, "counts": out}


@dataclass(frozen=True)
class _SiteInfo:
    site: Site
    file: str
    kind: str
    d_sae: int
    stream: str
    layer: int


class DashboardStore:
    """Read access to a dashboard folder (see the module docstring); open with :meth:`open`."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = path
        self.index = index
        self._infos: dict[Site, _SiteInfo] = {}
        for key, entry in index["sites"].items():
            site = as_site(key)
            self._infos[site] = _SiteInfo(
                site,
                str(entry["file"]),
                str(entry["kind"]),
                int(entry["d_sae"]),
                str(entry.get("stream", site.stream)),
                int(entry.get("layer", site.layer)),
            )
        self._tensors: dict[Site, dict[str, torch.Tensor]] = {}
        self._labels: dict[Site, dict[str, Any]] = {}

    @classmethod
    def open(cls, path: str | Path) -> DashboardStore:
        """Open ``path``.

        Raises:
            DashboardError: ``path`` is not a dashboard folder (no ``index.json`` of
                :data:`FORMAT`), or a site file it names is missing.
        """
        path = Path(path)
        if not path.is_dir():
            raise DashboardError(
                f"{path}: not a dashboard folder (no such directory); build one with "
                "`difract dashboards --out DIR` or point at a folder holding index.json"
            )
        index_path = path / "index.json"
        if not index_path.is_file():
            raise DashboardError(
                f"{path}: not a dashboard folder (no index.json); build one with "
                "`difract dashboards --out DIR`"
            )
        try:
            index = read_json(index_path, "dashboard index", required=("format", "sites"))
        except BadFileError as e:
            raise DashboardError(str(e)) from None
        if index.get("format") != FORMAT:
            raise DashboardError(
                f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}; "
                "not a dashboard index, or written by another version (rebuild it)"
            )
        store = cls(path, index)
        for info in store._infos.values():
            if not (path / info.file).is_file():
                raise DashboardError(
                    f"{path}: index.json names {info.file} for site {info.site} but it is "
                    "missing; the scan did not finish (resume it with --resume)"
                )
        return store

    # -- what is there ----------------------------------------------------------------------
    @property
    def scan(self) -> str:
        return str(self.index.get("scan", self.path.name))

    @property
    def sites(self) -> list[Site]:
        return sorted(self._infos)

    @cached_property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.index["grid"]
        return int(rows), int(cols)

    def info(self, site: Site | str) -> _SiteInfo:
        """The index entry of ``site``.

        Raises:
            DashboardError: the folder has no dashboards for ``site``.
        """
        try:
            s = as_site(site)
        except SiteError as e:
            raise DashboardError(str(e)) from None
        if s not in self._infos:
            have = ", ".join(str(x) for x in self.sites) or "none"
            raise DashboardError(
                f"{self.path}: no dashboards for site {s} (this folder has: {have})"
            )
        return self._infos[s]

    def d_sae(self, site: Site | str) -> int:
        return self.info(site).d_sae

    def _check_feature(self, site: Site | str, feature: int) -> _SiteInfo:
        info = self.info(site)
        if isinstance(feature, bool) or not isinstance(feature, int):
            raise DashboardError(f"feature must be an int, got {feature!r}")
        if not 0 <= feature < info.d_sae:
            raise DashboardError(
                f"feature {feature} out of range for site {info.site}: its dictionary has "
                f"{info.d_sae} features (0..{info.d_sae - 1})"
            )
        return info

    def tensors(self, site: Site | str) -> dict[str, torch.Tensor]:
        """All tensors of ``site`` (loaded once, then cached)."""
        info = self.info(site)
        if info.site not in self._tensors:
            path = self.path / info.file
            try:
                headers, _ = read_safetensors_header(path, "dashboard site file")
            except BadFileError as e:
                raise DashboardError(str(e)) from None
            missing = [n for n in (*SITE_TENSORS, "hist_lo") if n not in headers]
            if missing:
                raise DashboardError(f"{path}: missing tensors {missing}; rebuild the dashboards")
            with safe_open(str(path), framework="pt") as f:
                t = {n: f.get_tensor(n) for n in (*SITE_TENSORS, "hist_lo")}
            full = torch.zeros(t["hist"].shape[0], len(HIST_EDGES) - 1, dtype=torch.int64)
            lo = int(t.pop("hist_lo")[0])
            full[:, lo : lo + t["hist"].shape[1]] = t["hist"]
            t["hist"] = full
            self._tensors[info.site] = t
        return self._tensors[info.site]

    def labels(self, site: Site | str) -> dict[str, Any]:
        """``{"<feature>": {"label", "f1", "precision", "recall"}}`` ({} without a labels file)."""
        info = self.info(site)
        if info.site not in self._labels:
            path = self.path / f"{info.site}.labels.json"
            self._labels[info.site] = read_json(path, "dashboard labels") if path.is_file() else {}
        return self._labels[info.site]

    def label(self, site: Site | str, feature: int) -> str | None:
        """The concept label of a feature (``"colour=red"``), or None."""
        info = self._check_feature(site, feature)
        entry = self.labels(info.site).get(str(feature))
        return None if entry is None else entry.get("label")

    def graph_label(
        self, site: Site | str, feature: int, min_f1: float = LABEL_MIN_F1
    ) -> str | None:
        """What a graph shows for a feature: ``"colour=red (F1 0.93)"``, or None when it has no
        concept detected with F1 >= ``min_f1`` (a best concept at F1 0.08 is not a meaning)."""
        info = self._check_feature(site, feature)
        entry = self.labels(info.site).get(str(feature))
        if not entry or entry.get("label") is None:
            return None
        f1 = entry.get("f1")
        if not isinstance(f1, (int, float)) or f1 < min_f1:
            return None
        return f"{entry['label']} (F1 {f1:.2f})"

    # -- one feature ------------------------------------------------------------------------
    def top_tokens(self, site: Site | str, feature: int, n: int = _TOP_TOKENS) -> list[dict]:
        """The prompt tokens with the largest mean activation.

        For a text-stream feature: mean activation at the positions holding that token. For an
        image-stream feature: mean over the (example, step)s whose prompt holds the token of the
        example's largest patch activation. Tokens the prompts never hold are skipped.
        """
        info = self._check_feature(site, feature)
        t = self.tensors(info.site)
        count = t["token_count"].to(torch.float64)
        mean = t["token_sum"][feature].to(torch.float64) / count.clamp_min(1)
        mean[count == 0] = -math.inf
        order = torch.argsort(mean, descending=True, stable=True)[:n]
        vocab = self.index.get("vocab", [])
        return [
            {"token": vocab[int(v)], "mean_act": float(mean[v])}
            for v in order
            if math.isfinite(float(mean[v])) and float(mean[v]) > 0
        ]

    def examples(self, site: Site | str, feature: int) -> list[dict]:
        """The top examples of a feature: per step, best first (the payload's ``examples``)."""
        info = self._check_feature(site, feature)
        t = self.tensors(info.site)
        rows, cols = self.grid
        n_txt = int(self.index["n_txt"])
        timesteps = self.index.get("timesteps", [])
        out = []
        top_act, top_ex, top_map = t["top_act"][feature], t["top_example"][feature], t["top_map"]
        for step in range(top_act.shape[0]):
            for j in range(top_act.shape[1]):
                e = int(top_ex[step, j])
                if e < 0:
                    continue
                ex = self.index["examples"][e]
                acts = top_map[feature, step, j].to(torch.float32).tolist()
                zeros_txt, zeros_img = [0.0] * n_txt, [0.0] * (rows * cols)
                out.append(
                    {
                        "prompt": self.index["prompts"][ex["prompt"]],
                        "seed": int(ex["seed"]),
                        "step": step,
                        "t": float(timesteps[step]) if step < len(timesteps) else None,
                        "act": float(top_act[step, j]),
                        "image": ex["image"],
                        "grid": [rows, cols],
                        "tokens": list(self.index["prompt_tokens"][ex["prompt"]]),
                        "token_acts": acts if info.stream == "txt" else zeros_txt,
                        "patch_acts": acts if info.stream == "img" else zeros_img,
                    }
                )
        return out

    def feature_payload(self, site: Site | str, feature: int) -> dict[str, Any]:
        """One feature's dashboard as a JSON-able dict (the format in
        ``notes/dashboards_interface.md``: site, stream, layer, index, kind, label, label_f1,
        act_min, act_max, activation_frequency, quantiles, histogram, profile, top_tokens,
        examples).

        Raises:
            DashboardError: unknown site, or feature out of range.
        """
        info = self._check_feature(site, feature)
        t = self.tensors(info.site)
        steps = int(t["profile_sum"].shape[1])
        per_step = float(self.index["sites"][str(info.site)]["positions_per_step"])
        fire = t["profile_fire"][feature].to(torch.float64)
        entry = self.labels(info.site).get(str(feature)) or {}
        act_max = float(t["act_max"][feature])
        return {
            "site": str(info.site),
            "stream": info.stream,
            "layer": info.layer,
            "index": feature,
            "kind": info.kind,
            "label": entry.get("label"),
            "label_f1": entry.get("f1"),
            "act_min": float(t["act_min"][feature]),
            "act_max": act_max,
            "activation_frequency": float(fire.sum()) / max(per_step * steps, 1.0),
            "quantiles": quantiles_from_hist(t["hist"][feature], max(act_max, 0.0)),
            "histogram": _display_histogram(t["hist"][feature]),
            "profile": {
                "step": list(range(steps)),
                "t": [float(x) for x in self.index.get("timesteps", [])][:steps],
                "mean": (t["profile_sum"][feature].to(torch.float64) / max(per_step, 1.0)).tolist(),
                "frequency": (fire / max(per_step, 1.0)).tolist(),
            },
            "top_tokens": self.top_tokens(info.site, feature),
            "examples": self.examples(info.site, feature),
        }

    def feature_summaries(self, site: Site | str) -> list[dict[str, Any]]:
        """One small row per feature of ``site`` (for searchable lists): ``index``, ``label``,
        ``label_f1``, ``act_max``, ``activation_frequency``."""
        info = self.info(site)
        t = self.tensors(info.site)
        labels = self.labels(info.site)
        per = float(self.index["sites"][str(info.site)]["positions_per_step"])
        total = max(per * t["profile_fire"].shape[1], 1.0)
        freq = (t["profile_fire"].sum(1).to(torch.float64) / total).tolist()
        amax = t["act_max"].tolist()
        return [
            {
                "index": f,
                "label": (labels.get(str(f)) or {}).get("label"),
                "label_f1": (labels.get(str(f)) or {}).get("f1"),
                "act_max": float(amax[f]),
                "activation_frequency": float(freq[f]),
            }
            for f in range(info.d_sae)
        ]
