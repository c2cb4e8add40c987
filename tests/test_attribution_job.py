"""`difract attribute`'s job: target specs, dictionary folders, and the whole run on a tiny FLUX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from random_dictionaries import random_transcoders

from difract_ext import Site, TimestepTranscoder, save_difract_checkpoint
from difract_ext.adapters.checkpoints import load_dictionary_dir
from difract_ext.cli.attribution_job import parse_target, run_attribution
from difract_ext.dictionary import CheckpointError
from difract_ext.flux.directions import colour_directions, region_patches
from difract_ext.flux.sites import dictionary_metadata
from difract_ext.flux.tiny import build_tiny_flux_pipeline

KW = dict(height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


def make_dics(width: int) -> dict[Site, TimestepTranscoder]:
    return random_transcoders(
        width,
        mod_std=None,
        seed=2,
        metadata=lambda site: dictionary_metadata(site, "transcoder", model_name="tiny"),
    )


def test_parse_targets() -> None:
    t = parse_target("x0:red@left")
    assert (t.kind, t.colour, t.region, t.weight) == ("x0", "red", "left", 1.0)
    t = parse_target("velocity:#ff8800@top=2.5")
    assert (t.kind, t.colour, t.region, t.weight) == ("velocity", "#ff8800", "top", 2.5)
    t = parse_target("feature:img_1:123")
    assert (t.kind, t.site, t.feature, t.weight) == ("feature", Site(1, "img"), 123, 1.0)
    t = parse_target("feature:txt_0:7@all=0.5")
    assert (t.kind, t.site, t.feature, t.weight) == ("feature", Site(0, "txt"), 7, 0.5)
    with pytest.raises(
        ValueError,
        match=r"old feature:LAYER.STREAM.INDEX form; write it as feature:img_1:123@all=2 ",
    ):
        parse_target("feature:1.img.123@all=2")
    with pytest.raises(ValueError, match="unknown stream 'vid'"):
        parse_target("feature:1.vid.3")
    for bad in ["x0:red", "logit:red@left", "feature:vid_1:3", "feature:img_1", "x0:red@left=abc"]:
        with pytest.raises(ValueError):
            parse_target(bad)


def test_regions_and_colour_directions(pipe) -> None:
    assert len(region_patches("left", (8, 8))) == 32 and (0, 3) in region_patches("left", (8, 8))
    assert (7, 7) in region_patches("bottom", (8, 8)) and (0, 0) not in region_patches(
        "bottom", (8, 8)
    )
    with pytest.raises(ValueError, match="unknown region"):
        region_patches("middle", (8, 8))
    dirs = colour_directions(
        pipe, {"red": (220, 30, 30), "blue": (40, 80, 240), "green": (30, 200, 50)}
    )
    assert set(dirs) == {"red", "blue", "green"}
    for v in dirs.values():
        assert v.shape == (16,) and float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(dirs["red"], dirs["blue"])


def test_load_dictionaries_both_layouts(pipe, tmp_path: Path) -> None:
    dics = make_dics(pipe.transformer.inner_dim)
    for site, tc in dics.items():
        tc.save_model(tmp_path / "saelens" / f"{site.stream}_{site.layer}")
        save_difract_checkpoint(tc, tmp_path / "pt" / f"transcoder_{site.stream}_{site.layer}.pt")
    a = load_dictionary_dir(tmp_path / "saelens")
    b = load_dictionary_dir(tmp_path / "pt")
    assert sorted(a) == sorted(b) == sorted(dics)
    x = torch.randn(5, pipe.transformer.inner_dim)
    assert torch.equal(a[Site(1, "txt")](x, t=0.5), dics[Site(1, "txt")](x, t=0.5))
    with pytest.raises(FileNotFoundError):
        load_dictionary_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no sae here .*role='transcoder'"):
        load_dictionary_dir(tmp_path / "saelens", role="sae")
    # two variants for one site: refused, both listed
    dics[Site(1, "txt")].save_model(tmp_path / "saelens" / "variant_b")
    with pytest.raises(
        CheckpointError, match=r"several transcoders for one site \(txt_1: .*txt_1, .*variant_b"
    ):
        load_dictionary_dir(tmp_path / "saelens")


def test_run_attribution_end_to_end(pipe, tmp_path: Path) -> None:
    dics = make_dics(pipe.transformer.inner_dim)
    report = run_attribution(
        pipe,
        "a red circle on the left",
        step=1,
        targets=["x0:red@left", "x0:blue@right=0.5"],
        dictionaries=dics,
        out_dir=tmp_path,
        seed=0,
        num_inference_steps=4,
        batch_size=64,
        **KW,
    )
    assert report["conservation"]["max_rel_error"] <= 1e-5
    assert 0 < report["replacement_score"] <= 1 and 0 < report["completeness_score"] <= 1
    faith = report["faithfulness"]
    x0 = faith["targets"][0]
    # the graph's own (frozen) model: ablations change the target by exactly minus the total
    # effects, at every size, for both targets (a wrong effect formula is off by percents)
    assert (
        x0["frozen_max_rel_error"] <= 1e-4 and faith["targets"][1]["frozen_max_rel_error"] <= 1e-4
    )
    assert x0["nodes"] == 30 and set(x0["ablation"]) == {"1%", "100%"}
    assert x0["breakdown"]["frozen"]["100%"]["spearman"] == pytest.approx(1.0, abs=1e-9)
    assert report["unfrozen_ablation_spearman"] == x0["ablation"]["100%"]["spearman"]
    summary = faith["summary"]
    assert summary["Spearman @100%"] == x0["ablation"]["100%"]["spearman"]
    assert summary["seconds"] == faith["seconds"] > 0
    assert all(isinstance(v, float) and v == v for v in summary.values())
    assert report["timestep"] == 0.75 and report["targets"] == ["x0:red@left", "x0:blue@right=0.5"]
    graph = json.loads(Path(report["graph_file"]).read_text())
    assert graph["metadata"]["slug"] == report["slug"]
    assert graph["nodes"] and graph["links"]
    saved = json.loads((tmp_path / f"{report['slug']}.report.json").read_text())
    assert saved["n_active_features"] == report["n_active_features"]
    assert (tmp_path / "graph-metadata.json").exists()


def test_feature_target_at_its_argmax_and_no_validate(pipe, tmp_path: Path) -> None:
    from difract_ext.attribution.step import AttributionStep
    from difract_ext.replacement.inputs import capture_step_input

    dics = make_dics(pipe.transformer.inner_dim)
    site, feature = Site(1, "img"), 3
    report = run_attribution(
        pipe,
        "a red circle on the left",
        step=1,
        targets=[f"feature:{site}:{feature}@argmax"],
        dictionaries=dics,
        out_dir=tmp_path,
        num_inference_steps=4,
        batch_size=64,
        validate=False,
        **KW,
    )
    assert "faithfulness" not in report and "conservation" not in report
    saved = json.loads((tmp_path / f"{report['slug']}.report.json").read_text())
    assert "faithfulness" not in saved
    # independently: the feature's largest pre-activation over the image positions
    step = capture_step_input(pipe, "a red circle on the left", 1, seed=0, **KW)
    mlp_in = AttributionStep(pipe.transformer, step, dics).clean["mlp_in"]
    with torch.no_grad():
        _, pre = dics[site].encode_with_hidden_pre(mlp_in[1, step.n_txt :], t=step.t)
    assert report["target_values"][0] == pytest.approx(float(pre[:, feature].max()), rel=1e-5)
    assert abs(float(pre[:, feature].max() - pre[:, feature].sum())) > 0.1  # not the summed one


def test_live_graph_job(pipe, tmp_path: Path) -> None:
    from difract_ext.cli.main import build_parser

    dics = make_dics(pipe.transformer.inner_dim)
    report = run_attribution(
        pipe,
        "a red circle on the left",
        step=1,
        targets=["x0:red@left"],
        dictionaries=dics,
        out_dir=tmp_path,
        num_inference_steps=4,
        batch_size=64,
        live=("layernorm",),
        **KW,
    )
    # first-order edges do not sum to node values: no conservation claimed; the report checks
    # the graph against its own (LayerNorm-live) model instead of the affine one
    assert report["live"] == ["layernorm"] and report["conservation"] is None
    x0 = report["faithfulness"]["targets"][0]
    assert "frozen_max_rel_error" not in x0 and x0["own_model_rel_error"] <= 0.05
    graph = json.loads(Path(report["graph_file"]).read_text())
    assert graph["metadata"]["live"] == ["layernorm"]
    base = ["--prompt", "a red circle", "--out", str(tmp_path), "--target", "x0:red@left"]
    args = build_parser().parse_args(["attribute", *base, "--live", "layernorm", "attention"])
    assert args.live == ["layernorm", "attention"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["attribute", *base, "--live", "softmax"])
