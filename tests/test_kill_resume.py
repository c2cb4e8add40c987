"""``kill -9`` in the middle of `difract harvest` / `difract train`, then ``--resume``: nothing
lost.

Each command runs in a subprocess that is SIGKILLed once it has committed some work (shards, a
checkpoint); the resumed run must end bit-identical to an uninterrupted one (one thread each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "difract_ext.cli"]


def _run(args: list[str]) -> None:
    proc = subprocess.run(CLI + args, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _kill_when(
    args: list[str], ready: Callable[[], bool], then: float = 0.0, timeout: float = 300.0
) -> None:
    """Start the command, SIGKILL it ``then`` seconds after ``ready()`` holds; fail if it ends
    first.
    """
    proc = subprocess.Popen(
        CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, (
                "the command finished before it could be killed: give it more work"
            )
            assert time.monotonic() < deadline, "no progress before the timeout"
            time.sleep(0.01)
        time.sleep(then)
        assert proc.poll() is None, (
            "the command finished before it could be killed: give it more work"
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


def _tensors(root: Path, pattern: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob(pattern)):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(root)}:{k}"] = v
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    colours, shapes = (
        ["red", "green", "blue", "yellow", "purple"],
        ["circle", "square", "triangle", "star"],
    )
    path.write_text("\n".join(f"a {c} {s} at the top" for c in colours for s in shapes) + "\n")
    return path


def test_killed_harvest_resumes_to_the_same_rows(prompts: Path, tmp_path: Path) -> None:
    common = [
        "harvest",
        "--model",
        "tiny",
        "--prompts",
        str(prompts),
        "--seeds",
        "0",
        "1",
        "--batch-size",
        "1",
        "--shard-rows",
        "1",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    _run(common + ["--out", str(tmp_path / "full")])
    cut = tmp_path / "cut"
    _kill_when(
        common + ["--out", str(cut)],
        lambda: len(list((cut / "shards").glob("c*.safetensors"))) >= 3,
    )
    committed = len(list((cut / "shards").glob("c*.safetensors")))
    assert 3 <= committed < 40
    _run(common + ["--out", str(cut), "--resume"])
    # one chunk (= one unit) per shard: shard files are named by chunk, so they pair up by name
    full, resumed = (
        _tensors(tmp_path / "full", "shards/c*.safetensors"),
        _tensors(cut, "shards/c*.safetensors"),
    )
    assert full.keys() == resumed.keys() and len({k.split(":")[0] for k in full}) == 40
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert not list((cut / "shards").glob(".*"))  # the killed process's partial file is gone


def test_killed_training_resumes_to_the_same_weights(prompts: Path, tmp_path: Path) -> None:
    data = tmp_path / "acts"
    _run(
        [
            "harvest",
            "--model",
            "tiny",
            "--prompts",
            str(prompts),
            "--seeds",
            "0",
            "1",
            "2",
            "--out",
            str(data),
            "--sites",
            "img_0",
            "--dtype",
            "float32",
            "--no-progress",
        ]
    )
    common = [
        "train",
        "--data",
        str(data),
        "--sites",
        "img_0",
        "--l1-img",
        "1e-3",
        "--expansion",
        "2",
        "--d-t-embed",
        "16",
        "--batch-size",
        "64",
        "--epochs",
        "10",
        "--resample-every",
        "50",
        "--dead-window",
        "20",
        "--checkpoint-every-steps",
        "25",
        "--no-progress",
    ]
    _run(common + ["--out", str(tmp_path / "full")])
    cut = tmp_path / "cut"
    _kill_when(
        common + ["--out", str(cut)], (cut / "checkpoint" / "trainer_state.pt").is_file, then=0.3
    )
    assert not (cut / "index.json").exists()  # killed before the end
    _run(common + ["--out", str(cut), "--resume"])
    full = _tensors(tmp_path / "full", "**/sae_weights.safetensors")
    resumed = _tensors(cut, "**/sae_weights.safetensors")
    assert full.keys() == resumed.keys() and full
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
