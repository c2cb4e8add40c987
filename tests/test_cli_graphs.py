"""`difract attribute`, `difract serve` and `difract demo` (the main job) from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def difract(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "difract_ext.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_attribute_on_the_shapes_model(tmp_path: Path) -> None:
    args = [
        "attribute",
        "--prompt",
        "a blue square at the top",
        "--step",
        "2",
        "--target",
        "x0:blue@top",
        "--target",
        "velocity:#ff0000@bottom=0.5",
        "--max-feature-nodes",
        "300",
        "--out",
        str(tmp_path),
    ]
    est = difract(*args, "--estimate")
    assert est.returncode == 0, est.stderr[-3000:]
    estimate = json.loads(est.stdout)
    assert not list(tmp_path.glob("*.json"))  # an estimate builds no graph
    res = difract(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"difract serve {tmp_path}" in res.stdout
    assert "without scan" not in res.stderr  # the job names its transcoder set (Graph.scan)
    (report_file,) = tmp_path.glob("*.report.json")
    report = json.loads(report_file.read_text())
    assert report["timestep"] == 0.5 and report["n_feature_nodes"] == 300
    assert report["conservation"]["max_rel_error"] <= 1e-5
    # the estimate saw the same step: same features, same graph form, the same backward passes
    # (2 targets in 1 pass; 300 features in ranking batches of 128, 128, 44: 4 + 4 + 2 of 32)
    assert estimate["n_active"] == report["n_active_features"] and estimate["features"] == 300
    assert estimate["backward_passes"] == report["graph"]["backward_passes"] == 1 + 10
    assert estimate["one_pass"] == report["graph"]["one_pass"]
    assert 0.4 < estimate["peak_gib"] < 4
    graph = json.loads(Path(report["graph_file"]).read_text())
    labels = {n.get("clerp", "") for n in graph["nodes"]}
    assert any(lbl.startswith('Target "x0:blue@top"') for lbl in labels)
    assert (
        graph["metadata"]["step"] == 2 and graph["metadata"]["prompt"] == "a blue square at the top"
    )


def test_attribute_and_serve_errors(tmp_path: Path) -> None:
    res = difract(
        "attribute",
        "--prompt",
        "a red circle on the left",
        "--target",
        "x0:red",
        "--out",
        str(tmp_path),
    )
    assert res.returncode == 2 and "cannot parse target 'x0:red'" in res.stderr
    res = difract(
        "attribute",
        "--prompt",
        "a red circle on the left",
        "--target",
        "x0:magenta@left",
        "--out",
        str(tmp_path),
    )
    assert res.returncode == 2 and "unknown colour 'magenta'" in res.stderr
    res = difract("serve", str(tmp_path / "nope"))
    assert res.returncode == 2 and "no such graph folder" in res.stderr
    for cmd in ("attribute", "serve", "demo"):
        assert difract(cmd, "--help").returncode == 0


def test_demo_main_job(tmp_path: Path) -> None:
    res = difract("demo", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "shapes_demo.png").exists()
    assert "view it with:" in res.stdout and "difract serve" in res.stdout
    meta = json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text())
    assert len(meta["graphs"]) == 1


def test_serve_announces_itself_once(tmp_path: Path) -> None:
    """`difract -v serve` prints one banner with the real URL and stops cleanly on Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "difract_ext.cli", "-v", "serve", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a fresh shell's Ctrl-C: an ignored SIGINT (inherited from the test process if something
        # in it set SIG_IGN) would survive exec and the server would never see the signal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        banner = proc.stdout.readline()  # blocks until the server listens
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert banner.startswith(f"serving {tmp_path} at http://127.0.0.1:") and ":0/" not in banner
    assert proc.returncode == 0, err[-3000:]
    assert (banner + out + err).count("serving") == 1, (banner, out, err)
