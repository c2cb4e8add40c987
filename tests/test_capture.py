"""Harvesting: rows, padding, subsampling, manifest, and exact resume after an interruption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from difract_ext.capture import HarvestConfig, HarvestFormatError, HarvestReader, harvest
from difract_ext.capture.format import read_all_shards
from difract_ext.cli.sources import load_pipeline, parse_sites
from difract_ext.flux.sites import Site, SiteError

PROMPTS = ["a red circle", "the cat on the left of a dog", "dog", "a big blue square at the top"]
SITES = [Site(0, "img"), Site(0, "txt"), Site(1, "txt")]
STEPS = 4
S_IMG = 64  # 32x32 image, VAE factor 2, 2x2 packing -> 8x8 tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_pipeline("tiny")


def _cfg(tiny: Any, **kw: Any) -> HarvestConfig:
    base = dict(
        sites=SITES,
        seeds=[0, 1],
        batch_size=3,
        shard_rows=200,
        dtype="float32",
        call_kwargs=tiny.call_kwargs,
        model_name=tiny.model_name,
    )
    return HarvestConfig(**{**base, **kw})


def _all_tensors(root: Path) -> dict[str, torch.Tensor]:
    reader = HarvestReader(root)
    parts = [reader.load_shard(i) for i in range(len(reader.shards))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_rows_padding_dropped_and_values_are_the_mlp(tiny: Any, tmp_path: Path) -> None:
    cfg = _cfg(tiny, text_padding="drop")
    res = harvest(tiny.pipe, PROMPTS, tmp_path / "h", cfg, progress=False)
    n_units = len(PROMPTS) * 2
    real = {i: len(p.split()) + 1 for i, p in enumerate(PROMPTS)}  # words + </s>
    assert res.complete and res.units_done == n_units
    assert res.rows["img"] == n_units * STEPS * S_IMG
    assert res.rows["txt"] == 2 * STEPS * sum(real.values())
    assert res.timesteps == [0.25, 0.5, 0.75, 1.0]
    reader = HarvestReader(tmp_path / "h")
    x, y, meta = reader.site_rows(Site(1, "txt"))
    assert x.shape == (res.rows["txt"], 32)
    for p, n in real.items():  # only real token positions, each step and seed exactly once
        rows = meta["prompt"] == p
        assert int(rows.sum()) == 2 * STEPS * n
        assert int(meta["pos"][rows].max()) == n - 1
    # y really is the MLP output of x (recomputed independently through the module)
    for site in SITES:
        x, y, _ = reader.site_rows(site)
        ff = tiny.pipe.transformer.get_submodule(site.module_path)
        torch.testing.assert_close(ff(x), y, rtol=1e-5, atol=1e-5)
    # image rows are all positions of every step; t follows the schedule
    _, _, m_img = reader.site_rows(Site(0, "img"))
    assert torch.equal(torch.bincount(m_img["pos"].long()), torch.full((S_IMG,), n_units * STEPS))
    assert sorted(set(m_img["t"].tolist())) == [0.25, 0.5, 0.75, 1.0]
    assert torch.equal(m_img["t"][m_img["step"] == 0], torch.ones(n_units * S_IMG))
    summary = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert summary["complete"] and summary["units_done"] == n_units


def test_padding_tagged_by_default_and_keep_and_subsample(tiny: Any, tmp_path: Path) -> None:
    n_units = len(PROMPTS) * 2
    assert HarvestConfig(sites=SITES).text_padding == "tag"  # FLUX attends to padding: keep it
    harvest(tiny.pipe, PROMPTS, tmp_path / "m", _cfg(tiny), progress=False)
    reader = HarvestReader(tmp_path / "m")
    assert reader.config["text_padding"] == "tag" and reader.tags_padding
    assert reader.n_rows("txt", valid_only=False) == n_units * STEPS * 16
    real = 2 * STEPS * sum(len(p.split()) + 1 for p in PROMPTS)
    assert reader.n_rows("txt") == real
    assert reader.site_rows(Site(0, "txt"))[0].shape[0] == real  # reader drops tagged rows
    # every position once per (unit, step); valid exactly where the prompt has a token
    _, _, meta = reader.site_rows(Site(0, "txt"), valid_only=False)
    n_real = torch.tensor([len(p.split()) + 1 for p in PROMPTS])  # words + </s>
    assert torch.equal(meta["valid"], meta["pos"] < n_real[meta["prompt"].long()])
    assert torch.equal(torch.bincount(meta["pos"].long()), torch.full((16,), n_units * STEPS))
    # the old name "mask" is the same harvest, and resumes a "tag" one
    cfg = _cfg(tiny, text_padding="mask")
    assert cfg.text_padding == "tag"
    harvest(tiny.pipe, PROMPTS, tmp_path / "m", cfg, resume=True, progress=False)
    harvest(tiny.pipe, PROMPTS, tmp_path / "old", cfg, progress=False)
    a, b = _all_tensors(tmp_path / "m"), _all_tensors(tmp_path / "old")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    harvest(tiny.pipe, PROMPTS, tmp_path / "k", _cfg(tiny, text_padding="keep"), progress=False)
    assert HarvestReader(tmp_path / "k").n_rows("txt") == n_units * STEPS * 16
    cfg = _cfg(tiny, subsample=16, text_subsample=1, sites=[Site(0, "img"), Site(0, "txt")])
    harvest(tiny.pipe, PROMPTS, tmp_path / "s1", cfg, progress=False)
    harvest(tiny.pipe, PROMPTS, tmp_path / "s2", cfg, progress=False)
    a, b = _all_tensors(tmp_path / "s1"), _all_tensors(tmp_path / "s2")
    assert a["img.t"].shape[0] == n_units * STEPS * (S_IMG // 16)
    assert a["txt.t"].shape[0] == n_units * STEPS * 16  # text_subsample=1: every position
    assert all(torch.equal(a[k], b[k]) for k in a)
    # different (unit, step) pairs pick different positions
    assert len({tuple(a["img.pos"][i : i + 4].tolist()) for i in range(0, 64, 4)}) > 1


class _Interrupting:
    """A pipeline proxy that raises KeyboardInterrupt on its ``fail_at``-th call."""

    def __init__(self, pipe: Any, fail_at: int):
        self._pipe, self._fail_at, self._calls = pipe, fail_at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._calls += 1
        if self._calls == self._fail_at:
            raise KeyboardInterrupt
        return self._pipe(*args, **kwargs)


# (units per call, shard_rows, failing call, units committed before the failure):
# one chunk per shard, or four chunks per shard (the three finished chunks in the buffer are
# committed as a partial shard by the interrupt; the resumed run merges it into the full shard).
@pytest.mark.parametrize(
    ("batch", "shard_rows", "fail_at", "committed"), [(3, 1, 3, 6), (2, 1000, 4, 6)]
)
def test_resume_after_interruption_gives_identical_rows(
    tiny: Any, tmp_path: Path, batch: int, shard_rows: int, fail_at: int, committed: int
) -> None:
    cfg = _cfg(tiny, shard_rows=shard_rows, batch_size=batch)
    harvest(tiny.pipe, PROMPTS, tmp_path / "full", cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        harvest(_Interrupting(tiny.pipe, fail_at), PROMPTS, tmp_path / "cut", cfg, progress=False)
    partial = read_all_shards(tmp_path / "cut")
    assert len({u for s in partial for u in s.units}) == committed
    (tmp_path / "cut" / "shards" / ".c000009-000009.safetensors.tmp-1-x").write_bytes(b"junk")
    with pytest.raises(HarvestFormatError, match="resume"):
        harvest(tiny.pipe, PROMPTS, tmp_path / "cut", cfg, progress=False)
    res = harvest(tiny.pipe, PROMPTS, tmp_path / "cut", cfg, resume=True, progress=False)
    assert res.complete
    assert not list((tmp_path / "cut" / "shards").glob(".*"))  # interrupted write cleaned up
    full, cut = _all_tensors(tmp_path / "full"), _all_tensors(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    units = [u for s in read_all_shards(tmp_path / "cut") for u in s.units]
    assert len(units) == len(set(units)) == len(PROMPTS) * 2
    names = [
        s.file for s in read_all_shards(tmp_path / "cut")
    ]  # the same files as without the interrupt
    assert names == [s.file for s in read_all_shards(tmp_path / "full")]
    assert sorted(p.name for p in (tmp_path / "cut" / "shards").iterdir()) == sorted(
        n.split("/")[1] for n in names
    )


def test_resume_refuses_a_different_config(tiny: Any, tmp_path: Path) -> None:
    harvest(tiny.pipe, PROMPTS[:2], tmp_path / "h", _cfg(tiny), progress=False)
    with pytest.raises(HarvestFormatError, match="prompts"):
        harvest(tiny.pipe, PROMPTS, tmp_path / "h", _cfg(tiny), resume=True, progress=False)
    with pytest.raises(HarvestFormatError, match="subsample"):
        harvest(
            tiny.pipe,
            PROMPTS[:2],
            tmp_path / "h",
            _cfg(tiny, subsample=2),
            resume=True,
            progress=False,
        )


def test_config_validation_and_site_parsing(tiny: Any) -> None:
    with pytest.raises(ValueError, match="true CFG"):
        _cfg(tiny, call_kwargs={"true_cfg_scale": 4.0, "negative_prompt": "x"})
    with pytest.raises(ValueError, match="text_padding"):
        _cfg(tiny, text_padding="zero")
    assert parse_sites(["all"], tiny.pipe.transformer) == [
        Site(0, "img"),
        Site(0, "txt"),
        Site(1, "img"),
        Site(1, "txt"),
    ]
    assert parse_sites(["img_1", "txt_0", "all:txt"], tiny.pipe.transformer) == [
        Site(0, "txt"),
        Site(1, "img"),
        Site(1, "txt"),
    ]
    assert parse_sites(["all:img,txt", "img_0"], tiny.pipe.transformer) == parse_sites(
        ["all"], tiny.pipe.transformer
    )
    with pytest.raises(SiteError, match=r"'1:img': write it as img_1 \(STREAM_LAYER\)"):
        parse_sites(["1:img"], tiny.pipe.transformer)
    for bad in ["img3", "img_-1", "vid_0", "single_0", "all:vid"]:
        with pytest.raises(SiteError):
            parse_sites([bad], tiny.pipe.transformer)
    with pytest.raises(ValueError, match="'all' needs a pipeline"):
        parse_sites(["all"])
