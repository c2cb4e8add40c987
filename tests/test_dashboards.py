"""Dashboard scans: exact top-k and statistics against a brute-force pass, resume after an
interruption, two processes = one process, and the store's errors."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from two_processes import run_two_processes

from difract_ext.dashboards.scan import ScanConfig, ScanError, scan_dashboards
from difract_ext.dashboards.store import HIST_EDGES, DashboardError, DashboardStore
from difract_ext.dashboards.synthetic import synthetic_dashboards
from difract_ext.flux.sites import Site

PROMPTS = [
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle on the right and a yellow circle on the left",
    "a purple square at the bottom",
    "an orange triangle on the left",  # not grammar: no concepts needed here
]
SEEDS = [0, 3]
TOP_K = 3
BATCH = 3  # 10 units -> chunks of 3, 3, 3, 1

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyDictionary(torch.nn.Module):
    """A duck-typed dictionary: ``encode(x, t) = relu(x W + b + t c)``."""

    def __init__(self, d_in: int, d_sae: int, seed: int, role: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        self.b = torch.nn.Parameter(-0.5 * torch.rand(d_sae, generator=g))
        self.c = torch.nn.Parameter(torch.randn(d_sae, generator=g))
        self.role = role
        self.cfg = SimpleNamespace(d_sae=d_sae, metadata={})

    def encode(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return torch.relu(x @ self.W + self.b + t[..., None] * self.c)


def toy_dictionaries() -> dict[Site, ToyDictionary]:
    return {
        Site(1, "img"): ToyDictionary(128, 12, 0, "transcoder"),
        Site(2, "img"): ToyDictionary(128, 10, 1, "sae"),
        Site(1, "txt"): ToyDictionary(128, 9, 2, "transcoder"),
    }


def pipeline() -> Any:
    from difract_ext.cli.sources import load_pipeline

    return load_pipeline("shapes")


def config(loaded: Any) -> ScanConfig:
    return ScanConfig(
        seeds=SEEDS,
        top_k=TOP_K,
        batch_size=BATCH,
        call_kwargs=dict(loaded.call_kwargs),
        model_name=loaded.model_name,
        scan="toy",
        block_elems=64 * 12 * 2,  # two examples per encode call
        feature_block=5,  # several feature blocks per site
    )


WORKER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import test_dashboards as T
    from difract_ext.dashboards.scan import scan_dashboards
    torch.set_num_threads(1)
    loaded = T.pipeline()
    scan_dashboards(loaded.pipe, T.toy_dictionaries(), T.PROMPTS, sys.argv[2], T.config(loaded),
                    progress=False)
""")


@pytest.fixture(scope="module")
def loaded() -> Any:
    return pipeline()


@pytest.fixture(scope="module")
def one_run(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "dash"
    return scan_dashboards(
        loaded.pipe, toy_dictionaries(), PROMPTS, out, config(loaded), progress=False
    )


def _brute_force(loaded: Any) -> tuple[dict[Site, torch.Tensor], list[float]]:
    """Every activation ``[S, E, P, F]`` per site, from plain forward hooks (same batching)."""
    dicts = toy_dictionaries()
    pipe = loaded.pipe
    units = [(p, s) for p in range(len(PROMPTS)) for s in SEEDS]
    seen: dict[Site, list[torch.Tensor]] = {site: [] for site in dicts}
    ts: list[float] = []
    handles = [
        pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: ts.append(float(kw["timestep"].reshape(-1)[0])), with_kwargs=True
        )
    ]
    for site, d in dicts.items():
        mod = pipe.transformer.get_submodule(site.module_path)

        def hook(m: Any, args: tuple, out: torch.Tensor, site: Site = site, d: Any = d) -> None:
            x = args[0] if d.role == "transcoder" else out
            seen[site].append((x.detach().float(), len(ts) - 1))

        handles.append(mod.register_forward_hook(hook))
    per_chunk: dict[Site, list[list[torch.Tensor]]] = {s: [] for s in dicts}
    try:
        with torch.no_grad():
            for c in range(0, len(units), BATCH):
                chunk = units[c : c + BATCH]
                for s in dicts:
                    seen[s] = []
                gens = [torch.Generator().manual_seed(sd) for _, sd in chunk]
                pipe(
                    prompt=[PROMPTS[p] for p, _ in chunk],
                    generator=gens,
                    output_type="latent",
                    **loaded.call_kwargs,
                )
                for site, d in dicts.items():
                    steps = []
                    for x, ti in seen[site]:
                        t = torch.full(x.shape[:-1], ts[ti])
                        # one example at a time: no batching shared with the scan's encode calls
                        steps.append(
                            torch.stack(
                                [
                                    d.encode(x[b : b + 1], t=t[b : b + 1])[0]
                                    for b in range(len(chunk))
                                ]
                            )
                        )
                    per_chunk[site].append(torch.stack(steps))  # [S, b, P, F]
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(v, 1) for s, v in per_chunk.items()}, ts[:4]


def test_scan_matches_brute_force(loaded: Any, one_run: Path) -> None:
    acts, ts = _brute_force(loaded)
    store = DashboardStore.open(one_run)
    assert store.index["timesteps"] == pytest.approx(ts)
    n_ex = len(PROMPTS) * len(SEEDS)
    for site, a in acts.items():
        s_, e_, p_, f_ = a.shape
        assert e_ == n_ex
        t = store.tensors(site)
        best = a.amax(2)  # [S, E, F]
        for f in range(f_):
            for s in range(s_):
                vals = best[s, :, f].tolist()
                order = sorted(range(e_), key=lambda e: (-vals[e], e))[:TOP_K]
                got = t["top_example"][f, s].tolist()
                assert got == order, (site, f, s)
                np.testing.assert_allclose(
                    t["top_act"][f, s].numpy(), [vals[e] for e in order], rtol=1e-5, atol=1e-6
                )
                for j, e in enumerate(order):  # maps: float16 of every position
                    np.testing.assert_allclose(
                        t["top_map"][f, s, j].float().numpy(),
                        a[s, e, :, f].numpy(),
                        rtol=1e-3,
                        atol=1e-3,
                    )
        flat = a.permute(3, 0, 1, 2).reshape(f_, -1)
        np.testing.assert_allclose(t["act_max"].numpy(), flat.amax(1).numpy(), rtol=1e-5)
        assert torch.equal(t["profile_fire"], (a > 0).sum((1, 2)).T)
        np.testing.assert_allclose(
            t["profile_sum"].numpy(), a.sum((1, 2)).T.double().numpy(), rtol=1e-4
        )
        # histogram: every positive activation in its geometric bin (independent: math.log10)
        for f in range(f_):
            pos = flat[f][flat[f] > 0].double().numpy()
            idx = np.clip(np.floor((np.log10(pos) + 4) * 128 / 8), 0, len(HIST_EDGES) - 2).astype(
                int
            )
            expect = np.bincount(idx, minlength=len(HIST_EDGES) - 1)
            got = t["hist"][f].numpy()
            # a value within float rounding of an edge may land in the neighbour bin
            assert got.sum() == expect.sum() and np.abs(got - expect).sum() <= 2, (site, f)
        payload = store.feature_payload(site, 0)
        assert payload["activation_frequency"] == pytest.approx(
            float((flat[0] > 0).double().mean())
        )
        assert [ex["step"] for ex in payload["examples"]] == sorted(
            ex["step"] for ex in payload["examples"]
        )


def test_token_sums_match_brute_force(loaded: Any, one_run: Path) -> None:
    acts, _ = _brute_force(loaded)
    store = DashboardStore.open(one_run)
    vocab = store.index["vocab"]
    ids = store.index["prompt_token_ids"]
    a = acts[Site(1, "txt")]  # [S, E, T, F]
    t = store.tensors("txt_1")
    expect = torch.zeros(a.shape[-1], len(vocab), dtype=torch.float64)
    count = torch.zeros(len(vocab), dtype=torch.int64)
    for e in range(a.shape[1]):
        prompt = e // len(SEEDS)
        for s in range(a.shape[0]):
            for p, v in enumerate(ids[prompt]):
                if v >= 0:
                    expect[:, v] += a[s, e, p].double()
                    count[v] += 1
    assert torch.equal(t["token_count"], count)
    np.testing.assert_allclose(
        t["token_sum"].double().numpy(), expect.numpy(), rtol=1e-4, atol=1e-5
    )
    top = store.top_tokens("txt_1", 0, n=3)
    means = (expect[0] / count.clamp_min(1)).tolist()
    best = sorted((i for i in range(len(vocab)) if count[i] > 0), key=lambda i: -means[i])[:3]
    assert [x["token"] for x in top] == [vocab[i] for i in best if means[i] > 0]


def _all_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.stem}/{k}"] = v
    return out


def _same(a: Path, b: Path) -> None:
    ta, tb = _all_tensors(a), _all_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if k.endswith(("profile_sum", "token_sum")):  # float sums: order of chunks may differ
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(ta[k], tb[k]), k
    ia, ib = (json.loads((x / "index.json").read_text()) for x in (a, b))
    assert ia == ib
    assert sorted(p.name for p in (a / "images").iterdir()) == sorted(
        p.name for p in (b / "images").iterdir()
    )


def test_resume_after_interruption_gives_identical_output(
    loaded: Any, one_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dash"
    with pytest.raises(KeyboardInterrupt):
        scan_dashboards(
            loaded.pipe,
            toy_dictionaries(),
            PROMPTS,
            out,
            config(loaded),
            progress=False,
            stop_after_chunks=2,
        )
    assert (out / ".scan" / "rank0.safetensors").is_file() and not (out / "index.json").exists()
    with pytest.raises(ScanError, match="resume"):
        scan_dashboards(
            loaded.pipe, toy_dictionaries(), PROMPTS, out, config(loaded), progress=False
        )
    other = config(loaded)
    other.top_k = 2
    with pytest.raises(ScanError, match="top_k"):
        scan_dashboards(
            loaded.pipe, toy_dictionaries(), PROMPTS, out, other, progress=False, resume=True
        )
    scan_dashboards(
        loaded.pipe, toy_dictionaries(), PROMPTS, out, config(loaded), progress=False, resume=True
    )
    assert not (out / ".scan").exists()
    _same(one_run, out)


def test_two_processes_give_the_same_dashboards(one_run: Path, tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    run_two_processes(tmp_path / "worker.py", str(Path(__file__).parent), str(tmp_path / "two"))
    _same(one_run, tmp_path / "two")


def test_store_errors(tmp_path: Path) -> None:
    with pytest.raises(DashboardError, match="not a dashboard folder"):
        DashboardStore.open(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "other", "sites": {}}')
    with pytest.raises(DashboardError, match="format"):
        DashboardStore.open(tmp_path)
    dash = synthetic_dashboards(tmp_path / "syn", ["img_1", "txt_0"], d_sae=6)
    store = DashboardStore.open(dash)
    assert store.sites == [Site(0, "txt"), Site(1, "img")]
    with pytest.raises(DashboardError, match="no dashboards for site img_2"):
        store.feature_payload("img_2", 0)
    with pytest.raises(DashboardError, match="not a site"):
        store.label("img-1", 0)
    with pytest.raises(DashboardError, match=r"feature 6 out of range.*0\.\.5"):
        store.feature_payload("img_1", 6)
    with pytest.raises(DashboardError, match="out of range"):
        store.label("txt_0", -1)
    assert store.label("img_1", 0) == "colour=red" and store.label("img_1", 1) is None
    (dash / "txt_0.safetensors").unlink()
    with pytest.raises(DashboardError, match="missing"):
        DashboardStore.open(dash)
