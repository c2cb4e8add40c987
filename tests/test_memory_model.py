"""The attribution memory model: backward passes exactly, peak RSS within 20 % on small cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from random_dictionaries import random_transcoders

from difract_ext.adapters.attribution import attribute_step
from difract_ext.attribution.memory import (
    AttributionSize,
    attribution_size,
    backward_passes,
    estimate_attribution,
)
from difract_ext.flux.tiny import build_tiny_flux_pipeline
from difract_ext.replacement.inputs import capture_step_input
from difract_ext.replacement.targets import output_target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    pipe = build_tiny_flux_pipeline(seed=0)
    step = capture_step_input(
        pipe, "a red circle", step=1, seed=0, height=32, width=32, max_sequence_length=16
    )
    dics = random_transcoders(pipe.transformer.inner_dim, mod_std=None)
    u = torch.randn(16, generator=torch.Generator().manual_seed(3))

    def targets(m):
        return [
            output_target(m.frozen, "all", u, label="a"),
            output_target(m.frozen, [(0, 0)], -u, label="b"),
            output_target(m.frozen, [(1, 1)], u, label="c"),
        ]

    return pipe, step, dics, targets


@pytest.mark.parametrize(
    ("budget", "batch", "backward", "rank"),
    [(40, 32, 16, None), (100, 16, 8, None), (100, 16, 8, 8), (None, 128, 64, None)],
)
def test_backward_passes_are_predicted(setup, budget, batch, backward, rank) -> None:
    pipe, step, dics, targets = setup
    res = attribute_step(
        pipe.transformer,
        step,
        dics,
        targets,
        max_feature_nodes=budget,
        batch_size=batch,
        backward_batch=backward,
        rank_entries=rank,
    )
    n = res.components.n_active
    size = attribution_size(
        pipe.transformer,
        dics,
        step.n_txt,
        step.n_img,
        n,
        budget,
        n_targets=3,
        batch_size=batch,
        backward_batch=backward,
        rank_entries=rank,
    )
    est = estimate_attribution(size)
    assert est.one_pass == res.graph.info["one_pass"] == (rank is None)
    assert est.backward_passes == res.graph.info["backward_passes"]
    # residue nodes: one per (double layer, position), an upper bound (here 158 or 160 of 160)
    actual = res.graph.rows.numel() * 4
    assert actual <= est.terms["graph_rows"] <= 1.01 * actual


def test_backward_pass_count_by_hand() -> None:
    # 3 targets in 1 pass of 16; 100 features in ranking batches of 32 (queues of 4 x 32 = 128:
    # one queue of 100 = 32 + 32 + 32 + 4), each cut into passes of 16: 2 + 2 + 2 + 1
    assert backward_passes(3, 100, 32, 16) == 1 + 7
    # circuit-tracer's batch above the queue: 300 features, batch 128, passes of 32
    assert backward_passes(1, 300, 128, 32) == 1 + 4 + 4 + 2
    size = AttributionSize(
        n_double=2, n_single=1, d_model=32, n_txt=16, n_img=64, n_active=10**6, budget=300
    )
    est = estimate_attribution(size)  # truncated rows: every chosen row is computed again
    assert not est.one_pass and est.backward_passes == 11 + 10 + 1


def _measure(rank_entries: int | None) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "flux_scale.py"),
        "--worker",
        "small",
        "--case-json",
        '{"arch": "narrow", "double": 4, "single": 4, "px": 256, "txt": 128, "d_sae": 4096}',
        "--active",
        "128",
        "--features",
        "300",
        "--no-files",
        "--threads",
        "2",
    ]
    if rank_entries:
        cmd += ["--rank-entries", str(rank_entries)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rank_entries", [None, 2000])
def test_peak_rss_is_predicted_within_20_percent(rank_entries) -> None:
    """FLUX.1's block types at width 64, 4 + 4 blocks, 384 positions, 128 active features per
    position (196,608), 300 features: whole ranking rows (one pass, 0.24 GB of rows) or 2,000
    entries each (two passes). The peak RSS of attribution, scores and pruning (reset before
    attribution) and its increment over the process before attribution, against the model."""
    r = _measure(rank_entries)
    assert r["one_pass"] == (rank_entries is None)
    assert r["backward_passes"] == r["predicted_passes"]
    total, inc = r["peak_gib"], r["increment_gib"]
    assert inc > 0.25  # attribution's own memory is a real part of the peak
    assert abs(r["predicted_peak_measured_n_gib"] - total) <= 0.2 * total, r
    assert abs(r["predicted_increment_gib"] - inc) <= 0.2 * inc, r
