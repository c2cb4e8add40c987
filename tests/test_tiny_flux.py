"""Tiny random FLUX pipeline builder and the offline word-level tokenizers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from difract_ext.flux.tiny import DEFAULT_WORDS, TinyFluxConfig, build_tiny_flux_pipeline  # noqa: E402
from difract_ext.flux.tokenizers import build_clip_tokenizer, build_t5_tokenizer  # noqa: E402

WORDS = [
    "a",
    "red",
    "green",
    "orange",
    "circle",
    "on",
    "the",
    "left",
    "and",
    "at",
    "top",
    "triangle",
    "right",
]
CALL = dict(height=32, width=32, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(TinyFluxConfig(), seed=0)


def test_clip_tokenizer_single_tokens_and_deterministic(tmp_path):
    tok = build_clip_tokenizer(WORDS, tmp_path / "a", max_length=16)
    for w in WORDS:
        assert tok.tokenize(w) == [w + "</w>"]
    ids = tok("A red circle on the left", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[7] == tok.eos_token_id
    assert all(i == tok.pad_token_id for i in ids[7:])
    build_clip_tokenizer(list(reversed(WORDS)), tmp_path / "b", max_length=16)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_clip_merges_resolve_conflicting_prefixes(tmp_path):
    # "an" (from "and") would be merged before "or" inside "orange" with naive prefix merges.
    words = ["and", "orange", "on", "or", "ran", "range", "a", "n"]
    tok = build_clip_tokenizer(words, tmp_path, max_length=8)
    assert [len(tok.tokenize(w)) for w in words] == [1] * len(words)


def test_t5_tokenizer(tmp_path):
    tok = build_t5_tokenizer(WORDS, tmp_path, max_length=16)
    enc = tok("a red circle on the left", padding="max_length", max_length=16)
    ids = enc.input_ids
    assert ids[6] == tok.eos_token_id == 1 and ids[7:] == [0] * 9
    assert len(set(ids[:6])) == 6
    assert len(tok) == 3 + len(WORDS)
    assert tok.convert_ids_to_tokens(ids[:6]) == "a red circle on the left".split()
    assert tok("purple")["input_ids"][0] == tok.unk_token_id
    with pytest.raises(ValueError):
        build_t5_tokenizer(["ok", "not ok"], tmp_path / "x")


def test_build_is_fast_and_seeded():
    t0 = time.perf_counter()
    p1 = build_tiny_flux_pipeline(seed=1)
    assert time.perf_counter() - t0 < 2.0
    p2 = build_tiny_flux_pipeline(seed=1)
    p3 = build_tiny_flux_pipeline(seed=2)
    w1, w2, w3 = (p.transformer.x_embedder.weight for p in (p1, p2, p3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)


def test_pipeline_runs_and_timesteps_are_schnell(pipe):
    seen: list[float] = []
    h = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(k["timestep"][0])), with_kwargs=True
    )
    try:
        out = pipe(
            "a red circle on the left",
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **CALL,
        )
    finally:
        h.remove()
    assert out.images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all()
    assert seen == [1.0, 0.75, 0.5, 0.25]


def test_t5_local_attention_gives_word_order():
    cfg = TinyFluxConfig(t5_heads=2, t5_local_offsets=(-1, 1))
    p = build_tiny_flux_pipeline(cfg)
    e1, _, _ = p.encode_prompt(
        "a red circle and a blue square", prompt_2=None, max_sequence_length=16
    )
    e2, _, _ = p.encode_prompt(
        "a blue circle and a red square", prompt_2=None, max_sequence_length=16
    )
    # Same bag of words, different order: the "circle" states (position 2) must differ.
    assert (e1[0, 2] - e2[0, 2]).abs().max() > 1e-2


def test_save_and_reload_offline(pipe, tmp_path):
    from diffusers import FluxPipeline

    pipe.save_pretrained(tmp_path)
    again = FluxPipeline.from_pretrained(tmp_path, local_files_only=True)
    again.set_progress_bar_config(disable=True)
    kw = dict(generator=torch.Generator().manual_seed(3), output_type="np", **CALL)
    a = pipe("a green triangle at the top", **kw).images
    kw["generator"] = torch.Generator().manual_seed(3)
    b = again("a green triangle at the top", **kw).images
    assert np.abs(a - b).max() < 1e-4
    assert again.tokenizer_2("left")["input_ids"] == pipe.tokenizer_2("left")["input_ids"]
    assert again.tokenizer.tokenize("orange") == ["orange</w>"]


def test_config_roundtrip_and_validation():
    cfg = TinyFluxConfig(t5_local_offsets=(-1, 1))
    assert TinyFluxConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        build_tiny_flux_pipeline(TinyFluxConfig(axes_dims_rope=(4, 4, 4)))
    assert "orange" in DEFAULT_WORDS
