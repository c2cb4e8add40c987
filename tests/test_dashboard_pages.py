"""Dashboards seen from graphs/: node labels and fields, server routes, static pages, PNG export.

Uses D1's ``synthetic_dashboards`` (random but valid dashboard folders); no model, no browser
(the browser checks are in ``test_frontend_browser.py``).
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difract_ext.cli.main import main
from difract_ext.dashboards.shipped import shipped_dashboards_target
from difract_ext.dashboards.store import DashboardStore
from difract_ext.dashboards.synthetic import synthetic_dashboards
from difract_ext.graphs.dashboard_png import dashboard_figure, heat_rgba, write_dashboard_png
from difract_ext.graphs.dashlinks import SHIPPED_DASHBOARDS, dashboard_folders
from difract_ext.graphs.files import FEATURE_TYPE, apply_dashboards, write_graph_files
from difract_ext.graphs.pages import compact_payload, write_dashboard_pages
from difract_ext.graphs.server import serve
from difract_ext.graphs.synthetic import synthetic_graph, synthetic_image

SITES = ["img_0", "txt_0", "img_1", "txt_1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A graph folder whose ``dashboards/synthetic`` covers the graph's features (d_sae 100)."""
    out = tmp_path_factory.mktemp("graphs")
    synthetic_dashboards(out / "dashboards" / "synthetic", SITES, d_sae=100)
    graph, meta = synthetic_graph(seed=3, grid=(4, 4), n_txt=8, dead_positions=())
    write_graph_files(graph, meta, out, "dash", image=synthetic_image(meta.grid), scan="synthetic")
    write_graph_files(graph, meta, out, "plain", scan="synthetic", dashboards=False)
    return out


def _get(port: int, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("latin-1"))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_graph_nodes_take_dashboard_labels(folder: Path) -> None:
    store = DashboardStore.open(folder / "dashboards" / "synthetic")
    labelled = json.loads((folder / "dash.json").read_text())
    plain = json.loads((folder / "plain.json").read_text())
    assert labelled["metadata"]["dashboards"] == "synthetic"
    assert plain["metadata"]["dashboards"] is None
    n_labels = 0
    for a, b in zip(labelled["nodes"], plain["nodes"], strict=True):
        assert a["node_id"] == b["node_id"]
        if a["feature_type"] != FEATURE_TYPE:
            assert a["clerp"] == b["clerp"]
            continue
        d = a["difract"]
        assert d == b["difract"]
        assert b["clerp"] == f"{d['site']} #{d['feature']}"
        label = store.graph_label(d["site"], d["feature"])
        assert a["clerp"] == (label or b["clerp"])
        if label is not None:
            assert label.startswith(store.label(d["site"], d["feature"]) + " (F1 ")
        n_labels += label is not None
    assert n_labels > 0


def test_apply_dashboards_to_a_written_graph(folder: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_bytes((folder / "plain.json").read_bytes())
    n = apply_dashboards(plain, folder / "dashboards" / "synthetic")
    after, labelled = json.loads(plain.read_text()), json.loads((folder / "dash.json").read_text())
    assert [x["clerp"] for x in after["nodes"]] == [x["clerp"] for x in labelled["nodes"]]
    assert n == sum(
        1 for x in labelled["nodes"] if "difract" in x and x["clerp"].startswith("colour=")
    )
    assert (
        json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"][0]["dashboards"]
        == "synthetic"
    )
    with pytest.raises(ValueError, match="not a graph file"):
        (tmp_path / "x.json").write_text("[]")
        apply_dashboards(tmp_path / "x.json", folder / "dashboards" / "synthetic")


def test_dashboard_folders_and_errors(folder: Path, tmp_path: Path) -> None:
    other = synthetic_dashboards(tmp_path / "other", ["img_0"], d_sae=4)
    found = dashboard_folders(folder, [other])
    # the explicit folder wins for its scan name ("synthetic" too)
    assert found["synthetic"] == other.resolve()
    assert dashboard_folders(folder)["synthetic"] == (folder / "dashboards/synthetic").resolve()
    with pytest.raises(FileNotFoundError, match="not a dashboard folder"):
        dashboard_folders(folder, [tmp_path])
    # graphs/ knows where the shipped dashboards are without importing the shapes pipeline
    assert SHIPPED_DASHBOARDS == tuple(shipped_dashboards_target(r) for r in ("transcoder", "sae"))


def test_server_routes(folder: Path) -> None:
    store = DashboardStore.open(folder / "dashboards" / "synthetic")
    with serve(folder) as srv:
        status, body = _get(srv.port, "/dashboards/index.json")
        scans = json.loads(body)["scans"]
        assert status == 200 and set(scans["synthetic"]["sites"]) == set(SITES)
        status, body = _get(srv.port, "/dashboards/synthetic/feature/img_1/7.json")
        expected = json.loads(json.dumps(store.feature_payload("img_1", 7)))
        assert status == 200 and json.loads(body) == expected
        image = expected["examples"][0]["image"]
        status, body = _get(srv.port, f"/dashboards/synthetic/{image}")
        assert status == 200 and body == (store.path / image).read_bytes()
        for bad in (
            "/dashboards/synthetic/feature/img_1/100.json",  # out of range
            "/dashboards/synthetic/feature/img_9/1.json",  # no such site
            "/dashboards/synthetic/feature/img_1/x.json",
            "/dashboards/nope/index.json",
            "/dashboards/synthetic/../dash.json",
            "/dashboards/synthetic/%2e%2e/dash.json",
        ):
            assert _get(srv.port, bad)[0] == 404, bad
        assert json.loads(_get(srv.port, "/report/dash.json")[1]) is None
        (folder / "dash.report.json").write_text('{"faithfulness": {"summary": {"kl": 0.5}}}')
        assert json.loads(_get(srv.port, "/report/dash.json")[1])["faithfulness"] == {
            "summary": {"kl": 0.5}
        }
        assert _get(srv.port, "/report/..%2fx.json")[0] == 404


def test_empty_folder_served_as_empty_index(tmp_path: Path, caplog) -> None:
    with serve(tmp_path) as srv:
        status, body = _get(srv.port, "/data/graph-metadata.json")
    assert status == 200 and json.loads(body) == {"graphs": [], "empty_folder": tmp_path.name}
    assert "holds no graphs yet" in caplog.text


def _js_payload(path: Path) -> Any:
    text = path.read_text()
    m = re.fullmatch(r"window\.difractFeatureLoaded\((.*)\);\n", text, flags=re.S)
    assert m, text[:80]
    return json.loads(m.group(1))


def test_static_pages(tmp_path: Path) -> None:
    dash = synthetic_dashboards(tmp_path / "dash", ["img_0", "txt_1"], d_sae=6)
    store = DashboardStore.open(dash)
    paths = write_dashboard_pages(dash, progress=False)
    assert [p.name for p in paths] == ["img_0.html", "txt_1.html", "index.html"]
    for site in ("img_0", "txt_1"):
        html = (dash / "pages" / f"{site}.html").read_text()
        assert "fetch(" not in html  # opens from file://
        rows = json.loads(re.search(r"var FEATURES = (.*);\n", html).group(1))
        assert sorted(r["index"] for r in rows) == list(range(6))
        assert [r["index"] for r in rows if r["label"]] == [0, 2, 4]  # labelled first
        for f in range(6):
            payload = _js_payload(dash / "pages" / site / f"f{f}.js")
            full = store.feature_payload(site, f)
            assert payload == compact_payload(full)
            # 4 significant digits: an independent check on the raw numbers
            got = np.asarray(
                payload["examples"][0]["patch_acts" if site == "img_0" else "token_acts"]
            )
            want = np.asarray(
                full["examples"][0]["patch_acts" if site == "img_0" else "token_acts"]
            )
            np.testing.assert_allclose(got, want, rtol=5e-4, atol=0)
    index = (dash / "pages" / "index.html").read_text()
    assert 'href="img_0.html"' in index and 'href="txt_1.html"' in index


def test_heat_colours():
    rgba = heat_rgba(np.array([0.0, 0.5, 1.0, 2.0]))
    np.testing.assert_allclose(
        rgba,
        [[1, 160 / 255, 0, 0], [1, 80 / 255, 0, 0.5], [1, 0, 0, 0.85], [1, 0, 0, 0.85]],
        atol=1e-12,
    )


def test_png_heat_map_sits_on_its_patch(tmp_path: Path) -> None:
    """A one-hot patch activation over a black image turns exactly that patch red."""
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "black.png")
    acts = [0.0] * 16
    acts[1 * 4 + 2] = 2.0  # row 1, col 2, at the feature's max
    payload = {
        "site": "img_0",
        "index": 3,
        "kind": "transcoder",
        "label": "colour=red",
        "label_f1": 0.91,
        "act_min": 0.0,
        "act_max": 2.0,
        "activation_frequency": 0.1,
        "quantiles": {"0.5": 1.0, "0.99": 2.0},
        "histogram": {"bin_edges": [0.5, 1.0, 2.0], "counts": [1, 2]},
        "profile": {"step": [0, 1], "t": [1.0, 0.5], "mean": [0.1, 0.2], "frequency": [0.1, 0.1]},
        "top_tokens": [],
        "examples": [
            {
                "prompt": "p",
                "seed": 0,
                "step": 0,
                "t": 1.0,
                "act": 2.0,
                "image": "black.png",
                "grid": [4, 4],
                "tokens": ["a", "red"],
                "token_acts": [0.0, 0.0],
                "patch_acts": acts,
            }
        ],
    }
    import matplotlib.pyplot as plt

    fig = dashboard_figure(payload, tmp_path)
    try:
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
        ax = fig.axes[2]  # profile, histogram, then the examples
        height = pixels.shape[0]

        def at(x: float, y: float) -> np.ndarray:
            px, py = ax.transData.transform((x, y))
            return pixels[int(round(height - py)), int(round(px))]

        red = np.array([round(255 * 0.85), 0, 0])  # alpha 0.85 of (1, 0, 0) over black
        assert np.abs(at(2.5, 1.5) - red).max() <= 2
        assert np.abs(at(0.5, 0.5)).max() <= 2 and np.abs(at(2.5, 2.5)).max() <= 2
        assert 'img_0 #3 "colour=red" (F1 0.91)' in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_cli_pages_and_png(tmp_path: Path, capsys) -> None:
    dash = synthetic_dashboards(tmp_path / "dash", ["img_0"], d_sae=3)
    assert main(["dashboards-page", str(dash)]) == 0
    assert (dash / "pages" / "img_0.html").is_file() and (dash / "pages/img_0/f2.js").is_file()
    out = tmp_path / "f1.png"
    assert main(["dashboard-png", str(dash), "img_0", "1", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 400
    assert main(["dashboard-png", str(dash), "img_0", "3", "--out", str(out)]) != 0
    assert "out of range" in capsys.readouterr().err
    assert write_dashboard_png(dash, "img_0", 0, tmp_path / "g.png").is_file()
