"""Two CPU processes (torchrun + accelerate's CPU process group): harvest and DDP training.

The workers run in fresh interpreters (a forked child of a process that already used OpenMP
hangs), launched like a user would: ``python -m torch.distributed.run --nproc_per_node 2``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from two_processes import run_two_processes

from difract_ext.adapters.dictionaries import SAELENS_IO
from difract_ext.capture import HarvestConfig, HarvestReader, harvest
from difract_ext.capture.synthetic import synthetic_harvest
from difract_ext.cli.sources import load_pipeline
from difract_ext.flux.sites import Site
from difract_ext.training import DictionarySpec, TrainConfig, train_dictionaries

PROMPTS = [
    "a red circle",
    "the cat on the left of a dog",
    "dog",
    "a big blue square",
    "an orange cat",
]
SPECS = [
    DictionarySpec(
        Site(0, "img"), "transcoder", "relu", l1_coefficient=1e-3, d_sae=32, d_t_embed=16, lr=1e-2
    ),
    DictionarySpec(Site(0, "img"), "sae", "topk", k=3, d_sae=32, d_t_embed=16, lr=1e-2),
]
TRAIN_CFG = TrainConfig(
    batch_size=256, epochs=2, dead_window=4, resample_every=6, resample_until=1.0, log_every=0
)

WORKER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import test_distributed as T
    from difract_ext.capture import harvest
    from difract_ext.capture.processes import process_state
    from difract_ext.cli.sources import load_pipeline
    from difract_ext.adapters.dictionaries import SAELENS_IO
    from difract_ext.training import train_dictionaries
    torch.set_num_threads(1)
    out = Path(sys.argv[2])
    tiny = load_pipeline("tiny")
    harvest(tiny.pipe, T.PROMPTS, out / "harvest", T.harvest_config(tiny), progress=False)
    res = train_dictionaries(
        out / "data", T.SPECS, out / "ddp", T.TRAIN_CFG, progress=False, io=SAELENS_IO
    )
    rank = process_state().process_index
    torch.save({k: m.state_dict() for k, m in res.modules.items()}, out / f"rank{rank}.pt")
""")


pytestmark = pytest.mark.usefixtures("one_thread")


def harvest_config(tiny: Any) -> HarvestConfig:
    return HarvestConfig(
        sites=[Site(0, "img"), Site(1, "txt")],
        seeds=[0, 1],
        batch_size=2,
        shard_rows=1,
        dtype="float32",
        call_kwargs=tiny.call_kwargs,
        model_name=tiny.model_name,
    )


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    reader = HarvestReader(root)
    parts = [reader.load_shard(i) for i in range(len(reader.shards))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    synthetic_harvest(
        out / "data",
        [Site(0, "img")],
        n_rows=2048,
        d_model=8,
        n_latents=16,
        shard_rows=1024,
        threshold=1.0,
    )
    (out / "worker.py").write_text(WORKER)
    run_two_processes(out / "worker.py", str(Path(__file__).parent), str(out))
    return out


def test_two_process_harvest_equals_one_process(two_procs: Path, tmp_path: Path) -> None:
    assert (two_procs / "harvest" / "manifest.rank0.json").is_file()
    assert (two_procs / "harvest" / "manifest.rank1.json").is_file()
    tiny = load_pipeline("tiny")
    harvest(tiny.pipe, PROMPTS, tmp_path / "one", harvest_config(tiny), progress=False)
    one, two = _tensors(tmp_path / "one"), _tensors(two_procs / "harvest")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k


def test_ddp_training_keeps_ranks_in_sync(two_procs: Path, tmp_path: Path) -> None:
    r0 = torch.load(two_procs / "rank0.pt", weights_only=True)
    r1 = torch.load(two_procs / "rank1.pt", weights_only=True)
    single = train_dictionaries(
        two_procs / "data", SPECS, tmp_path / "single", TRAIN_CFG, progress=False, io=SAELENS_IO
    )
    for spec in SPECS:
        name = spec.resolved_name
        for k in r0[name]:
            assert torch.equal(r0[name][k], r1[name][k]), (name, k)  # gradients were all-reduced
        m_ddp = json.loads((two_procs / "ddp" / name / "metrics.json").read_text())
        assert (
            json.loads((two_procs / "ddp" / name / "training.json").read_text())["processes"] == 2
        )
        m_one = single.metrics[name]
        assert m_ddp["steps"] == m_one["steps"] == 16
        # same global batches, so close to the one-process run (not equal: per-rank variance terms)
        assert m_ddp["final"]["nmse"] == pytest.approx(m_one["final"]["nmse"], rel=0.25, abs=0.02)
