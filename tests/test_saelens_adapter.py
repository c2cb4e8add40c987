"""Our dictionaries are SAELens objects: registry, save/load round trips, SAELens callers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, StandardSAE, Transcoder
from sae_lens.registry import SAE_CLASS_REGISTRY

import difract_ext
from difract_ext import TimestepSAE, TimestepSAEConfig, TimestepTranscoder, TimestepTranscoderConfig
from difract_ext.adapters import dictionaries
from difract_ext.flux.sites import Site, dictionary_metadata

ACTS = [("relu", None), ("topk", 6), ("jumprelu", None)]


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        module.mod_linear.weight.normal_(0, 0.3)
        module.b_enc.normal_(0, 0.5)
        module.b_dec.normal_()
        if getattr(module, "threshold", None) is not None:
            module.threshold.uniform_(0, 0.3)


def build(role: str, activation: str, k: int | None):
    meta = dictionary_metadata(Site(2, "img"), role, model_name="tiny-flux")
    common = dict(d_in=12, d_sae=40, d_t_embed=16, activation=activation, k=k, metadata=meta)
    if role == "transcoder":
        m = TimestepTranscoder(TimestepTranscoderConfig(d_out=12, **common))
    else:
        m = TimestepSAE(TimestepSAEConfig(**common))
    _randomize(m)
    return m


def test_registered_under_namespaced_keys() -> None:
    assert SAE_CLASS_REGISTRY["difract_timestep_transcoder"][0] is TimestepTranscoder
    assert SAE_CLASS_REGISTRY["difract_timestep_sae"][0] is TimestepSAE
    assert issubclass(TimestepTranscoder, Transcoder) and issubclass(TimestepSAE, StandardSAE)


def test_registration_idempotent_and_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    difract_ext.register_architectures()
    difract_ext.register_architectures()
    monkeypatch.setitem(SAE_CLASS_REGISTRY, "difract_timestep_sae", (StandardSAE, object))
    with pytest.raises(
        RuntimeError, match="'difract_timestep_sae' is already registered to .*StandardSAE"
    ):
        dictionaries.register_architectures()


@pytest.mark.parametrize(("activation", "k"), ACTS)
@pytest.mark.parametrize("role", ["transcoder", "sae"])
def test_round_trip_through_saelens(
    tmp_path: Path, role: str, activation: str, k: int | None
) -> None:
    m = build(role, activation, k)
    m.save_model(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == f"difract_timestep_{role}"
    assert cfg["activation"] == activation and cfg["d_t_embed"] == 16
    assert cfg["t_embed_flip_sin_to_cos"] is False and cfg["t_embed_downscale_freq_shift"] == 1.0
    assert cfg["metadata"]["hook_name"].startswith("transformer_blocks.2.ff.")
    loaded = SAE.load_from_disk(tmp_path / "d")
    assert type(loaded) is type(m)
    x = torch.randn(3, 9, 12)
    t = torch.tensor([1.0, 0.5, 0.25])
    with torch.no_grad():
        assert torch.equal(loaded(x, t=t), m(x, t=t))
        assert torch.equal(loaded.encode(x, t=t), m.encode(x, t=t))
    assert set(loaded.state_dict()) == set(m.state_dict())
    # subclass-aware loaders: the base class finds ours, the wrong base refuses with advice
    base = Transcoder if role == "transcoder" else StandardSAE
    assert type(base.load_from_disk(tmp_path / "d")) is type(m)
    wrong = StandardSAE if role == "transcoder" else Transcoder
    with pytest.raises(ValueError, match=f"Use {type(m).__name__} instead"):
        wrong.load_from_disk(tmp_path / "d")


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    a, b = build("transcoder", "relu", None), build("transcoder", "relu", None)
    a.save_model(tmp_path / "d")
    b.save_model(tmp_path / "d")
    x = torch.randn(4, 12)
    assert torch.equal(SAE.load_from_disk(tmp_path / "d")(x, t=0.5), b(x, t=0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary leftovers


def test_from_dict_and_device_meta() -> None:
    m = build("transcoder", "topk", 6)
    clone = SAE.from_dict(m.cfg.to_dict())
    assert type(clone) is TimestepTranscoder and clone.cfg.k == 6


def test_fresh_process_load(tmp_path: Path) -> None:
    m = build("transcoder", "jumprelu", None)
    m.save_model(tmp_path / "tc")
    x = torch.randn(5, 12)
    torch.save({"x": x, "y": m(x, t=0.75390625).detach()}, tmp_path / "io.pt")
    code = f"""
import torch, difract_ext
from sae_lens import SAE
torch.set_num_threads({torch.get_num_threads()})  # MKL's kernel choice depends on the thread count
tc = SAE.load_from_disk(r"{tmp_path / "tc"}")
io = torch.load(r"{tmp_path / "io.pt"}", weights_only=True)
assert type(tc).__name__ == "TimestepTranscoder", type(tc)
assert torch.equal(tc(io["x"], t=0.75390625), io["y"])
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    # ...and without importing difract_ext, SAELens cannot know the architecture
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from sae_lens import SAE; SAE.load_from_disk(r'{tmp_path / 'tc'}')",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "difract_timestep_transcoder" in res.stderr


def test_saelens_error_term_path_is_exact() -> None:
    """SAELens' own forward (use_error_term) only passes x: a scoped t makes it work."""
    sae = build("sae", "relu", None)
    sae._use_error_term = True
    y = torch.randn(6, 12)
    with torch.no_grad(), sae.timestep(0.5):
        out = sae(y)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)


def test_saelens_hooks_fire_with_features() -> None:
    tc = build("transcoder", "relu", None)
    seen: dict[str, torch.Tensor] = {}
    tc.hook_sae_acts_post.add_hook(lambda act, hook: seen.setdefault("acts", act.clone()))
    x = torch.randn(4, 12)
    tc(x, t=0.25)
    assert torch.equal(seen["acts"], tc.encode(x, t=0.25))
    tc.reset_hooks()


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"normalize_activations": "layer_norm"}, "FiLM shift"),
        ({"activation": "topk"}, "needs k"),
        ({"activation": "softplus"}, "unknown activation"),
        ({"d_t_embed": 15}, "must be even"),
        ({"apply_b_dec_to_input": True}, "not supported for transcoders"),
    ],
)
def test_config_validation(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TimestepTranscoderConfig(d_in=8, d_sae=16, d_out=8, **kw)


def test_transcoder_has_no_inline_error_term() -> None:
    with pytest.raises(ValueError, match="no error term"):
        TimestepTranscoder(TimestepTranscoderConfig(d_in=8, d_sae=16, d_out=8), use_error_term=True)
