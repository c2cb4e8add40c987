"""Training: the recipe learns, the dead-feature remedies work, resume is exact, output layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE

from difract_ext import SAELENS_IO, TimestepSAE, TimestepTranscoder
from difract_ext.capture.synthetic import synthetic_harvest
from difract_ext.flux.sites import Site
from difract_ext.training import (
    DictionarySpec,
    TrainConfig,
    difract_recipe,
    evaluate_dictionaries,
    load_dictionaries,
    train_dictionaries,
)
from difract_ext.training import trainer as trainer_mod
from difract_ext.training.objective import Objective
from difract_ext.training.specs import build_dictionary, specs_from_options
from difract_ext.util.schedules import warmup_cosine

IMG0 = Site(0, "img")


pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(d_t_embed=16, lr=1e-2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    kw = dict(sites=[IMG0, Site(1, "txt")], d_model=16, n_latents=32, threshold=1.0)
    return {
        "train": synthetic_harvest(root / "train", n_rows=6144, shard_rows=2048, **kw),
        "held": synthetic_harvest(root / "held", n_rows=2048, row_seed=99, **kw),
    }


def test_transcoder_learns_linear_plus_sparse_mlp(data: dict[str, Path], tmp_path: Path) -> None:
    specs = [
        DictionarySpec(IMG0, "transcoder", "relu", l1_coefficient=1e-3, d_sae=64, **SMALL),
        DictionarySpec(IMG0, "transcoder", "topk", k=6, d_sae=64, **SMALL),
    ]
    cfg = TrainConfig(
        batch_size=256,
        epochs=12,
        log_every=0,
        dead_window=40,
        resample_every=60,
        l1_warmup_steps=50,
    )
    res = train_dictionaries(
        data["train"], specs, tmp_path / "out", cfg, progress=False, io=SAELENS_IO
    )
    assert res.finished and res.global_step == 12 * 24
    evals = {
        e.name: e.groups["all"]
        for e in evaluate_dictionaries(
            load_dictionaries(tmp_path / "out", io=SAELENS_IO), data["held"], progress=False
        )
    }
    relu, topk = evals[specs[0].resolved_name], evals[specs[1].resolved_name]
    assert relu["fvu"] < 0.1 and topk["fvu"] < 0.12, (relu, topk)
    assert topk["l0"] <= 6.0 and relu["l0"] < 32
    # an untrained dictionary is far worse: the test can fail
    fresh = build_dictionary(specs[0], 16, seed=1, io=SAELENS_IO)
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    out = Objective(fresh, "transcoder")(x, y, torch.full((64,), 0.5))
    assert float(out.nmse) > 0.5


def test_output_layout_is_saelens_with_metrics(data: dict[str, Path], tmp_path: Path) -> None:
    specs = difract_recipe(
        [IMG0, Site(1, "txt")], roles=("transcoder", "sae"), expansion_factor=2, **SMALL
    )
    cfg = TrainConfig(batch_size=512, epochs=1, log_every=4)
    res = train_dictionaries(
        data["train"], specs, tmp_path / "out", cfg, progress=False, io=SAELENS_IO
    )
    assert sorted(res.dictionaries) == sorted(s.resolved_name for s in specs)
    tc_path = res.dictionaries["transcoders/img_0/relu_l1-3e-04_x2"]
    for f in ("cfg.json", "sae_weights.safetensors", "metrics.json", "training.json"):
        assert (tc_path / f).is_file()
    tc = SAE.load_from_disk(str(tc_path))
    assert isinstance(tc, TimestepTranscoder)
    assert isinstance(
        SAE.load_from_disk(str(res.dictionaries["saes/txt_1/relu_l1-5e-05_x2"])), TimestepSAE
    )
    tc.check_unit_norm_decoder(atol=1e-5)
    assert tc.cfg.trained_timesteps == [0.25, 0.5, 0.75, 1.0]
    assert tc.cfg.metadata.hook_name == "transformer_blocks.0.ff.input"
    assert tc.cfg.metadata.hook_name_out == "transformer_blocks.0.ff.output"
    metrics = json.loads((tc_path / "metrics.json").read_text())
    assert metrics["steps"] == 12 and len(metrics["history"]) == 3
    assert {"nmse", "l0", "dead_fraction"} <= set(metrics["final"])
    training = json.loads((tc_path / "training.json").read_text())
    assert training["spec"]["l1_coefficient"] == 3e-4 and training["config"]["batch_size"] == 512
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["dictionaries"]) == 4
    assert not (tmp_path / "out" / "checkpoint").exists()  # removed once the run is finished
    with pytest.raises(ValueError, match="already holds a finished training run"):
        train_dictionaries(
            data["train"], specs, tmp_path / "out", cfg, progress=False, io=SAELENS_IO
        )


def test_resume_gives_identical_weights(data: dict[str, Path], tmp_path: Path) -> None:
    specs = [
        DictionarySpec(IMG0, "transcoder", "relu", l1_coefficient=1e-3, d_sae=48, **SMALL),
        DictionarySpec(Site(1, "txt"), "sae", "topk", k=3, d_sae=48, **SMALL),
    ]
    # 3 shards, one per group: stopping at step 7 is inside the second group; resampling
    # (every 5 steps) and aux-k (dead window 3) both run before and after the stop.
    cfg = TrainConfig(
        batch_size=512,
        epochs=2,
        mix_shards=1,
        dead_window=3,
        resample_every=5,
        resample_until=1.0,
        l1_warmup_steps=10,
        lr_warmup_steps=3,
        log_every=2,
    )
    full = train_dictionaries(
        data["train"], specs, tmp_path / "full", cfg, progress=False, io=SAELENS_IO
    )
    stop = TrainConfig(**{**cfg.to_json(), "stop_after_steps": 7})
    part = train_dictionaries(
        data["train"], specs, tmp_path / "cut", stop, progress=False, io=SAELENS_IO
    )
    assert (
        not part.finished
        and part.global_step == 7
        and not (tmp_path / "cut" / "index.json").exists()
    )
    with pytest.raises(ValueError, match="different"):
        other = [DictionarySpec(IMG0, "transcoder", "relu", l1_coefficient=2e-3, d_sae=48, **SMALL)]
        train_dictionaries(
            data["train"], other, tmp_path / "cut", cfg, resume=True, progress=False, io=SAELENS_IO
        )
    rest = train_dictionaries(
        data["train"], specs, tmp_path / "cut", cfg, resume=True, progress=False, io=SAELENS_IO
    )
    assert rest.finished and rest.global_step == full.global_step
    for name, module in full.modules.items():
        a, b = module.state_dict(), rest.modules[name].state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    m_full = json.loads((full.dictionaries[specs[0].resolved_name] / "metrics.json").read_text())
    m_cut = json.loads((rest.dictionaries[specs[0].resolved_name] / "metrics.json").read_text())
    assert m_full["resampled"] == m_cut["resampled"] > 0
    assert m_full["history"] == m_cut["history"]


def _kill_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make features 0..31 of every new dictionary dead (encoder bias -1000)."""
    original = trainer_mod.build_dictionary

    def build(*args: Any, **kwargs: Any) -> Any:
        d = original(*args, **kwargs)
        with torch.no_grad():
            d.b_enc[:32] = -1000.0
        return d

    monkeypatch.setattr(trainer_mod, "build_dictionary", build)


@pytest.mark.parametrize("remedy", ["resample", "none"])
def test_resampling_revives_dead_features(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remedy: str
) -> None:
    _kill_half(monkeypatch)
    spec = DictionarySpec(
        IMG0, "transcoder", "relu", l1_coefficient=1e-3, d_sae=64, dead_remedy=remedy, **SMALL
    )
    cfg = TrainConfig(
        batch_size=256, epochs=2, dead_window=10, resample_every=10, resample_until=0.5, log_every=0
    )
    train_dictionaries(data["train"], [spec], tmp_path / "out", cfg, progress=False, io=SAELENS_IO)
    ev = evaluate_dictionaries(
        load_dictionaries(tmp_path / "out", io=SAELENS_IO), data["held"], progress=False
    )[0]
    dead = ev.groups["all"]["dead_fraction"]
    if remedy == "resample":
        assert dead < 0.1
    else:
        assert dead >= 0.5


@pytest.mark.parametrize("min_rate", [0.0, 1e-3])
def test_rate_criterion_resamples_features_the_silence_window_misses(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_rate: float
) -> None:
    """With a silence window longer than the run only ``resample_min_rate`` can revive features."""
    _kill_half(monkeypatch)
    spec = DictionarySpec(IMG0, "transcoder", "relu", l1_coefficient=1e-3, d_sae=64, **SMALL)
    cfg = TrainConfig(
        batch_size=256,
        epochs=2,
        dead_window=10**6,
        resample_every=10,
        resample_until=0.5,
        resample_min_rate=min_rate,
        log_every=0,
    )
    res = train_dictionaries(
        data["train"], [spec], tmp_path / "out", cfg, progress=False, io=SAELENS_IO
    )
    ev = evaluate_dictionaries(
        load_dictionaries(tmp_path / "out", io=SAELENS_IO), data["held"], progress=False
    )[0]
    dead = ev.groups["all"]["dead_fraction"]
    if min_rate:
        assert res.metrics[spec.resolved_name]["resampled"] >= 32
        assert dead < 0.1
    else:
        assert res.metrics[spec.resolved_name]["resampled"] == 0
        assert dead >= 0.5


def test_resample_min_rate_is_validated() -> None:
    for bad in (-1e-4, 1.0):
        with pytest.raises(ValueError, match="resample_min_rate"):
            TrainConfig(resample_min_rate=bad)


def test_auxk_loss_sends_gradient_to_dead_latents() -> None:
    spec = DictionarySpec(IMG0, "transcoder", "topk", k=2, d_sae=32, d_t_embed=16)
    d = build_dictionary(spec, 16, seed=0, io=SAELENS_IO)
    with torch.no_grad():
        d.b_enc[:2] = 10.0  # features 0 and 1 win every TopK: the other 30 never fire
    x, y, t = torch.randn(128, 16), torch.randn(128, 16), torch.full((128,), 0.5)
    z = d.encode(x, t=t)
    dead = ~(z > 0).any(0)
    assert int(dead.sum()) == 30
    for coef, expect in ((0.0, False), (1 / 32, True)):
        d.zero_grad()
        Objective(d, "transcoder", auxk_k=8, auxk_coefficient=coef)(
            x, y, t, 0.0, dead
        ).loss.backward()
        grad = d.W_enc.grad[:, dead].abs().sum()
        assert bool(grad > 0) is expect


def test_auxk_lowers_dead_fraction(data: dict[str, Path], tmp_path: Path) -> None:
    dead = {}
    for remedy in ("auxk", "none"):
        spec = DictionarySpec(
            IMG0, "transcoder", "topk", k=2, d_sae=128, dead_remedy=remedy, name="d", **SMALL
        )
        cfg = TrainConfig(batch_size=256, epochs=6, dead_window=20, log_every=0)
        train_dictionaries(
            data["train"], [spec], tmp_path / remedy, cfg, progress=False, io=SAELENS_IO
        )
        ev = evaluate_dictionaries(
            load_dictionaries(tmp_path / remedy, io=SAELENS_IO), data["held"], progress=False
        )[0]
        dead[remedy] = ev.groups["all"]["dead_fraction"]
    assert dead["auxk"] < dead["none"] - 0.05, dead


def test_objective_is_difract_loss() -> None:
    spec = DictionarySpec(IMG0, "transcoder", "relu", l1_coefficient=1e-2, d_sae=24, d_t_embed=16)
    d = build_dictionary(spec, 8, seed=3, io=SAELENS_IO)
    x, y, t = torch.randn(50, 8), torch.randn(50, 8) * 3 + 1, torch.rand(50)
    out = Objective(d, "transcoder")(x, y, t, 1e-2)
    z = d.encode(x, t=t)
    y_hat = z @ d.W_dec + d.b_dec
    var = ((y - y.mean(0)) ** 2).mean(0).sum()
    nmse = ((y - y_hat) ** 2).sum(-1).mean() / (var + 1e-6)
    torch.testing.assert_close(out.nmse, nmse)
    torch.testing.assert_close(out.loss, nmse + 1e-2 * z.abs().sum(-1).mean())
    assert float(out.l0) == float((z > 0).sum(-1).float().mean())


def test_schedules_and_specs() -> None:
    def f(step: int) -> float:
        return warmup_cosine(step, total=100, warmup=10, end_fraction=0.1)

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and 0.1 < f(55) < 1.0
    specs = specs_from_options(
        [IMG0, Site(1, "txt")],
        roles=["transcoder", "sae"],
        activations=["relu", "topk"],
        l1_img=[1e-4, 1e-3],
        l1_txt=[1e-5],
        ks=[4, 8],
    )
    assert len(specs) == 2 * (2 + 2) + 2 * (1 + 2)
    assert len({s.resolved_name for s in specs}) == len(specs)
    assert [s.l1_coefficient for s in difract_recipe([IMG0, Site(1, "txt")])] == [3e-4, 5e-5]
    assert DictionarySpec(IMG0, activation="topk", k=4).remedy == "auxk"
    with pytest.raises(ValueError, match="auxk"):
        DictionarySpec(IMG0, dead_remedy="auxk")


def test_rejects_duplicate_names_and_missing_sites(data: dict[str, Path], tmp_path: Path) -> None:
    same = [DictionarySpec(IMG0, name="x"), DictionarySpec(IMG0, l1_coefficient=1.0, name="x")]
    with pytest.raises(ValueError, match="distinct"):
        train_dictionaries(data["train"], same, tmp_path / "o", progress=False, io=SAELENS_IO)
    with pytest.raises(ValueError, match="img_5"):
        train_dictionaries(
            data["train"],
            [DictionarySpec(Site(5, "img"))],
            tmp_path / "o",
            progress=False,
            io=SAELENS_IO,
        )
    with pytest.raises(ValueError, match="fewer rows"):
        train_dictionaries(
            data["train"],
            [DictionarySpec(IMG0)],
            tmp_path / "o",
            TrainConfig(batch_size=10**6),
            progress=False,
            io=SAELENS_IO,
        )


def test_l1_levels_that_round_alike_get_distinct_names() -> None:
    names = {DictionarySpec(IMG0, l1_coefficient=lam).variant for lam in (1e-3, 1.2e-3, 1.5e-3)}
    assert names == {"relu_l1-1e-03_x8", "relu_l1-1.2e-03_x8", "relu_l1-1.5e-03_x8"}


def test_a_dictionary_trains_the_same_alone_or_with_others(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """Seeds come from each dictionary's name: training it next to others (with resampling on)
    gives bit-identical weights to training it alone (one thread; see the trainer's docstring)."""
    mine = DictionarySpec(IMG0, "transcoder", "relu", l1_coefficient=3e-2, d_sae=64, **SMALL)
    others = [
        DictionarySpec(IMG0, "sae", "relu", l1_coefficient=1e-3, d_sae=32, **SMALL),
        DictionarySpec(Site(1, "txt"), "transcoder", "topk", k=4, d_sae=32, **SMALL),
    ]
    cfg = TrainConfig(
        batch_size=256, epochs=2, log_every=0, dead_window=4, resample_every=6, resample_until=1.0
    )
    alone = train_dictionaries(
        data["train"], [mine], tmp_path / "alone", cfg, progress=False, io=SAELENS_IO
    )
    mixed = train_dictionaries(
        data["train"],
        [others[0], mine, others[1]],
        tmp_path / "mixed",
        cfg,
        progress=False,
        io=SAELENS_IO,
    )
    a, b = alone.modules[mine.resolved_name], mixed.modules[mine.resolved_name]
    assert alone.metrics[mine.resolved_name]["resampled"] > 0  # the resampling generator was used
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_tagged_padding_rows_are_trained_on_unless_excluded(tmp_path: Path) -> None:
    """On a harvest that tags T5 padding, training (DifFRACT's choice, the default) is
    bit-identical to training on the same rows untagged, and ``include_padding=False`` to training
    on the real-token rows alone."""
    from difract_ext.capture.synthetic import linear_plus_sparse, write_harvest

    site = Site(0, "txt")
    x, y, t = linear_plus_sparse(1500, 16, 32, threshold=1.0, seed=3)
    valid = torch.arange(1500) % 3 != 0  # 1000 real-token rows, 500 padding rows
    rows = {site: (x, y)}
    tagged = write_harvest(tmp_path / "tag", rows, {"txt": t}, shard_rows=1500, text_valid=valid)
    every = write_harvest(tmp_path / "every", rows, {"txt": t}, shard_rows=1500)
    real = write_harvest(
        tmp_path / "real", {site: (x[valid], y[valid])}, {"txt": t[valid]}, shard_rows=1500
    )
    spec = DictionarySpec(site, "transcoder", "relu", l1_coefficient=1e-2, d_sae=32, **SMALL)

    def train(root: Path, include: bool) -> Any:
        cfg = TrainConfig(batch_size=250, log_every=0, include_padding=include)
        out = tmp_path / f"out-{root.name}-{include}"
        return train_dictionaries(root, [spec], out, cfg, progress=False, io=SAELENS_IO)

    runs = {
        ("tag", True): train(tagged, True),
        ("tag", False): train(tagged, False),
        ("every", True): train(every, True),
        ("real", True): train(real, True),
    }
    assert runs["tag", True].global_step == 1500 // 250
    assert runs["tag", False].global_step == 1000 // 250
    for a, b in ((("tag", True), ("every", True)), (("tag", False), ("real", True))):
        ma, mb = runs[a].modules[spec.resolved_name], runs[b].modules[spec.resolved_name]
        for k, v in ma.state_dict().items():
            assert torch.equal(v, mb.state_dict()[k]), (a, b, k)
    first = runs["tag", True].modules[spec.resolved_name].state_dict()
    other = runs["tag", False].modules[spec.resolved_name].state_dict()
    assert not torch.equal(first["W_dec"], other["W_dec"])
    recorded = json.loads(
        (runs["tag", True].dictionaries[spec.resolved_name] / "training.json").read_text()
    )
    assert recorded["data"]["rows"] == {"txt": 1500} and recorded["data"]["text_padding"] == "tag"
    assert recorded["config"]["include_padding"] is True
