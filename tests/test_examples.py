"""Every script in examples/ runs end to end (offline, on tiny stand-ins)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_load_difract_transcoder_example() -> None:
    out = run_example("load_difract_transcoder.py")
    assert "loaded TimestepTranscoder (a sae_lens Transcoder: True)" in out
    steps = [line for line in out.splitlines() if line.startswith("t=")]
    assert [s.split()[0] for s in steps] == ["t=1", "t=0.75", "t=0.5", "t=0.25"]
    assert "SAE.load_from_disk -> TimestepTranscoder, identical outputs: True" in out


def test_trace_flux_example_on_the_shapes_model() -> None:
    out = run_example("trace_flux.py")  # default: the shipped shapes model and its transcoders
    assert out.startswith("model=shapes: 4 double blocks, transcoders at [(1, 'img')]")
    steps = [line.split()[0] for line in out.splitlines() if line.startswith("t=")]
    assert steps == ["t=1", "t=0.75", "t=0.5", "t=0.25"]
    assert "unedited trace identical to plain diffusers: True" in out


def test_trace_flux_example_tiny() -> None:
    out = run_example("trace_flux.py", "--model", "tiny")
    steps = [line.split()[0] for line in out.splitlines() if line.startswith("t=")]
    assert steps == ["t=1", "t=0.75", "t=0.5", "t=0.25"]
    assert "changed the final latent by" in out
    assert "unedited trace identical to plain diffusers: True" in out


def test_steer_shapes_example() -> None:
    out = run_example("steer_shapes.py")
    nodes = [line for line in out.splitlines() if line.startswith("node ")]
    assert len(nodes) == 4 and all("step 0" in n for n in nodes)
    assert [line.split()[0] for line in out.splitlines() if " edits, success " in line] == [
        "circuit",
        "sae",
    ]
    assert "strength 0 leaves the images unchanged: True" in out
