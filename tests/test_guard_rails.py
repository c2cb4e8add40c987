"""Guard rails: a dictionary's role and site are checked wherever it stands in for an MLP."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import difract_ext.training
from difract_ext import (
    Site,
    TimestepSAE,
    TimestepSAEConfig,
    TimestepTranscoder,
    TimestepTranscoderConfig,
)
from difract_ext.adapters.tracing import FluxModel
from difract_ext.capture.synthetic import synthetic_harvest
from difract_ext.cli import main
from difract_ext.cli.sources import load_pipeline
from difract_ext.cli.train_job import train_report
from difract_ext.flux.roles import (
    DictionaryRoleError,
    DictionarySiteError,
    check_transcoder,
    dictionary_role,
    dictionary_site,
)
from difract_ext.flux.sites import SiteError, dictionary_metadata
from difract_ext.flux.tiny import build_tiny_flux_pipeline
from difract_ext.intervene.generation import splice_transcoders
from difract_ext.replacement.components import step_components
from difract_ext.training import TrainConfig
from difract_ext.training.quality import quality_problems
from difract_ext.training.recipes import RECIPES, SHAPES_MODEL_NAME, recipe_specs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> Any:
    return build_tiny_flux_pipeline(seed=0)


def _sae(width: int, site: Site | None = None) -> TimestepSAE:
    meta = dictionary_metadata(site, "sae") if site else {}
    return TimestepSAE(TimestepSAEConfig(d_in=width, d_sae=2 * width, d_t_embed=16, metadata=meta))


def _tc(width: int, site: Site | None = None) -> TimestepTranscoder:
    meta = dictionary_metadata(site, "transcoder") if site else {}
    return TimestepTranscoder(
        TimestepTranscoderConfig(
            d_in=width, d_sae=2 * width, d_out=width, d_t_embed=16, metadata=meta
        )
    )


def test_role_and_site_read_by_duck_typing() -> None:
    img3 = Site(3, "img")
    assert dictionary_role(_sae(8)) == "sae" and dictionary_role(_tc(8)) == "transcoder"
    # plain SAELens-like objects (no role attribute): the config and the metadata decide
    out_hook = SimpleNamespace(cfg=SimpleNamespace(d_in=8, metadata={"hook_name": img3.hook_out}))
    in_out = SimpleNamespace(
        cfg=SimpleNamespace(
            d_in=8, metadata={"hook_name": img3.hook_in, "hook_name_out": img3.hook_out}
        )
    )
    with_d_out = SimpleNamespace(cfg=SimpleNamespace(d_in=8, d_out=8, metadata=None))
    assert dictionary_role(out_hook) == "sae"
    assert dictionary_role(in_out) == "transcoder" and dictionary_role(with_d_out) == "transcoder"
    assert dictionary_role(torch.nn.Linear(2, 2)) is None  # unknown: accepted
    assert dictionary_site(out_hook) == img3 and dictionary_site(in_out) == img3
    assert (
        dictionary_site(_tc(8, Site(1, "txt"))) == Site(1, "txt")
        and dictionary_site(_tc(8)) is None
    )
    check_transcoder(img3, in_out)
    check_transcoder(img3, torch.nn.Linear(2, 2))


def test_sae_refused_by_attach_transcoders(pipe: Any) -> None:
    width = pipe.transformer.inner_dim
    flux = FluxModel(pipe)
    with pytest.raises(
        DictionaryRoleError,
        match=r"needs a transcoder .* at img_0, but got an SAE \(trained on "
        r"'transformer_blocks\.0\.ff\.output'\).*role='transcoder'",
    ):
        flux.attach_transcoders({Site(0, "img"): _sae(width, Site(0, "img"))})
    with pytest.raises(
        DictionaryRoleError, match="but got an SAE: "
    ):  # no metadata: the class says it
        flux.attach_transcoders({Site(0, "img"): _sae(width)})
    assert flux.attached_sites == []
    assert issubclass(DictionaryRoleError, SiteError)  # callers catching SiteError still do


def test_dictionary_of_another_site_refused(pipe: Any) -> None:
    width = pipe.transformer.inner_dim
    flux = FluxModel(pipe)
    with pytest.raises(
        DictionarySiteError,
        match=r"given for site img_1 was trained at txt_1 .* key it by "
        r"Site\(1, 'txt'\) \('txt_1'\)",
    ):
        flux.attach_transcoders({Site(1, "img"): _tc(width, Site(1, "txt"))})
    with pytest.raises(DictionarySiteError, match="given for site img_0 was trained at img_1"):
        flux.attach_transcoders({"img_0": _tc(width, Site(1, "img"))})
    flux.attach_transcoders([_tc(width, Site(1, "txt"))])  # keyed by its own metadata: fine
    assert flux.attached_sites == [Site(1, "txt")]


def test_sae_refused_by_splice_transcoders(pipe: Any) -> None:
    width = pipe.transformer.inner_dim
    sae = _sae(width, Site(0, "txt"))
    with (
        pytest.raises(DictionaryRoleError, match=r"splicing \(TranscoderSite\) needs a transcoder"),
        splice_transcoders(pipe.transformer, {Site(0, "txt"): sae}),
    ):
        pass


def test_sae_refused_by_attribution(pipe: Any) -> None:
    width = pipe.transformer.inner_dim
    mlp = torch.zeros(3, 5, width)
    with pytest.raises(
        DictionaryRoleError, match=r"attribution \(attribute_step\) needs a transcoder"
    ):
        step_components(
            {Site(1, "img"): _sae(width, Site(1, "img"))}, mlp, mlp, 0.5, n_txt=2, n_double=2
        )
    with pytest.raises(DictionarySiteError, match="given for site img_0 was trained at img_1"):
        step_components(
            {Site(0, "img"): _tc(width, Site(1, "img"))}, mlp, mlp, 0.5, n_txt=2, n_double=2
        )


# ---- training: recipes, the end-of-training report, checkpoints, eval verdicts ------------------

SHIPPED = Path(__file__).resolve().parents[1] / "difract_ext" / "toy" / "dictionaries"


def test_shapes_recipe_is_the_shipped_one() -> None:
    """Each shipped shapes dictionary's recorded spec and config: what `--recipe shapes` gives."""
    recipe = RECIPES["shapes"]
    folders = sorted(SHIPPED.glob("*/*/training.json"))
    assert len(folders) == 16  # a transcoder and an SAE for each of the 8 double-block MLPs
    for path in folders:
        training = json.loads(path.read_text())
        spec = training["spec"]
        (mine,) = recipe_specs(recipe, [Site.parse(spec["site"])], roles=[spec["role"]])
        assert mine.to_json() == spec, path
        config = TrainConfig(**recipe.train).to_json()
        assert {k: config[k] for k in recipe.train} == {
            k: training["config"][k] for k in recipe.train
        }, path


def test_recipe_auto_explicit_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_pipeline("shapes").model_name == SHAPES_MODEL_NAME  # what a shapes harvest records
    data = synthetic_harvest(tmp_path / "acts", [Site(0, "img"), Site(0, "txt")], n_rows=512)
    cfg_path = data / "harvest_config.json"
    cfg_path.write_text(
        json.dumps({**json.loads(cfg_path.read_text()), "model_name": SHAPES_MODEL_NAME})
    )
    seen: dict[str, Any] = {}

    def fake_train(reader: Any, specs: Any, out: Any, config: Any, **kwargs: Any) -> Any:
        seen.update(specs=specs, config=config, kwargs=kwargs)
        return SimpleNamespace(finished=False, global_step=0)

    monkeypatch.setattr(difract_ext.training, "train_dictionaries", fake_train)
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--roles",
                "transcoder",
                "sae",
            ]
        )
        == 0
    )
    assert (
        "recipe shapes (auto: the harvest is of 'difract-ext/shapes-flux')"
        in capsys.readouterr().out
    )
    names = [s.resolved_name for s in seen["specs"]]
    assert names == [
        "transcoders/img_0/relu_l1-3e-03_x2",
        "saes/img_0/relu_l1-1e-02_x2",
        "transcoders/txt_0/relu_l1-2e-04_x0.75",
        "saes/txt_0/relu_l1-1e-02_x0.75",
    ]
    assert (
        seen["config"].epochs == 6
        and seen["config"].batch_size == 2048
        and seen["specs"][0].lr == 1e-2
    )
    assert seen["kwargs"]["keep_checkpoint"] is False
    # an explicit recipe, and explicit options over it
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--recipe",
                "difract",
                "--lr",
                "3e-3",
                "--epochs",
                "2",
                "--sites",
                "img_0",
                "--keep-checkpoint",
            ]
        )
        == 0
    )
    (spec,) = seen["specs"]
    assert spec.resolved_name == "transcoders/img_0/relu_l1-3e-04_x16" and spec.lr == 3e-3
    assert (
        spec.d_t_embed == 256 and seen["config"].epochs == 2 and seen["config"].batch_size == 4096
    )
    assert seen["kwargs"]["keep_checkpoint"] is True
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--recipe",
                "tide",
                "--sites",
                "img_0",
            ]
        )
        == 0
    )
    assert [s.resolved_name for s in seen["specs"]] == ["transcoders/img_0/topk_k-32_x16"]


def test_train_report_flags_absurd_dictionaries() -> None:
    good = {
        "last_window": {
            "steps": 100,
            "explained_variance": 0.93,
            "l0": 12.5,
            "dead_fraction": 0.01,
            "dense_fraction": 0.6,
            "overactive_fraction": 0.2,
        }
    }
    bad = {
        "last_window": {
            "steps": 100,
            "explained_variance": -0.2,
            "l0": 40.0,
            "dead_fraction": 0.0,
            "dense_fraction": 1.0,
            "overactive_fraction": 0.9,
        }
    }
    assert quality_problems(good["last_window"]) == []
    assert quality_problems({"explained_variance": float("nan")}) == [
        "explained variance nan < 0.5"
    ]
    report = train_report({"a": good, "b": bad})
    assert report.splitlines()[1] == (
        "  a: EV 0.930  L0 12.5  dead 1.0%  dense 60.0%  (last 100 steps)  ok"
    )
    assert report.splitlines()[2].endswith(
        "FAIL: explained variance -0.200 < 0.5; "
        "90% of features fire on > 30% of rows (limit 50%): not sparse"
    )
    assert report.splitlines()[3].startswith("WARNING: 1 of 2 dictionaries FAIL the quality checks")
    assert train_report({"a": good}).splitlines()[-1].startswith("all 1 dictionaries pass")


def test_train_and_eval_flag_garbage_and_drop_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    kw = {
        "sites": [Site(0, "img")],
        "n_rows": 2048,
        "d_model": 16,
        "n_latents": 32,
        "threshold": 1.0,
    }
    data = synthetic_harvest(tmp_path / "train", **kw)
    held = synthetic_harvest(tmp_path / "held", row_seed=99, **kw)
    common = [
        "train",
        "--data",
        str(data),
        "--expansion",
        "2",
        "--d-t-embed",
        "16",
        "--batch-size",
        "256",
        "--no-progress",
    ]
    # the DifFRACT recipe's lr (2e-4) for 8 steps: garbage
    with caplog.at_level(logging.WARNING, logger="difract_ext.training.trainer"):
        assert main([*common, "--out", str(tmp_path / "bad")]) == 0
    out = capsys.readouterr().out
    assert "transcoders/img_0/relu_l1-3e-04_x2: EV -" in out and "FAIL: explained variance" in out
    assert "WARNING: 1 of 1 dictionaries FAIL the quality checks" in out
    assert any(
        "FAILS the quality checks on its last 2 training steps" in r.message for r in caplog.records
    )
    assert not (tmp_path / "bad" / "checkpoint").exists()  # removed once finished
    # a finished run is not trained over; --resume loads it (and reports it again) without training
    assert main([*common, "--out", str(tmp_path / "bad")]) == 2
    assert "already holds a finished training run" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "bad"), "--resume"]) == 0
    assert out.splitlines()[1:] == capsys.readouterr().out.splitlines()[1:]
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "good"),
                "--lr",
                "1e-2",
                "--epochs",
                "30",
                "--keep-checkpoint",
            ]
        )
        == 0
    )
    assert "all 1 dictionaries pass the quality checks" in capsys.readouterr().out
    assert (tmp_path / "good" / "checkpoint" / "trainer_state.pt").is_file()
    # `difract eval` marks the failing one in its table, its JSON and its output
    (tmp_path / "both").mkdir()
    for name in ("bad", "good"):
        (tmp_path / name).rename(tmp_path / "both" / name)
    assert (
        main(
            [
                "eval",
                "--dictionaries",
                str(tmp_path / "both"),
                "--data",
                str(held),
                "--out",
                str(tmp_path / "e"),
                "--allow-overlap",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "bad/transcoders/img_0/relu_l1-3e-04_x2: EV -" in out
        and "  FAIL: explained variance" in out
    )
    (good_line,) = [
        ln
        for ln in out.splitlines()
        if ln.startswith("good/transcoders/img_0/relu_l1-3e-04_x2: EV 0.")
    ]
    assert good_line.endswith("  ok")
    assert "WARNING: 1 of 2 dictionaries FAIL the quality checks" in out
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [bool(e["problems"]) for e in report["evals"]] == [True, False]
    md = (tmp_path / "e" / "eval.md").read_text()
    assert (
        md.count("**FAIL**: explained variance") == 1
        and "**1 of 2 dictionaries FAIL the quality checks**" in md
    )
