"""Interruptions keep work: Ctrl-C on `difract harvest` / `difract train` keeps every finished
unit or step, prints one line saying how to resume (exit 130), and the resumed run ends
bit-identical to an uninterrupted one."""

from __future__ import annotations

import importlib
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from difract_ext.capture import HarvestConfig, harvest
from difract_ext.capture.format import read_all_shards
from difract_ext.capture.synthetic import synthetic_harvest
from difract_ext.cli import main
from difract_ext.cli.main import interrupted_message
from difract_ext.cli.sources import load_pipeline
from difract_ext.flux.sites import Site
from difract_ext.training import trainer as trainer_mod
from difract_ext.util.interrupt import DeferredInterrupt

pytestmark = pytest.mark.usefixtures("one_thread", "python_sigint")


@pytest.fixture
def python_sigint() -> Any:
    """Python's own SIGINT handler, as in a fresh `difract` process (a library imported by an
    earlier test may have replaced it, and DeferredInterrupt then rightly stays out of the way)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


harvest_mod = importlib.import_module(
    "difract_ext.capture.harvest"
)  # the package exports the function

PROMPTS = [
    "a red circle",
    "the cat on the left of a dog",
    "dog",
    "a big blue square at the top",
    "a green star",
    "two yellow squares",
]


class _HardKill(BaseException):
    """Stands for SIGKILL: no handler runs on the way out."""


def _fail_on_chunk(monkeypatch: pytest.MonkeyPatch, n: int, error: type[BaseException]) -> None:
    """Raise ``error`` when the harvest starts its ``n``-th chunk (1-based)."""
    real, calls = harvest_mod._text_valid, []

    def text_valid(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(harvest_mod, "_text_valid", text_valid)


def _rows(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the harvest, shards concatenated in chunk order."""
    from difract_ext.capture import HarvestReader

    reader = HarvestReader(root)
    parts = [reader.load_shard(i) for i in range(len(reader.shards))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _same_harvest(full: Path, cut: Path) -> None:
    a, b = _rows(full), _rows(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    names = [s.file for s in read_all_shards(full)]
    assert [s.file for s in read_all_shards(cut)] == names  # the same files as without interruption
    assert sorted(p.name for p in (cut / "shards").iterdir()) == sorted(Path(n).name for n in names)


def test_ctrl_c_on_harvest_keeps_finished_units_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    # default --shard-rows (65,536): larger than this whole harvest, as in the README's
    common = [
        "harvest",
        "--model",
        "tiny",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--seeds",
        "0",
        "1",
        "--batch-size",
        "2",
        "--sites",
        "img_0",
        "txt_1",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    argv = [*common, "--out", str(tmp_path / "cut")]
    _fail_on_chunk(monkeypatch, 4, KeyboardInterrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "difract harvest: interrupted: finished units are kept; resume with: difract "
        + shlex.join([*argv, "--resume"])
    )
    assert "Traceback" not in err
    kept = read_all_shards(tmp_path / "cut")
    assert sorted(u for s in kept for u in s.units) == [
        (p, s) for p in range(3) for s in (0, 1)
    ]  # 3 chunks
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    _same_harvest(tmp_path / "full", tmp_path / "cut")


def test_time_bound_commits_survive_a_hard_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = load_pipeline("tiny")
    cfg = HarvestConfig(
        sites=[Site(0, "img"), Site(1, "txt")],
        seeds=[0, 1],
        batch_size=2,
        shard_rows=10**6,
        commit_seconds=0,
        dtype="float32",
        call_kwargs=tiny.call_kwargs,
    )
    harvest(tiny.pipe, PROMPTS, tmp_path / "full", cfg, progress=False)
    _fail_on_chunk(monkeypatch, 4, _HardKill)
    with pytest.raises(_HardKill):
        harvest(tiny.pipe, PROMPTS, tmp_path / "cut", cfg, progress=False)
    # every finished chunk was committed (commit_seconds=0: after each), as partial shards
    assert [s.file for s in read_all_shards(tmp_path / "cut")] == [
        f"shards/p{c:06d}-{c:06d}.safetensors" for c in range(3)
    ]
    monkeypatch.undo()
    res = harvest(tiny.pipe, PROMPTS, tmp_path / "cut", cfg, resume=True, progress=False)
    assert res.complete and res.shards == 1  # the partial shards were read back into one full shard
    _same_harvest(tmp_path / "full", tmp_path / "cut")


def test_ctrl_c_on_train_writes_a_checkpoint_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = synthetic_harvest(tmp_path / "acts", [Site(0, "img")], n_rows=4096, shard_rows=1024)
    common = [
        "train",
        "--data",
        str(data),
        "--sites",
        "img_0",
        "--expansion",
        "2",
        "--d-t-embed",
        "16",
        "--batch-size",
        "128",
        "--epochs",
        "3",
        "--lr",
        "3e-3",
        "--resample-every",
        "10",
        "--dead-window",
        "5",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    real_step, calls = trainer_mod._step, []

    def step(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 25:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, in the middle of a step
        real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "_step", step)
    argv = [*common, "--out", str(tmp_path / "cut")]
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "difract train: interrupted: training state up to the last finished step is kept in "
        "OUT/checkpoint; "
        "resume with: difract " + shlex.join([*argv, "--resume"])
    )
    ckpt = torch.load(tmp_path / "cut" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert ckpt["global_step"] == 25 and not (tmp_path / "cut" / "index.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    name = "transcoders/img_0/relu_l1-3e-04_x2/sae_weights.safetensors"
    from safetensors.torch import load_file

    full, resumed = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_a_second_ctrl_c_stops_at_once() -> None:
    with DeferredInterrupt() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with (
        DeferredInterrupt(enabled=False),
        pytest.raises(KeyboardInterrupt),
    ):  # multi-process: no deferral
        signal.raise_signal(signal.SIGINT)


def test_interrupt_message_of_a_command_without_resume() -> None:
    assert interrupted_message("eval", ["eval", "--out", "a b"]) == (
        "interrupted; nothing to resume: run `difract eval --out 'a b'` again"
    )
    assert interrupted_message("harvest", ["harvest", "--resume"]).endswith(
        "resume with: difract harvest --resume"
    )
