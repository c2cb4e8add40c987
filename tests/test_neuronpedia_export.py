"""Neuronpedia export: feature JSON, batch upload body and graph JSON validated against the
shipped schema subset (no network); the position mapping; the CLI (build + export)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from difract_ext.cli.main import main
from difract_ext.dashboards.neuronpedia import (
    add_feature_details,
    batch_upload_body,
    feature_json,
    position_tokens,
    validate,
)
from difract_ext.dashboards.shipped import shipped_dashboards_path
from difract_ext.dashboards.store import DashboardStore
from difract_ext.dashboards.synthetic import synthetic_dashboards


def test_position_tokens_text_then_patches() -> None:
    toks = position_tokens(["a", "red", "</s>"], (2, 3))
    assert toks == [
        "a",
        "red",
        "</s>",
        "img r0c0",
        "img r0c1",
        "img r0c2",
        "img r1c0",
        "img r1c1",
        "img r1c2",
    ]


def test_shipped_feature_json_is_valid_and_maps_positions() -> None:
    dash = shipped_dashboards_path("transcoder")
    assert dash is not None, "run scripts/build_shapes_dashboards.py"
    store = DashboardStore.open(dash)
    n_txt, (rows, cols) = int(store.index["n_txt"]), store.grid
    for site in ("img_1", "txt_0"):
        payload = store.feature_payload(site, 5)
        fj = feature_json(store, site, 5)
        assert validate(fj, "feature") == []
        assert fj["index"] == 5 and fj["act_max"] == payload["act_max"]
        assert len(fj["examples_quantiles"]) == store.index["num_inference_steps"]
        first = fj["examples_quantiles"][0]["examples"][0]
        ex = payload["examples"][0]
        assert len(first["tokens"]) == len(first["tokens_acts_list"]) == n_txt + rows * cols
        assert (
            first["tokens"][:n_txt] == ex["tokens"]
            and first["tokens"][n_txt + cols + 2] == "img r1c2"
        )
        acts = first["tokens_acts_list"]
        if site.startswith("img"):
            assert acts[:n_txt] == [0.0] * n_txt and acts[n_txt:] == ex["patch_acts"]
        else:
            assert acts[:n_txt] == ex["token_acts"] and acts[n_txt:] == [0.0] * (rows * cols)
        assert acts[first["train_token_ind"]] == max(acts) == pytest.approx(ex["act"], rel=1e-3)
    body = batch_upload_body(store, "img_1", features=[0, 1, 2])
    assert validate(body, "batch") == []
    assert [f["feature_index"] for f in body["features"]] == [0, 1, 2]


def test_validation_catches_bad_documents(tmp_path: Path) -> None:
    store = DashboardStore.open(synthetic_dashboards(tmp_path / "d", ["img_1"], d_sae=3))
    fj = feature_json(store, "img_1", 1)
    assert validate(fj, "feature") == []
    bad = copy.deepcopy(fj)
    del bad["act_max"]
    bad["examples_quantiles"][0]["examples"][0]["tokens_acts_list"] = ["x"]
    errors = validate(bad, "feature")
    assert any("act_max" in e for e in errors) and any("tokens_acts_list" in e for e in errors)


def _graph() -> dict:
    node = {
        "node_id": "1_5_3",
        "feature": 5,
        "layer": "1",
        "ctx_idx": 3,
        "feature_type": "cross layer transcoder",
        "jsNodeId": "1_5-0",
        "clerp": "colour=red",
    }
    return {
        "metadata": {
            "slug": "g",
            "scan": "shapes",
            "prompt_tokens": ["a", "img r0c0"],
            "prompt": "a",
        },
        "qParams": {},
        "nodes": [node, {**node, "node_id": "E_0_0", "layer": "E", "feature_type": "embedding"}],
        "links": [{"source": "E_0_0", "target": "1_5_3", "weight": 0.5}],
    }


def test_graph_schema_and_feature_details() -> None:
    graph = _graph()
    assert validate(graph, "graph") == []
    out = add_feature_details(graph, "https://example.org/features/shapes/")
    assert out["metadata"]["feature_details"] == {
        "feature_json_base_url": "https://example.org/features/shapes"
    }
    assert "feature_details" not in graph["metadata"]  # the input is not modified
    assert validate(out, "graph") == []
    for broken, needle in (
        ({**graph, "links": [{"source": "a", "target": "b"}]}, "weight"),
        (
            {**graph, "nodes": [{k: v for k, v in graph["nodes"][0].items() if k != "clerp"}]},
            "clerp",
        ),
        ({**graph, "metadata": {"slug": "g", "scan": "s", "prompt": "p"}}, "prompt_tokens"),
        ({**graph, "nodes": [{**graph["nodes"][0], "ctx_idx": "3"}]}, "ctx_idx"),
    ):
        assert any(needle in e for e in validate(broken, "graph")), needle
    with pytest.raises(ValueError, match="metadata"):
        add_feature_details({"nodes": []}, "x")


def test_written_graph_json_validates(tmp_path: Path) -> None:
    from difract_ext.graphs.files import write_graph_files
    from difract_ext.graphs.synthetic import synthetic_graph

    graph, meta = synthetic_graph(seed=0)
    path = write_graph_files(graph, meta, tmp_path, "np", feature_files=False)
    data = json.loads(Path(path).read_text())
    assert validate(data, "graph") == []
    assert validate(add_feature_details(data, "./features/np"), "graph") == []


def test_cli_build_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dash = tmp_path / "dash"
    rc = main(
        [
            "dashboards",
            "--role",
            "sae",
            "--max-prompts",
            "2",
            "--top-k",
            "2",
            "--out",
            str(dash),
            "--scan",
            "mini",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    store = DashboardStore.open(dash)
    # every shipped SAE (both streams of the four double blocks), layer by layer
    assert [str(s) for s in store.sites] == [f"{st}_{i}" for i in range(4) for st in ("img", "txt")]
    assert store.index["scan"] == "mini" and len(store.index["prompts"]) == 2
    assert (dash / "img_1.labels.json").is_file()
    rc = main(["dashboards", "export", "--dash", str(dash), "--out", str(tmp_path / "np")])
    assert rc == 0
    one = json.loads((tmp_path / "np" / "mini-img_1" / "7.json").read_text())
    assert validate(one, "feature") == [] and one["index"] == 7
    body = json.loads((tmp_path / "np" / "mini-txt_2" / "batch-0.json").read_text())
    assert validate(body, "batch") == [] and len(body["features"]) == store.d_sae("txt_2")
    capsys.readouterr()
    assert (
        main(
            [
                "dashboards",
                "--out",
                str(dash),
                "--role",
                "sae",
                "--max-prompts",
                "2",
                "--scan",
                "mini",
            ]
        )
        == 2
    )
    assert "already holds a scan" in capsys.readouterr().err
    assert main(["dashboards", "export", "--out", str(tmp_path / "x")]) == 2
    assert "--dash" in capsys.readouterr().err
    assert (
        main(["dashboards", "export", "--dash", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    )
    assert "not a dashboard folder" in capsys.readouterr().err


def test_demo_copies_the_shipped_transcoder_dashboards(tmp_path: Path) -> None:
    from difract_ext.cli.dashboards_job import copy_shipped_dashboards

    dest = copy_shipped_dashboards(tmp_path / "graphs" / "dashboards" / "shapes")
    assert dest is not None
    store = DashboardStore.open(dest)
    assert store.scan == "shapes" and store.index["model"] == "difract-ext/shapes-flux"
    assert len(store.sites) == 8 and not (dest / "saes").exists()
    assert all(store.info(s).kind == "transcoder" for s in store.sites)
    saes = DashboardStore.open(shipped_dashboards_path("sae"))
    assert saes.scan == "shapes-saes" and [str(s) for s in saes.sites] == [
        f"{st}_{i}" for i in range(4) for st in ("img", "txt")
    ]


def test_interrupted_build_says_how_to_resume() -> None:
    from difract_ext.cli.main import interrupted_message

    msg = interrupted_message("dashboards", ["dashboards", "--out", "d"])
    assert msg == (
        "interrupted: finished chunks are kept in OUT/.scan; "
        "resume with: difract dashboards --out d --resume"
    )
