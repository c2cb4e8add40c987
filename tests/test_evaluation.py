"""Evaluation: metrics against an independent numpy computation, disjointness, splicing, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from difract_ext.adapters.dictionaries import SAELENS_IO
from difract_ext.capture.synthetic import synthetic_harvest
from difract_ext.cli.eval_job import run_evaluation
from difract_ext.cli.sources import load_pipeline
from difract_ext.flux.sites import Site
from difract_ext.intervene.generation import splice_transcoders, spliced_generation
from difract_ext.training import (
    DictionarySpec,
    TrainConfig,
    evaluate_dictionaries,
    train_dictionaries,
)
from difract_ext.training.plots import curve_points, plot_sparsity_faithfulness
from difract_ext.training.specs import build_dictionary
from difract_ext.training.store import TrainedDictionary

IMG0 = Site(0, "img")


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_dictionary(
    role: str, activation: str, k: int | None = None, site: Site = IMG0
) -> TrainedDictionary:
    spec = DictionarySpec(
        site,
        role,
        activation,
        k=k,
        d_sae=40,
        d_t_embed=16,
        l1_coefficient=1e-3 if activation == "relu" else None,
    )
    d = build_dictionary(spec, 12, seed=5, io=SAELENS_IO)
    with torch.no_grad():
        d.mod_linear.weight.normal_(0, 0.3)
        d.b_enc.normal_(0, 0.5)
        d.b_enc[:6] = -50.0  # dead features
        d.b_enc[6:9] = 50.0  # dense features
        d.b_dec.normal_()
    return TrainedDictionary(spec.resolved_name, Path("."), spec, d, {})


def _numpy_metrics(y: np.ndarray, y_hat: np.ndarray, z: np.ndarray) -> dict[str, float]:
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    cos = (y * y_hat).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(y_hat, axis=1))
    act = z > 0
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "cosine": cos.mean(),
        "l0": act.sum(1).mean(),
        "dead_fraction": (~act.any(0)).mean(),
        "dense_fraction": (act.mean(0) > 0.1).mean(),
    }


@pytest.mark.parametrize(
    ("role", "activation", "k"), [("transcoder", "relu", None), ("sae", "topk", 5)]
)
def test_metrics_match_numpy(tmp_path: Path, role: str, activation: str, k: int | None) -> None:
    root = synthetic_harvest(tmp_path / "d", [IMG0], n_rows=1000, d_model=12, shard_rows=300)
    td = _random_dictionary(role, activation, k)
    [ev] = evaluate_dictionaries([td], root, batch_size=77, progress=False)
    from difract_ext.capture import HarvestReader

    x, y, meta = HarvestReader(root).site_rows(IMG0)
    t = meta["t"]
    with torch.no_grad():
        z = td.module.encode(y if role == "sae" else x, t=t)
        y_hat = z @ td.module.W_dec + td.module.b_dec
    groups = {"all": torch.ones_like(t, dtype=torch.bool)}
    groups.update({f"t={v:g}": t == v for v in (1.0, 0.75, 0.5, 0.25)})
    assert list(ev.groups) == ["all", "t=1", "t=0.75", "t=0.5", "t=0.25"]
    for g, mask in groups.items():
        ref = _numpy_metrics(
            y[mask].double().numpy(), y_hat[mask].double().numpy(), z[mask].numpy()
        )
        for key, value in ref.items():
            assert ev.groups[g][key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), (g, key)
        assert ev.groups[g]["n_rows"] == int(mask.sum())
    assert (
        ev.groups["all"]["dead_fraction"] >= 6 / 40 and ev.groups["all"]["dense_fraction"] >= 3 / 40
    )


def test_text_metrics_over_all_positions_real_tokens_and_padding(tmp_path: Path) -> None:
    """A harvest that tags T5 padding: "all" is every row, "real" / "padding" split it; each
    group matches numpy on exactly its rows."""
    from difract_ext.capture import HarvestReader
    from difract_ext.capture.synthetic import linear_plus_sparse, write_harvest
    from difract_ext.training.evaluation import padding_table

    txt0 = Site(0, "txt")
    x, y, t = linear_plus_sparse(900, 12, 16, threshold=1.0, seed=4)
    valid = torch.arange(900) % 4 != 0  # 675 real-token rows, 225 padding rows
    root = write_harvest(
        tmp_path / "h", {txt0: (x, y)}, {"txt": t}, shard_rows=400, text_valid=valid
    )
    td = _random_dictionary("transcoder", "relu", site=txt0)
    [ev] = evaluate_dictionaries([td], root, batch_size=77, progress=False)
    assert list(ev.groups) == ["all", "real", "padding", "t=1", "t=0.75", "t=0.5", "t=0.25"]
    x, y, meta = HarvestReader(root).site_rows(txt0, valid_only=False)
    assert torch.equal(meta["valid"], valid)
    with torch.no_grad():
        z = td.module.encode(x, t=meta["t"])
        y_hat = z @ td.module.W_dec + td.module.b_dec
    for g, mask in (("all", torch.ones_like(valid)), ("real", valid), ("padding", ~valid)):
        ref = _numpy_metrics(
            y[mask].double().numpy(), y_hat[mask].double().numpy(), z[mask].numpy()
        )
        for key, value in ref.items():
            assert ev.groups[g][key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), (g, key)
        assert ev.groups[g]["n_rows"] == int(mask.sum())
    table = padding_table([ev])
    ev_pad = ev.groups["padding"]["explained_variance"]
    assert f"| {td.name} | " in table and f"{ev_pad:.4f}" in table and "| 25% |" in table
    # the same rows untagged: one group of every row, equal to "all" above
    plain = write_harvest(tmp_path / "p", {txt0: (x, y)}, {"txt": meta["t"]}, shard_rows=400)
    [ev_plain] = evaluate_dictionaries([td], plain, per_timestep=False, progress=False)
    assert list(ev_plain.groups) == ["all"] and padding_table([ev_plain]) == ""
    assert ev_plain.groups["all"]["explained_variance"] == pytest.approx(
        ev.groups["all"]["explained_variance"], rel=1e-9
    )


def test_run_evaluation_rejects_training_prompts_and_writes_report(tmp_path: Path) -> None:
    kw = dict(sites=[IMG0], d_model=12, n_latents=16, threshold=1.0)
    train = synthetic_harvest(tmp_path / "train", n_rows=2048, **kw)
    held = synthetic_harvest(tmp_path / "held", n_rows=512, row_seed=7, **kw)
    specs = [
        DictionarySpec(IMG0, role, "relu", l1_coefficient=lam, d_sae=24, d_t_embed=16, lr=1e-2)
        for role in ("transcoder", "sae")
        for lam in (1e-4, 1e-2)
    ]
    train_dictionaries(
        train,
        specs,
        tmp_path / "dicts",
        TrainConfig(batch_size=256, epochs=2, log_every=0),
        progress=False,
        io=SAELENS_IO,
    )
    with pytest.raises(ValueError, match="training prompts"):
        run_evaluation(tmp_path / "dicts", train, tmp_path / "bad", progress=False)
    summary = run_evaluation(tmp_path / "dicts", held, tmp_path / "rep", progress=False)
    assert len(summary.evals) == 4
    for name in ("eval.json", "eval.md", "sparsity_faithfulness.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    md = (tmp_path / "rep" / "eval.md").read_text()
    assert "t=0.25" in md and "transcoders/img_0/relu_l1-1e-02_d24" in md
    pts = curve_points(summary.evals)
    assert set(pts) == {("img_0", "transcoder", "relu"), ("img_0", "sae", "relu")}
    assert all(len(v) == 2 for v in pts.values())


class _Probe(torch.nn.Module):
    """A stand-in transcoder: records the t it is given and outputs zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.W_dec = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.clone())
        return torch.zeros_like(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x, t))


def test_splice_replaces_the_mlp_and_restores_it() -> None:
    tiny = load_pipeline("tiny")
    pipe, kw = tiny.pipe, tiny.call_kwargs
    prompts, seeds = ["a red circle", "dog"], [0, 1]

    def run() -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompt=prompts, generator=gens, output_type="latent", **kw).images

    base = run()
    probe = _Probe()
    with splice_transcoders(pipe.transformer, {Site(1, "txt"): probe}):
        spliced = run()
    assert not torch.equal(base, spliced)
    assert torch.equal(run(), base)  # hooks removed
    assert [p.tolist() for p in probe.seen] == [[v, v] for v in (1.0, 0.75, 0.5, 0.25)]
    # a real transcoder through spliced_generation: baseline row first, then single and all
    tcs = {}
    for site in (Site(0, "img"), Site(1, "txt")):
        spec = DictionarySpec(site, d_sae=64, d_t_embed=16)
        tcs[site] = build_dictionary(spec, 32, seed=site.layer, io=SAELENS_IO)
    rows = spliced_generation(
        pipe,
        prompts,
        seeds,
        tcs,
        kw,
        progress=False,
        score_images=lambda ims, ps: {"n": float(len(ims))},
    )
    assert [r["spliced"] for r in rows] == ["none", "img_0", "txt_1", "all (2)"]
    assert rows[0]["latent_cosine"] == pytest.approx(1.0) and rows[0]["latent_mse"] == 0.0
    assert all(r["latent_mse"] > 0 and r["adherence/n"] == 2.0 for r in rows[1:])


def test_plot_needs_points(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_sparsity_faithfulness([], tmp_path / "x.png")
