"""The shipped shapes-world FLUX pipeline: offline loading, schnell sampling, prompt adherence."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402

from difract_ext.toy import SHAPES_CALL_DEFAULTS, load_shapes_pipeline, shapes_pipeline_path  # noqa: E402
from difract_ext.toy.analyzer import score  # noqa: E402
from difract_ext.toy.pipeline import generate_images  # noqa: E402
from difract_ext.toy.world import split_prompts  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    torch.set_num_threads(2)
    return load_shapes_pipeline()


def test_shipped_folder_is_small_safetensors():
    root = shapes_pipeline_path()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert (root / "model_index.json").is_file()
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_components_and_schnell_timesteps(pipe):
    cfg = pipe.transformer.config
    assert (cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds) == (4, 2, False)
    assert (
        pipe.scheduler.config.use_dynamic_shifting is False and pipe.scheduler.config.shift == 1.0
    )
    seen: list[float] = []
    h = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(k["timestep"][0])), with_kwargs=True
    )
    try:
        out = pipe(
            "a red circle on the left",
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **SHAPES_CALL_DEFAULTS,
        )
    finally:
        h.remove()
    assert out.images.shape == (1, 32, 32, 3)
    assert seen == [1.0, 0.75, 0.5, 0.25]


def test_from_pretrained_matches_loader(pipe):
    plain = FluxPipeline.from_pretrained(str(shapes_pipeline_path()), local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    kw = dict(output_type="np", **SHAPES_CALL_DEFAULTS)
    a = pipe("a blue square at the top", generator=torch.Generator().manual_seed(5), **kw).images
    b = plain("a blue square at the top", generator=torch.Generator().manual_seed(5), **kw).images
    assert np.abs(a - b).max() < 1e-4


def test_every_vocabulary_word_is_one_token(pipe):
    from difract_ext.toy.pipeline import shapes_vocabulary

    for w in shapes_vocabulary():
        assert pipe.tokenizer.tokenize(w) == [w + "</w>"]
        assert pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2(w).input_ids) == [w, "</s>"]


def test_single_object_adherence_on_held_out_prompts(pipe):
    """Held-out prompts, fresh seeds: nearly every image must be exactly right (the benchmark
    measures 99 % over 220 images; its few misses share one prompt, so allow two here)."""
    _, held = split_prompts(1)
    prompts = held[:8]
    seeds = [11, 12]
    ps = [p for p in prompts for _ in seeds]
    images = generate_images(pipe, ps, [s for _ in prompts for s in seeds])
    ok = [score(img, p).fully_correct for img, p in zip(images, ps)]
    assert sum(ok) >= len(ok) - 2, [p for p, good in zip(ps, ok) if not good]


def test_two_object_prompts_bind_most_of_the_time_but_not_always(pipe):
    """Held-out two-object prompts: the shipped model is meant to make binding errors (a weak
    word-order signal in its T5); the benchmark measures ~61 % fully correct, ~6 % binding errors.
    Here 48 fixed (prompt, seed) pairs: the rate must lie in a wide band around that, and at
    least one image must show a binding error."""
    from difract_ext.toy.analyzer import accuracy_report

    _, held = split_prompts(2)
    prompts = held[::4][:48]
    images = generate_images(pipe, prompts, [21 + i for i in range(len(prompts))])
    rep = accuracy_report(list(images), prompts)
    assert 0.35 <= rep["double/fully_correct"] <= 0.9, rep
    assert rep["double/binding_error"] > 0, rep
    assert rep["double/color"] >= 0.9 and rep["double/position"] >= 0.9, rep


def test_prompt_controls_the_image(pipe):
    """Same seed, different prompts -> the analyzer sees each prompt's own object."""
    prompts = [
        "a red circle on the left",
        "a green square on the right",
        "a yellow triangle at the top",
        "a purple square at the bottom",
    ]
    images = generate_images(pipe, prompts, [7] * len(prompts))
    assert sum(score(img, p).fully_correct for img, p in zip(images, prompts)) >= 3


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_shapes_pipeline(path=tmp_path)


def test_shipped_text_encoder_has_the_configured_local_attention(pipe):
    """The shipped T5 is the random init of ``shapes_config()``: its only order signal is the
    local-attention bias ``SHAPES_T5_LOCAL_STRENGTH`` at the configured offsets."""
    from difract_ext.flux.tiny import _t5_bucket
    from difract_ext.toy.pipeline import SHAPES_T5_LOCAL_STRENGTH, shapes_config

    t5 = pipe.text_encoder_2
    bias = (
        t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    )  # [buckets, heads]
    offsets = shapes_config().t5_local_offsets
    expected = torch.zeros_like(bias)
    for h, off in enumerate(offsets):
        expected[
            _t5_bucket(
                off,
                t5.config.relative_attention_num_buckets,
                t5.config.relative_attention_max_distance,
            ),
            h,
        ] = SHAPES_T5_LOCAL_STRENGTH
    assert torch.equal(bias, expected)


def test_training_schedule_has_one_warm_restart():
    from difract_ext.toy.train import TrainConfig, _lr_at

    cfg = TrainConfig(
        steps=1000, warmup=100, lr=1e-3, restart_steps=400, restart_lr=2e-4, min_lr_ratio=0.05
    )
    assert _lr_at(cfg, 0) == pytest.approx(1e-5)
    assert _lr_at(cfg, 100) == pytest.approx(1e-3)
    assert _lr_at(cfg, 999) == pytest.approx(5e-5, rel=1e-3)
    assert _lr_at(cfg, 1000) == pytest.approx(2e-4)  # the restart
    assert _lr_at(cfg, 1200) == pytest.approx(2e-4 * (0.05 + 0.95 * 0.5))
    assert _lr_at(cfg, 1400) == pytest.approx(1e-5)
