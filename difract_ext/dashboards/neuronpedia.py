"""Dashboards in Neuronpedia's formats: per-feature JSON, the feature batch upload body, and the
``feature_json_base_url`` a graph JSON needs to find them.

**Positions.** Neuronpedia shows an example as a list of tokens with one activation each. An
example of a diffusion step has ``T`` text tokens and ``rows × cols`` image patches; both streams
are written as one token list, in FLUX's joint order: ``tokens[p]`` for ``p < T`` is the prompt's
``p``-th T5 token, and ``tokens[T + r·cols + c]`` is the patch name ``"img r{r}c{c}"`` (row ``r``,
column ``c`` of the packed latent grid, row-major, as FLUX orders its image tokens). A feature of
the text stream has zeros on the patches and a feature of the image stream zeros on the text
tokens. ``train_token_ind`` is the position of the example's largest activation.

**Quantiles.** ``examples_quantiles`` holds one group per denoising step, best first:
``quantile_name = "step {s} (t={t:.3f}): top {k}"``; ``quantile_values`` are the activation
quantiles of :mod:`difract_ext.dashboards.store`.

The JSON Schemas the test validates against (a subset of Neuronpedia's ``graph-schema.json`` and
of circuit-tracer's feature model) ship as ``neuronpedia_schema.json``;
:func:`validate` checks a document without network access (``jsonschema`` when installed, else a
small checker of the same subset: types, required keys, ``items``, ``properties``, ``enum``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from difract_ext.dashboards.store import DashboardStore
from difract_ext.flux.sites import Site, as_site
from difract_ext.util.atomic import atomic_write_json

__all__ = [
    "add_feature_details",
    "batch_upload_body",
    "export_neuronpedia",
    "feature_json",
    "position_tokens",
    "schema",
    "validate",
]


def position_tokens(tokens: list[str], grid: tuple[int, int]) -> list[str]:
    """The ``T + rows·cols`` token names of one example (see the module docstring)."""
    rows, cols = grid
    return list(tokens) + [f"img r{r}c{c}" for r in range(rows) for c in range(cols)]


def _finite(x: float) -> float:
    return float(x) if math.isfinite(float(x)) else 0.0


def feature_json(
    store: DashboardStore,
    site: Site | str,
    feature: int,
    model_id: str = "difract-shapes",
    source: str | None = None,
) -> dict[str, Any]:
    """One feature in Neuronpedia's feature JSON (``index``, ``examples_quantiles``,
    ``act_min``, ``act_max``, ``quantile_values``, ``histogram``, ``activation_frequency``, and
    ``modelId`` / ``layer`` / ``transcoder_id`` naming it)."""
    payload = store.feature_payload(site, feature)
    site = as_site(site)
    source = source or f"{store.scan}-{site}"
    groups: dict[int, list[dict[str, Any]]] = {}
    for ex in payload["examples"]:
        acts = [float(a) for a in ex["token_acts"]] + [float(a) for a in ex["patch_acts"]]
        groups.setdefault(ex["step"], []).append(
            {
                "tokens": position_tokens(ex["tokens"], tuple(ex["grid"])),
                "tokens_acts_list": acts,
                "train_token_ind": int(max(range(len(acts)), key=lambda i: acts[i])),
                "is_repeated_datapoint": False,
                "prompt": ex["prompt"],
                "seed": ex["seed"],
                "step": ex["step"],
                "t": ex["t"],
                "image": ex["image"],
            }
        )
    k = int(store.index.get("top_k", 0))
    quantiles = []
    for step in sorted(groups):
        t = payload["profile"]["t"][step] if step < len(payload["profile"]["t"]) else float("nan")
        quantiles.append(
            {"quantile_name": f"step {step} (t={t:.3f}): top {k}", "examples": groups[step]}
        )
    return {
        "modelId": model_id,
        "layer": source,
        "transcoder_id": source,
        "index": int(feature),
        "label": payload["label"],
        "examples_quantiles": quantiles,
        "top_logits": [],
        "bottom_logits": [],
        "act_min": _finite(payload["act_min"]),
        "act_max": _finite(payload["act_max"]),
        "quantile_values": [float(v) for v in payload["quantiles"].values()],
        "histogram": payload["histogram"],
        "activation_frequency": float(payload["activation_frequency"]),
    }


def batch_upload_body(
    store: DashboardStore,
    site: Site | str,
    model_id: str = "difract-shapes",
    source: str | None = None,
    features: Iterable[int] | None = None,
) -> dict[str, Any]:
    """The feature batch upload body of one dictionary, in the layout SAEDashboard's Neuronpedia
    runner writes (``model_id``, ``layer``, ``sae_set``, ``features[{feature_index,
    frac_nonzero, freq_hist_data_bar_heights, freq_hist_data_bar_values, pos_str, pos_values,
    neg_str, neg_values, activations[{tokens, values, bin_min, bin_max, bin_contains,
    qualifying_token_index}]}]``)."""
    site = as_site(site)
    source = source or f"{store.scan}-{site}"
    feats = range(store.d_sae(site)) if features is None else features
    out = []
    for f in feats:
        fj = feature_json(store, site, f, model_id, source)
        hist = fj["histogram"]
        centres = [math.sqrt(a * b) for a, b in zip(hist["bin_edges"][:-1], hist["bin_edges"][1:])]
        acts = []
        for group in fj["examples_quantiles"]:
            for ex in group["examples"]:
                acts.append(
                    {
                        "tokens": ex["tokens"],
                        "values": ex["tokens_acts_list"],
                        "bin_min": -1,
                        "bin_max": fj["act_max"],
                        "bin_contains": -1,
                        "qualifying_token_index": ex["train_token_ind"],
                    }
                )
        out.append(
            {
                "feature_index": int(f),
                "frac_nonzero": fj["activation_frequency"],
                "freq_hist_data_bar_heights": hist["counts"],
                "freq_hist_data_bar_values": centres,
                "pos_str": [],
                "pos_values": [],
                "neg_str": [],
                "neg_values": [],
                "activations": acts,
            }
        )
    return {"model_id": model_id, "layer": str(site.layer), "sae_set": source, "features": out}


def add_feature_details(graph: dict[str, Any], base_url: str) -> dict[str, Any]:
    """A copy of a graph JSON dict with ``metadata.feature_details.feature_json_base_url`` set
    (where Neuronpedia fetches ``{base_url}/{feature}.json``); the input is not modified."""
    if not isinstance(graph, dict) or not isinstance(graph.get("metadata"), dict):
        raise ValueError("a graph JSON must be an object with a 'metadata' object")
    out = json.loads(json.dumps(graph))
    details = out["metadata"].setdefault("feature_details", {})
    details["feature_json_base_url"] = str(base_url).rstrip("/")
    return out


def export_neuronpedia(
    dash: str | Path | None,
    out: str | Path,
    model_id: str = "difract-shapes",
    source: str | None = None,
) -> list[Path]:
    """Write every feature of every site of the dashboard folder ``dash`` as
    ``out/{source}/{feature}.json`` plus ``out/{source}/batch-0.json`` (the upload body),
    ``source`` defaulting to ``{scan}-{site}``. Returns the feature files."""
    if dash is None:
        raise ValueError("export needs the dashboard folder: --dash DIR")
    store = DashboardStore.open(dash)
    written = []
    for site in store.sites:
        src = source + f"-{site}" if source else f"{store.scan}-{site}"
        folder = Path(out) / src
        for f in range(store.d_sae(site)):
            written.append(
                atomic_write_json(folder / f"{f}.json", feature_json(store, site, f, model_id, src))
            )
        atomic_write_json(folder / "batch-0.json", batch_upload_body(store, site, model_id, src))
    return written


@cache
def schema() -> dict[str, Any]:
    """The shipped JSON Schemas: ``{"graph": ..., "feature": ..., "batch": ...}``."""
    text = (files("difract_ext.dashboards") / "neuronpedia_schema.json").read_text()
    return json.loads(text)


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def _check(value: Any, sch: dict[str, Any], where: str, errors: list[str]) -> None:
    kinds = sch.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is_type(value, k) for k in kinds):
            errors.append(f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}")
            return
    if "enum" in sch and value not in sch["enum"]:
        errors.append(f"{where}: {value!r} not one of {sch['enum']}")
    if isinstance(value, dict):
        for key in sch.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required key {key!r}")
        for key, sub in sch.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{where}.{key}", errors)
    if isinstance(value, list) and "items" in sch:
        for i, item in enumerate(value):
            _check(item, sch["items"], f"{where}[{i}]", errors)


def validate(document: Any, kind: str) -> list[str]:
    """Errors of ``document`` against the shipped schema ``kind`` (``"graph"``, ``"feature"`` or
    ``"batch"``); [] when valid. Uses ``jsonschema`` when installed, else the built-in checker."""
    sch = schema()[kind]
    try:
        import jsonschema
    except ImportError:
        errors: list[str] = []
        _check(document, sch, kind, errors)
        return errors
    validator = jsonschema.Draft7Validator(sch)
    return [
        f"{kind}.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(document)
    ]
