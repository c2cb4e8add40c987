"""DifFRACT checkpoints: the golden forward, memory-mapping, conversion and every error path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from difract_reference import make_standin_state_dict, reference_from_file, write_standin

import difract_ext
from difract_ext import (
    SCHNELL_TIMESTEPS,
    CheckpointError,
    TimestepSAE,
    TimestepTranscoder,
    load_difract_checkpoint,
    load_difract_dir,
)
from difract_ext.flux.sites import Site


@pytest.fixture()
def standin(tmp_path: Path) -> Path:
    return write_standin(tmp_path / "transcoder_img_3.pt")


def test_schnell_timesteps_are_what_the_pipeline_passes() -> None:
    # Independent derivation: FluxPipeline sets sigmas = linspace(1, 1/N, N), casts the scheduler
    # timesteps (sigma * 1000) to the bf16 latent dtype, then divides by 1000 in that dtype.
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    ts = sched.timesteps.to(torch.bfloat16)
    values = tuple(float(v) for v in ts / 1000)
    assert values == SCHNELL_TIMESTEPS == (1.0, 0.75390625, 0.5, 0.25)


@pytest.mark.parametrize("t", SCHNELL_TIMESTEPS)
def test_golden_forward_matches_reference_exactly(standin: Path, t: float) -> None:
    """Zero tolerance in fp32: both sides compute FiLM on one row per t, then the same kernels."""
    ref = reference_from_file(standin)
    tc = load_difract_checkpoint(standin)
    assert isinstance(tc, TimestepTranscoder)
    x = torch.randn(37, 24)
    with torch.no_grad():
        y_ref, z_ref = ref.forward_one_t(x, t)
        y, z = tc.forward_with_activations(x, t=t)
    assert torch.equal(z, z_ref)
    assert torch.equal(y, y_ref)
    assert (z > 0).any() and (z == 0).any()  # ReLU actually sparsifies here


def test_golden_per_row_timesteps_within_stated_tolerance(standin: Path) -> None:
    """DifFRACT runs the time MLP on every row; MKL may round an N-row GEMM differently from a
    1-row one (we compute FiLM once per distinct t), so here the tolerance is 1e-5 relative."""
    ref = reference_from_file(standin)
    tc = load_difract_checkpoint(standin)
    t = torch.tensor(SCHNELL_TIMESTEPS).repeat_interleave(9)
    x = torch.randn(t.numel(), 24)
    with torch.no_grad():
        y_ref = ref.forward_per_row(x, t)
        y = tc(x, t=t)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))


def test_film_actually_depends_on_t(standin: Path) -> None:
    tc = load_difract_checkpoint(standin)
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert not torch.allclose(tc(x, t=1.0), tc(x, t=0.25))


def test_sae_role_from_file_name(tmp_path: Path) -> None:
    sae = load_difract_checkpoint(write_standin(tmp_path / "sae_txt_12.pt"))
    assert isinstance(sae, TimestepSAE)
    assert sae.cfg.metadata.stream == "txt" and sae.cfg.metadata.layer == 12
    assert sae.cfg.metadata.hook_name == "transformer_blocks.12.ff_context.output"
    ref = reference_from_file(tmp_path / "sae_txt_12.pt")
    y = torch.randn(11, 24)
    with torch.no_grad():
        assert torch.equal(sae(y, t=0.5), ref.forward_one_t(y, 0.5)[0])


def test_metadata_and_convention(standin: Path) -> None:
    tc = load_difract_checkpoint(standin)
    md = tc.cfg.metadata
    assert (md.stream, md.layer, md.source) == ("img", 3, "DifFRACT")
    assert md.hook_name == "transformer_blocks.3.ff.input"
    assert md.hook_name_out == "transformer_blocks.3.ff.output"
    assert md.model_name == "black-forest-labs/FLUX.1-schnell"
    assert tc.cfg.trained_timesteps == list(SCHNELL_TIMESTEPS)
    assert (
        tc.cfg.d_t_embed,
        tc.cfg.t_embed_flip_sin_to_cos,
        tc.cfg.t_embed_downscale_freq_shift,
    ) == (16, False, 1.0)


def _file_mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    target = os.path.realpath(path)
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see mappings"
)
def test_loading_memory_maps_instead_of_copying(standin: Path) -> None:
    tc = load_difract_checkpoint(standin)
    ranges = _file_mapped_ranges(standin)
    assert ranges, "checkpoint file is not memory-mapped"
    for p in (tc.W_enc, tc.W_dec, tc.b_enc, tc.mod_linear.weight):
        ptr = p.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), "parameter was copied out of the map"
    copied = load_difract_checkpoint(standin, mmap=False)
    assert not any(lo <= copied.W_enc.data_ptr() < hi for lo, hi in _file_mapped_ranges(standin))


def test_dtype_override(standin: Path) -> None:
    tc = load_difract_checkpoint(standin, dtype="bfloat16")
    assert tc.W_enc.dtype == torch.bfloat16 and tc.cfg.dtype == "bfloat16"


# ---- error paths --------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):  # pickled code: would run os.system on an unsafe load
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "transcoder_img_0.pt"
    sd = make_standin_state_dict(8, 16, 8)
    sd["evil"] = _Payload()  # type: ignore[assignment]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"transcoder_img_0\.pt: refused to load: .*pickled"):
        load_difract_checkpoint(path)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda sd: sd.pop("mod_linear.bias"), r"missing key 'mod_linear\.bias'"),
        (lambda sd: sd.pop("decoder.bias"), r"missing key 'decoder\.bias'"),
        (
            lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)),
            r"unexpected key 'extra\.weight'",
        ),
        (
            lambda sd: sd.__setitem__("encoder.weight", torch.zeros(16, 9)),
            r"key 'encoder\.weight' has shape \[16, 9\], expected \[16, 8\]",
        ),
        (
            lambda sd: sd.__setitem__("decoder.weight", sd["decoder.weight"] * 1.5),
            r"key 'decoder\.weight' has non-unit columns",
        ),
        (
            lambda sd: sd.__setitem__("time_mlp.0.weight", torch.zeros(8, 8, dtype=torch.int64)),
            r"key 'time_mlp\.0\.weight' has dtype torch\.int64",
        ),
    ],
)
def test_malformed_checkpoints_name_file_and_key(tmp_path: Path, mutate, pattern: str) -> None:
    path = tmp_path / "transcoder_txt_5.pt"
    sd = make_standin_state_dict(8, 16, 8)
    mutate(sd)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"transcoder_txt_5\.pt: " + pattern):
        load_difract_checkpoint(path)


def test_non_unit_decoder_can_be_loaded_deliberately(tmp_path: Path) -> None:
    sd = make_standin_state_dict(8, 16, 8)
    sd["decoder.weight"] = sd["decoder.weight"] * 2
    torch.save(sd, tmp_path / "transcoder_img_1.pt")
    tc = load_difract_checkpoint(tmp_path / "transcoder_img_1.pt", decoder_norm_atol=None)
    torch.testing.assert_close(tc.decoder_norms(), torch.full((16,), 2.0))


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "transcoder_img_0.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_difract_checkpoint(tmp_path / "transcoder_img_0.pt")
    torch.save({"state_dict": make_standin_state_dict(8, 16, 8)}, tmp_path / "transcoder_img_1.pt")
    with pytest.raises(CheckpointError, match="nested checkpoint"):
        load_difract_checkpoint(tmp_path / "transcoder_img_1.pt")


def test_unknown_stream_and_role_in_name(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"transcoder_vid_3\.pt: unknown stream 'vid'"):
        load_difract_checkpoint(write_standin(tmp_path / "transcoder_vid_3.pt"))
    with pytest.raises(CheckpointError, match=r"crosscoder_img_3\.pt: unknown role 'crosscoder'"):
        load_difract_checkpoint(write_standin(tmp_path / "crosscoder_img_3.pt"))
    with pytest.raises(CheckpointError, match="cannot read role/stream/layer"):
        load_difract_checkpoint(write_standin(tmp_path / "weights.pt"))
    tc = load_difract_checkpoint(tmp_path / "weights.pt", role="transcoder", stream="txt", layer=2)
    assert tc.cfg.metadata.hook_name == "transformer_blocks.2.ff_context.input"
    with pytest.raises(CheckpointError, match="unknown stream 'image'"):
        load_difract_checkpoint(tmp_path / "weights.pt", role="transcoder", stream="image", layer=2)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_difract_checkpoint(tmp_path / "transcoder_img_0.pt")
    (tmp_path / "transcoder_img_1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_difract_checkpoint(tmp_path / "transcoder_img_1.pt")


# ---- folders and conversion -------------------------------------------------------------------


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    folder = tmp_path / "temporal-aware-transcoders"
    for i, (stream, layer) in enumerate(
        [("img", 0), ("txt", 0), ("img", 1), ("txt", 1), ("img", 18)]
    ):
        write_standin(
            folder / f"transcoder_{stream}_{layer}.pt", d_model=12, d_feat=40, d_t=8, seed=i
        )
    write_standin(folder / "sae_img_6.pt", d_model=12, d_feat=40, d_t=8, seed=9)
    (folder / "README.md").write_text("not a checkpoint")
    return folder


def test_load_dir(release: Path) -> None:
    all_tc = load_difract_dir(release)
    assert sorted(all_tc) == [
        Site(0, "img"),
        Site(0, "txt"),
        Site(1, "img"),
        Site(1, "txt"),
        Site(18, "img"),
    ]
    some = load_difract_dir(release, layers=[1], streams=("txt",))
    assert list(some) == [Site(1, "txt")] and some[Site(1, "txt")].cfg.metadata.layer == 1
    saes = load_difract_dir(release, prefix="sae")
    assert list(saes) == [Site(6, "img")] and isinstance(saes[Site(6, "img")], TimestepSAE)


def test_load_dir_missing_layer(release: Path) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"missing layer 5 for stream 'img'.*layers present for 'img': \[0, 1, 18\]",
    ):
        load_difract_dir(release, layers=[0, 5])
    got = load_difract_dir(release, layers=[0, 5], skip_missing=True)
    assert sorted(got) == [Site(0, "img"), Site(0, "txt")]
    with pytest.raises(ValueError, match="unknown stream 'audio'"):
        load_difract_dir(release, streams=("audio",))


def _convert_and_check(release: Path, out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    files = {e["source_file"]: e for e in manifest["files"]}
    assert set(files) == {p.name for p in release.glob("*.pt")}
    for name, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((release / name).read_bytes()).hexdigest()
    code = f"""
import sys, torch, difract_ext
from sae_lens import SAE
from difract_ext import load_difract_checkpoint
x = torch.randn(7, 12)
for rel, src in [("transcoders/img_1", "transcoder_img_1.pt"), ("saes/img_6", "sae_img_6.pt")]:
    a = SAE.load_from_disk(r"{out}/" + rel)
    b = load_difract_checkpoint(r"{release}/" + src)
    assert type(a) is type(b), (type(a), type(b))
    with torch.no_grad():
        for t in (1.0, 0.75390625, 0.5, 0.25):
            assert torch.equal(a(x, t=t), b(x, t=t)), rel
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_convert_dir_python_api(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    difract_ext.convert_difract_dir(release, out)
    _convert_and_check(release, out)


def test_convert_cli(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    res = subprocess.run(
        [sys.executable, "-m", "difract_ext.cli", "convert", str(release), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "manifest" in res.stdout
    _convert_and_check(release, out)
    bad = subprocess.run(
        [sys.executable, "-m", "difract_ext.cli", "convert", str(tmp_path / "nope"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "not a directory" in bad.stderr
