"""Graph files for circuit-tracer's frontend (difract_ext.graphs.files) and their server."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from circuit_tracer.frontend.graph_models import Metadata, Model
from PIL import Image

from difract_ext.attribution.graph_meta import RESIDUE_FEATURE
from difract_ext.graphs.files import (
    ERROR_FEATURE_TYPE,
    FEATURE_TYPE,
    RESIDUE_FEATURE_TYPE,
    TARGET_COLUMN_LABEL,
    image_png_bytes,
    read_graph_metadata,
    upsert_graph_metadata,
    write_graph_files,
)
from difract_ext.graphs.server import safe_resolve, serve
from difract_ext.graphs.synthetic import synthetic_graph, synthetic_image
from difract_ext.util import atomic

SLUG = "synthetic-step2"
DEAD = (3, 12)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Any, Any]:
    out = tmp_path_factory.mktemp("graphs")
    graph, meta = synthetic_graph(seed=0, dead_positions=DEAD)
    path = write_graph_files(graph, meta, out, SLUG, image=synthetic_image(meta.grid))
    return out, json.loads(path.read_text()), graph, meta


def _true_pos(node: dict[str, Any]) -> int:
    return int(node["node_id"].rsplit("_", 1)[1])


def test_json_parses_with_circuit_tracer_models(written):
    out, data, _, _ = written
    model = Model.model_validate(data)
    assert model.metadata.slug == SLUG and model.metadata.schema_version == 1
    assert len(model.nodes) == len(data["nodes"]) > 0
    index = json.loads((out / "graph-metadata.json").read_text())
    for entry in index["graphs"]:
        Metadata.model_validate(entry)


def test_links_reference_existing_unique_nodes(written):
    _, data, _, _ = written
    ids = [n["node_id"] for n in data["nodes"]]
    js_ids = [n["jsNodeId"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids) and len(set(js_ids)) == len(js_ids)
    assert data["links"]
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids
        assert np.isfinite(link["weight"])


def test_positions_compacted_and_labelled(written):
    _, data, _, meta = written
    md = data["metadata"]
    tokens, positions = md["prompt_tokens"], md["positions"]
    assert len(tokens) == len(positions) and tokens[-1] == TARGET_COLUMN_LABEL
    shown = [p["pos"] for p in positions[:-1]]
    assert shown == sorted(shown) and not set(shown) & set(DEAD)
    for label, p in zip(tokens[:-1], positions[:-1], strict=True):
        assert label == meta.position_label(p["pos"]) == p["label"]
        if p["pos"] < meta.n_txt:
            assert p["kind"] == "txt" and label.startswith(f"txt {p['pos']} ")
        else:
            r, c = divmod(p["pos"] - meta.n_txt, meta.grid[1])
            assert p["kind"] == "img" and (p["row"], p["col"]) == (r, c)
            assert label == f"img r{r}c{c}"
    assert any(p["kind"] == "txt" for p in positions) and any(p["kind"] == "img" for p in positions)
    # every column carries a node; targets sit in the last column; ids keep the true position
    used = {n["ctx_idx"] for n in data["nodes"]}
    assert used == set(range(len(tokens)))
    for n in data["nodes"]:
        if n["feature_type"] == "logit":
            assert n["ctx_idx"] == len(tokens) - 1
        else:
            assert positions[n["ctx_idx"]]["pos"] == _true_pos(n)


def test_error_residue_and_input_nodes_are_distinct(written):
    _, data, graph, _ = written
    by_type: dict[str, list[dict[str, Any]]] = {}
    for n in data["nodes"]:
        by_type.setdefault(n["feature_type"], []).append(n)
    assert {FEATURE_TYPE, ERROR_FEATURE_TYPE, RESIDUE_FEATURE_TYPE, "embedding", "logit"} <= set(
        by_type
    )
    for n in by_type[ERROR_FEATURE_TYPE]:  # circuit-tracer issue #78: "{layer}_-1_{pos}"
        layer, pos = n["layer"], _true_pos(n)
        assert re.fullmatch(r"\d+_-1_\d+", n["node_id"]) and n["feature"] == -1
        assert n["node_id"] == f"{layer}_-1_{pos}" and n["jsNodeId"] == f"{layer}_-1-{pos}"
        assert n["clerp"].startswith("Err: ")
    for n in by_type[RESIDUE_FEATURE_TYPE]:
        assert re.fullmatch(rf"\d+_{RESIDUE_FEATURE}_\d+", n["node_id"])
        assert n["feature"] == RESIDUE_FEATURE
        assert n["clerp"].startswith("Residue: unexplored features")
    n_residue = int((graph.active_features[:, 2] == RESIDUE_FEATURE).sum())
    assert 0 < len(by_type[RESIDUE_FEATURE_TYPE]) <= n_residue
    for n in by_type["embedding"]:
        assert re.fullmatch(r"E_\d+_\d+", n["node_id"]) and n["clerp"].startswith("Emb: ")


def test_feature_and_target_labels(written):
    _, data, graph, meta = written
    for n in data["nodes"]:
        if n["feature_type"] == FEATURE_TYPE:
            layer, feat, _ = (int(v) for v in n["node_id"].split("_"))
            stream = "img" if feat < meta.d_img[layer] else "txt"
            index = feat if stream == "img" else feat - meta.d_img[layer]
            assert n["clerp"] == f"{stream}_{layer} #{index}"
            assert n["activation"] is not None and n["influence"] is not None
            # explicit fields: nobody parses labels
            pos = _true_pos(n)
            kind, a, b = meta.position_kind(pos)
            assert n["difract"] == {
                "site": f"{stream}_{layer}",
                "stream": stream,
                "layer": layer,
                "feature": index,
                "position": pos,
                "token": meta.text_tokens[a] if kind == "txt" else None,
                "patch": [a, b] if kind == "img" else None,
            }
        else:
            assert "difract" not in n
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == len(meta.target_labels)
    for k, n in enumerate(logits):
        # the UI reads the target between the first quotes; no meaningless "(p=...)"
        assert n["clerp"].split('"')[1] == meta.target_labels[k] and "(p=" not in n["clerp"]
        w = float(graph.logit_probabilities[k])
        assert n["clerp"] == f'Target "{meta.target_labels[k]}" (w={w:.2f})'
        assert n["difract_target"] == {"label": meta.target_labels[k], "value": None, "weight": w}
    assert logits[0]["is_target_logit"] and not logits[1]["is_target_logit"]


def test_target_values_label_targets(tmp_path):
    graph, meta = synthetic_graph(seed=1)
    values = [0.25 * (k + 1) for k in range(len(meta.target_labels))]
    path = write_graph_files(graph, meta, tmp_path, "tv", target_values=values, feature_files=False)
    logits = [n for n in json.loads(path.read_text())["nodes"] if n["feature_type"] == "logit"]
    for k, n in enumerate(logits):
        w = float(graph.logit_probabilities[k])
        assert n["clerp"] == f'Target "{meta.target_labels[k]}" = {values[k]:+.4g} (w={w:.2f})'
        assert n["difract_target"]["value"] == values[k]
    with pytest.raises(ValueError, match="1 target values for 2 targets"):
        write_graph_files(graph, meta, tmp_path, "tv2", target_values=[1.0])


def test_unconnected_inputs_dropped(written):
    _, data, _, _ = written
    linked = {e["source"] for e in data["links"]} | {e["target"] for e in data["links"]}
    embeddings = [n for n in data["nodes"] if n["feature_type"] == "embedding"]
    assert embeddings and all(n["node_id"] in linked for n in embeddings)
    assert not {_true_pos(n) for n in embeddings} & set(DEAD)


def test_metadata_fields_and_image(written):
    out, data, _, meta = written
    md = data["metadata"]
    assert md["prompt"] == meta.prompt and md["step"] == meta.step and md["seed"] == meta.seed
    assert md["timestep"] == meta.timestep and md["grid"] == list(meta.grid)
    assert md["num_inference_steps"] == meta.num_inference_steps
    assert md["node_threshold"] == 0.8 and md["title_prefix"].startswith("step 2/4 · t=0.625")
    assert md["image"] == f"{SLUG}.png"
    with Image.open(out / md["image"]) as im:
        assert im.format == "PNG" and im.size == (96, 96)
    entry = read_graph_metadata(out)["graphs"][0]
    assert entry["slug"] == SLUG and entry["timestep"] == meta.timestep
    assert "positions" not in entry


def test_feature_files_hold_this_step_activations(written):
    """Every feature node gets ``features/{scan}/{feature}.json`` in the frontend's schema, with the
    graph's own activation of that (layer, feature) at every position and 0 elsewhere."""
    out, data, graph, meta = written
    scan = data["metadata"]["scan"]
    feats = [n for n in data["nodes"] if n["feature_type"] == FEATURE_TYPE]
    assert feats
    af, vals = graph.active_features, graph.activation_values
    for node in feats:
        layer, feature, pos = (int(v) for v in node["node_id"].split("_"))
        doc = json.loads((out / "features" / scan / f"{node['feature']}.json").read_text())
        (example,) = doc["examples_quantiles"][0]["examples"]
        assert example["tokens"] == [meta.position_label(p) for p in range(meta.n_pos)]
        expected = [0.0] * meta.n_pos
        for (l_, p_, f_), v in zip(af.tolist(), vals.tolist(), strict=True):
            if (l_, f_) == (layer, feature):
                expected[p_] = v
        assert example["tokens_acts_list"] == pytest.approx(expected, abs=1e-6)
        assert example["tokens_acts_list"][pos] == pytest.approx(
            float(node["activation"]), abs=1e-5
        )
        assert doc["act_max"] == pytest.approx(max(expected), abs=1e-6)
        assert example["train_token_ind"] == int(np.argmax(expected))
    files = {p.stem for p in (out / "features" / scan).iterdir()}
    assert files == {str(n["feature"]) for n in feats}  # no files for residue, error or input nodes


def test_graph_not_modified_and_bad_input_refused(tmp_path):
    graph, meta = synthetic_graph(seed=1)
    before = graph.adjacency_matrix.clone()
    write_graph_files(graph, meta, tmp_path, "g1")
    assert graph.adjacency_matrix.equal(before)
    with pytest.raises(ValueError, match="slug"):
        write_graph_files(graph, meta, tmp_path, "../evil")
    meta.grid = (2, 2)
    with pytest.raises(ValueError, match="positions"):
        write_graph_files(graph, meta, tmp_path, "g2")


def test_image_encodings():
    arr = synthetic_image((2, 3), patch_px=8)
    for img in (arr, arr.astype(np.float32) / 255.0, np.moveaxis(arr, -1, 0), Image.fromarray(arr)):
        with Image.open(io.BytesIO(image_png_bytes(img))) as im:
            assert im.size == (24, 16)
    with Image.open(io.BytesIO(image_png_bytes(arr, max_side=12))) as im:
        assert im.size == (12, 8)


def test_graph_metadata_upsert_is_atomic_and_serialised(tmp_path, monkeypatch):
    base = {"scan": "s", "transcoder_list": [], "prompt_tokens": [], "prompt": "p"}
    upsert_graph_metadata(tmp_path, {**base, "slug": "a", "step": 0})
    upsert_graph_metadata(tmp_path, {**base, "slug": "b", "step": 1})
    upsert_graph_metadata(tmp_path, {**base, "slug": "a", "step": 5})
    graphs = read_graph_metadata(tmp_path)["graphs"]
    assert sorted((g["slug"], g["step"]) for g in graphs) == [("a", 5), ("b", 1)]

    threads = [
        threading.Thread(target=upsert_graph_metadata, args=(tmp_path, {**base, "slug": f"t{i}"}))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slugs = {g["slug"] for g in read_graph_metadata(tmp_path)["graphs"]}
    assert slugs == {"a", "b"} | {f"t{i}" for i in range(16)}

    path = tmp_path / "graph-metadata.json"
    before = path.read_bytes()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        upsert_graph_metadata(tmp_path, {**base, "slug": "c"})
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --- server --------------------------------------------------------------------------------


def _raw_get(port: int, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send a raw HTTP request (no client-side normalisation); return (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode("latin-1"))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _raw_post(port: int, target: str, body: bytes, ctype: str = "application/json") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            f"POST {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return int(s.recv(65536).split(b" ")[1])


@pytest.fixture(scope="module")
def server(written, tmp_path_factory):
    out = written[0]
    secret = tmp_path_factory.mktemp("outside") / "secret.txt"
    secret.write_text("TOP SECRET")
    (out / "escape").symlink_to(secret.parent, target_is_directory=True)
    (out / "escape.json").symlink_to(secret)
    srv = serve(out)
    yield srv, secret
    srv.stop()


def test_server_serves_frontend_and_data(server, written):
    srv, _ = server
    assert srv.httpd.server_address[0] == "127.0.0.1" and srv.url.startswith("http://127.0.0.1:")
    status, body = _raw_get(srv.port, "/")
    assert status == 200 and b"vendor/d3/d3.min.js" in body and b"https://" not in body
    assert _raw_get(srv.port, "/vendor/d3/d3.min.js")[0] == 200
    assert _raw_get(srv.port, "/difract/difract-image.js")[0] == 200
    status, body = _raw_get(srv.port, "/data/graph-metadata.json")
    assert status == 200 and json.loads(body)["graphs"][0]["slug"] == SLUG
    status, body = _raw_get(srv.port, f"/graph_data/{SLUG}.json?x=1")
    assert status == 200 and json.loads(body)["metadata"]["slug"] == SLUG
    status, body = _raw_get(srv.port, f"/graph_data/{SLUG}.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    node = next(
        n
        for n in json.loads(_raw_get(srv.port, f"/graph_data/{SLUG}.json")[1])["nodes"]
        if n["feature_type"] == FEATURE_TYPE
    )
    status, body = _raw_get(
        srv.port, f"/features/{written[1]['metadata']['scan']}/{node['feature']}.json"
    )
    assert status == 200 and json.loads(body)["examples_quantiles"]
    assert _raw_get(srv.port, "/data/")[0] == 404  # no listings
    assert _raw_get(srv.port, "/", host="evil.example")[0] == 403


@pytest.mark.parametrize(
    "target",
    [
        "/data/../../../../etc/passwd",
        "/data/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/graph_data/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/data/%252e%252e/%252e%252e/etc/passwd",
        "/data//etc/passwd",
        "/data/%2fetc%2fpasswd",
        "/data/..\\..\\etc\\passwd",
        "/data/%00/etc/passwd",
        "/features/../../../../etc/passwd",
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/attribution_graph/../../../../../../etc/passwd",
        "/data/escape/secret.txt",
        "/data/escape.json",
        "/data/%ff%fe",
    ],
)
def test_server_refuses_paths_outside_its_folders(server, target):
    srv, _ = server
    status, body = _raw_get(srv.port, target)
    assert status in (400, 403, 404)
    assert b"root:" not in body and b"TOP SECRET" not in body


def test_safe_resolve(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.json").write_text("{}")
    assert safe_resolve(tmp_path, "a/f.json") == (tmp_path / "a" / "f.json").resolve()
    for bad in ("../x", "a/../../x", "/etc/passwd", "a\\f.json", "c:x", "a/\x00"):
        assert safe_resolve(tmp_path, bad) is None


def test_save_graph_route(server, written):
    srv, _ = server
    out = written[0]
    body = json.dumps({"qParams": {"pinnedIds": "x", "supernodes": []}}).encode()
    assert _raw_post(srv.port, "/save_graph/..%2f..%2fevil", body) == 404
    assert _raw_post(srv.port, "/save_graph/escape", body) == 404
    assert _raw_post(srv.port, f"/save_graph/{SLUG}", body, ctype="text/plain") == 415
    assert _raw_post(srv.port, f"/save_graph/{SLUG}", body) == 200
    saved = json.loads((out / f"{SLUG}.json").read_text())
    assert saved["qParams"]["pinnedIds"] == "x" and saved["nodes"]


def test_serve_refuses_non_loopback(tmp_path):
    with pytest.raises(ValueError, match="127.0.0.1"):
        serve(tmp_path, host="0.0.0.0")


def test_padding_positions_are_labelled_and_flagged(tmp_path):
    """T5 padding (attention mask 0) is labelled <pad> whatever the tokenizer calls its pad token,
    and flagged in ``metadata.positions``, so the frontend shows it as padding."""
    from difract_ext.cli.sources import load_pipeline
    from difract_ext.replacement.inputs import PAD_LABEL, text_token_labels

    pipe = load_pipeline("tiny").pipe
    labels = text_token_labels(pipe, "a red circle", 8)
    assert labels == ["a", "red", "circle", "</s>"] + [PAD_LABEL] * 4

    class EosPads:  # a tokenizer that pads with its end-of-sequence token
        def __call__(self, text, **kw):
            return {"input_ids": [5, 6, 1, 1, 1], "attention_mask": [1, 1, 1, 0, 0]}

        def convert_ids_to_tokens(self, ids):
            return [{5: "\u2581blue", 6: "\u2581square", 1: "</s>"}[i] for i in ids]

    class Stub:
        tokenizer_2 = EosPads()

    assert text_token_labels(Stub(), "blue square", 5) == [
        "blue",
        "square",
        "</s>",
        "<pad>",
        "<pad>",
    ]

    graph, meta = synthetic_graph(seed=2, n_txt=8, dead_positions=())
    meta.text_tokens = labels
    path = write_graph_files(graph, meta, tmp_path, "pad")
    positions = json.loads(path.read_text())["metadata"]["positions"]
    text = [p for p in positions if p["kind"] == "txt"]
    assert any(p["padding"] for p in text) and not all(p["padding"] for p in text)
    for p in text:
        assert p["padding"] == (p["pos"] >= 4)
        word = PAD_LABEL if p["pos"] >= 4 else labels[p["pos"]]
        assert p["label"] == f'txt {p["pos"]} "{word}"'
    assert all("padding" not in p for p in positions if p["kind"] != "txt")


def _raw_request(port: int, head: str, body: bytes, wait: float = 5.0) -> tuple[int, float]:
    """Send ``head`` + ``body`` as they are; the status and the seconds until it came."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        start = time.monotonic()
        s.sendall(head.encode() + body)
        status = int(s.recv(65536).split(b" ")[1])
        return status, time.monotonic() - start


def test_server_answers_bad_requests_with_4xx_and_drops_stalled_ones(written, monkeypatch):
    """A body shorter than its Content-Length used to hold a handler thread forever; a bad JSON
    body or a malformed graph file on disk used to give a 500 with a traceback."""
    from difract_ext.graphs import server as server_mod

    out = written[0]
    monkeypatch.setattr(server_mod.GraphRequestHandler, "timeout", 1)
    broken = out / "broken.json"
    broken.write_text("{not json")
    srv = serve(out)
    try:

        def head(slug: str, length: str) -> str:
            return (
                f"POST /save_graph/{slug} HTTP/1.0\r\nHost: 127.0.0.1:{srv.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
            )

        body = json.dumps({"qParams": {}}).encode()
        status, took = _raw_request(srv.port, head(SLUG, "100"), body)  # 13 of 100 bytes
        assert status == 408 and took < 4
        assert _raw_request(srv.port, head(SLUG, "x"), body)[0] == 400
        assert _raw_request(srv.port, head(SLUG, "9"), b"{not json")[0] == 400
        assert _raw_request(srv.port, head(SLUG, "2"), b"\xff\xfe")[0] == 400
        assert _raw_request(srv.port, head("broken", str(len(body))), body)[0] == 422
        assert broken.read_text() == "{not json"  # left as it was
        assert _raw_get(srv.port, "/")[0] == 200  # still serving
    finally:
        srv.stop()
        broken.unlink()


def test_port_in_use_names_the_port_and_the_fix(tmp_path, capsys):
    from difract_ext.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=rf"port {port} is in use .*--port 0"):
            serve(tmp_path, port=port)
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("difract serve: error: ") and f"port {port} is in use" in err
