"""`with flux.trace(prompt):` on a real diffusers FluxPipeline (tiny, random, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difract_ext import SCHNELL_TIMESTEPS, SiteError, TimestepTranscoder, TimestepTranscoderConfig
from difract_ext.adapters.tracing import FluxModel
from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline

KW = dict(height=32, width=32, max_sequence_length=16, output_type="latent")
PROMPTS = ["a red circle on the left", "a blue square at the top"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def width(pipe) -> int:
    return pipe.transformer.inner_dim


def make_tc(width: int, layer: int, stream: str, seed: int) -> TimestepTranscoder:
    torch.manual_seed(seed)
    tc = TimestepTranscoder(
        TimestepTranscoderConfig(d_in=width, d_sae=4 * width, d_out=width, d_t_embed=16)
    )
    with torch.no_grad():
        tc.mod_linear.weight.normal_(0, 0.2)
        tc.b_enc.normal_(0, 0.1)
    return tc


def plain(pipe, prompts, seed: int = 0, **extra):
    n = len(prompts) if isinstance(prompts, list) else 1
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(
        prompts, num_inference_steps=4, generator=gens if n > 1 else gens[0], **KW, **extra
    ).images


def count_calls(module: torch.nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, module.register_forward_pre_hook(lambda *a: calls.append(1))


# ---- bit identity ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_transcoders", [False, True])
def test_one_prompt_bit_identical_to_diffusers(pipe, width, with_transcoders: bool) -> None:
    flux = FluxModel(pipe)
    if with_transcoders:
        flux.attach_transcoders(
            {(0, "img"): make_tc(width, 0, "img", 1), (1, "txt"): make_tc(width, 1, "txt", 2)}
        )
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        for _ in tracer.steps():
            if with_transcoders:
                flux.transcoders[0].ff.features.output.save()
        out = tracer.result.save()
    assert torch.equal(out.images, plain(pipe, PROMPTS[0]))


def test_two_invokes_bit_identical_and_rows_apart(pipe, width) -> None:
    flux = FluxModel(pipe, transcoders={(1, "img"): make_tc(width, 1, "img", 3)})
    with flux.trace(seed=0, **KW) as tracer:
        with tracer.invoke(PROMPTS[0]):
            a = list().save()
            for _ in tracer.steps():
                a.append(flux.transformer.transformer_blocks[1].ff.output.clone())
        with tracer.invoke(PROMPTS[1]):
            b = list().save()
            for _ in tracer.steps():
                b.append(flux.transformer.transformer_blocks[1].ff.output.clone())
        with tracer.invoke():
            out = tracer.result.save()
    assert torch.equal(out.images, plain(pipe, PROMPTS))
    # each invoke saw its own row, equal to that row of a hooked plain batched run
    seen: list[torch.Tensor] = []
    h = pipe.transformer.transformer_blocks[1].ff.register_forward_hook(
        lambda m, i, o: seen.append(o.clone())
    )
    plain(pipe, PROMPTS)
    h.remove()
    assert len(a) == len(b) == 4
    for step in range(4):
        assert a[step].shape[0] == 1 and torch.equal(a[step][0], seen[step][0])
        assert torch.equal(b[step][0], seen[step][1])


def test_prompt_list_in_one_trace(pipe) -> None:
    flux = FluxModel(pipe)
    with flux.trace(PROMPTS, seed=5, **KW) as tracer:
        out = tracer.result.save()
    assert torch.equal(out.images, plain(pipe, PROMPTS, seed=5))


# ---- edits ------------------------------------------------------------------------------------


def hand_edit(
    pipe, tc: TimestepTranscoder, layer: int, step: int, feature: int, prompts, value: float = 0.0
):
    """The same edit written as a plain PyTorch hook: y + (z' − z) · W_dec at one step."""
    state = {"t": None, "calls": 0}

    def pre(mod, args, kwargs):
        state["t"] = kwargs["timestep"]
        state["calls"] += 1

    def hook(mod, args, y):
        if state["calls"] - 1 != step:
            return y
        z = tc.encode(args[0], t=state["t"])
        z2 = z.clone()
        z2[..., feature] = value
        return y + (z2 - z) @ tc.W_dec

    h1 = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = pipe.transformer.transformer_blocks[layer].ff.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return plain(pipe, prompts)
    finally:
        h1.remove()
        h2.remove()


def test_feature_edit_at_one_step_equals_hand_hook(pipe, width) -> None:
    tc = make_tc(width, 1, "img", 4)
    flux = FluxModel(pipe, transcoders={(1, "img"): tc})
    # pick a feature that is active at step 2
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        for _ in tracer.steps(2):
            f = flux.transcoders[1].ff.features.output.save()
    feature = int(f[0].sum(0).argmax())
    assert float(f[0, :, feature].abs().sum()) > 0
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        for _ in tracer.steps(2):
            flux.transcoders[1].ff.features.output[..., feature] = 0
        edited = tracer.result.save()
    base = plain(pipe, PROMPTS[0])
    assert not torch.equal(edited.images, base)
    assert torch.equal(edited.images, hand_edit(pipe, tc, 1, 2, feature, PROMPTS[0]))


def test_edit_in_one_invoke_leaves_other_row(pipe, width) -> None:
    flux = FluxModel(pipe, transcoders={(0, "img"): make_tc(width, 0, "img", 5)})
    with flux.trace(seed=0, **KW) as tracer:
        with tracer.invoke(PROMPTS[0]):
            for _ in tracer.steps():
                flux.transcoders[0].ff.features.output[:] = 0
        with tracer.invoke(PROMPTS[1]):
            pass
        with tracer.invoke():
            out = tracer.result.save()
    base = plain(pipe, PROMPTS)
    assert not torch.equal(out.images[0], base[0])
    torch.testing.assert_close(out.images[1], base[1], rtol=0, atol=0)


def test_mlp_output_edit_and_read_back(pipe) -> None:
    flux = FluxModel(pipe)
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        for _ in tracer.steps(1):
            blocks = flux.transformer.transformer_blocks
            blocks[0].ff_context.output[:] = 0
            after = blocks[0].ff_context.output.save()
        out = tracer.result.save()
    assert float(after.abs().max()) == 0.0
    assert not torch.equal(out.images, plain(pipe, PROMPTS[0]))


def test_replace_mode(pipe, width) -> None:
    tc = make_tc(width, 0, "txt", 6)
    base = plain(pipe, PROMPTS[0])
    flux = FluxModel(pipe)
    flux.attach_transcoders({(0, "txt"): tc}, mode="replace", keep_error=True)
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        out = tracer.result.save()
    torch.testing.assert_close(out.images, base, rtol=1e-4, atol=1e-4)  # error term restores y
    flux.attach_transcoders({(0, "txt"): tc}, mode="replace")
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        out2 = tracer.result.save()
    assert (out2.images - base).abs().max() > 1e-3  # pure reconstruction changes the image

    def hook(mod, args, y, box=None):  # hand version of pure replacement
        box = {} if box is None else box
        return tc(args[0], t=box["t"])

    box: dict = {}
    h1 = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: box.__setitem__("t", k["timestep"]), with_kwargs=True
    )
    h2 = pipe.transformer.transformer_blocks[0].ff_context.register_forward_hook(
        lambda m, a, y: tc(a[0], t=box["t"])
    )
    try:
        with torch.no_grad():
            by_hand = plain(pipe, PROMPTS[0])
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(out2.images, by_hand)


# ---- timesteps and steps ------------------------------------------------------------------------


def test_timesteps_fp32_and_bf16_schnell(pipe) -> None:
    flux = FluxModel(pipe)
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        ts = list().save()
        for _ in tracer.steps():
            ts.append(float(flux.timestep[0]))
    assert ts == [1.0, 0.75, 0.5, 0.25]
    bf = build_tiny_flux_pipeline(seed=0)
    bf.to(torch.bfloat16)
    flux_bf = FluxModel(bf)
    with flux_bf.trace(PROMPTS[0], seed=0, **KW) as tracer:
        ts_bf = list().save()
        for _ in tracer.steps():
            ts_bf.append(float(flux_bf.timestep[0]))
    assert tuple(ts_bf) == SCHNELL_TIMESTEPS  # bf16 latents: 750 -> 752, /1000 in bf16


def test_default_steps_never_silently_one(pipe) -> None:
    calls, h = count_calls(pipe.transformer)
    try:
        with FluxModel(pipe).trace(PROMPTS[0], seed=0, **KW):
            pass
        assert len(calls) == 4  # schnell-style: 4
        dev = build_tiny_flux_pipeline(TinyFluxConfig(guidance_embeds=True), seed=0)
        calls_dev, h2 = count_calls(dev.transformer)
        with FluxModel(dev).trace(PROMPTS[0], seed=0, **KW):
            pass
        h2.remove()
        assert len(calls_dev) == 28  # dev-style: 28
        calls.clear()
        with FluxModel(pipe, default_steps=2).trace(PROMPTS[0], seed=0, **KW):
            pass
        assert len(calls) == 2
    finally:
        h.remove()


def test_true_cfg_two_passes_per_step(pipe) -> None:
    flux = FluxModel(pipe)
    with flux.trace(
        PROMPTS[0], seed=0, negative_prompt="a dog", true_cfg_scale=2.0, **KW
    ) as tracer:
        ts = list().save()
        for _ in tracer.steps():
            ts.append(float(flux.timestep[0]))
        out = tracer.result.save()
    assert ts == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    assert out.images.shape[0] == 1


def test_steps_out_of_range(pipe) -> None:
    flux = FluxModel(pipe)
    with pytest.raises(
        ValueError, match=r"step\(s\) \[7\] out of range: this trace runs 4 denoising steps"
    ):
        with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
            for _ in tracer.steps(7):
                flux.timestep.save()
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        flux.trace(PROMPTS[0], num_inference_steps=0)


# ---- misuse ---------------------------------------------------------------------------------


def test_attach_errors(pipe, width) -> None:
    flux = FluxModel(pipe)
    tc = make_tc(width, 0, "img", 7)
    with pytest.raises(
        SiteError, match="layer 5 does not exist: the model has 2 double-stream blocks"
    ):
        flux.attach_transcoders({(5, "img"): tc})
    with pytest.raises(SiteError, match="unknown stream 'vid'"):
        flux.attach_transcoders({(0, "vid"): tc})
    with pytest.raises(SiteError, match="single-stream blocks are not supported"):
        flux.attach_transcoders({(0, "single"): tc})
    narrow = TimestepTranscoder(TimestepTranscoderConfig(d_in=8, d_sae=16, d_out=8, d_t_embed=16))
    with pytest.raises(SiteError, match=f"d_in=8, d_out=8 but this model's MLPs are {width} wide"):
        flux.attach_transcoders({(0, "img"): narrow})
    assert flux.attached_sites == []


def test_detach_restores_plain_run(pipe, width) -> None:
    flux = FluxModel(pipe, transcoders={(0, "img"): make_tc(width, 0, "img", 8)})
    flux.detach_transcoders()
    with flux.trace(PROMPTS[0], seed=0, **KW) as tracer:
        out = tracer.result.save()
    assert torch.equal(out.images, plain(pipe, PROMPTS[0]))
    assert not hasattr(flux._module, "transcoders")


# ---- loading --------------------------------------------------------------------------------


def test_local_folder_lazy_and_eager(pipe, width, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "tinyflux")
    lazy = FluxModel(str(tmp_path / "tinyflux"))
    assert not lazy.dispatched
    tc = make_tc(width, 1, "img", 9)
    lazy.attach_transcoders({(1, "img"): tc})  # before dispatch: must survive it
    with lazy.trace(PROMPTS[0], seed=0, **KW) as tracer:
        for _ in tracer.steps(0):
            f = lazy.transcoders[1].ff.features.output.save()
        out = tracer.result.save()
    assert lazy.dispatched and f.shape == (1, 64, 4 * width)
    # baseline: plain diffusers on the same folder (reloaded weights may round differently
    # from the in-memory ones, so the in-memory pipeline is not the reference here)
    from diffusers import FluxPipeline

    same = FluxPipeline.from_pretrained(tmp_path / "tinyflux")
    same.set_progress_bar_config(disable=True)
    assert torch.equal(out.images, plain(same, PROMPTS[0]))
    eager = FluxModel(str(tmp_path / "tinyflux"), dispatch=True)
    with eager.trace(PROMPTS[0], seed=0, **KW) as tracer:
        out2 = tracer.result.save()
    assert torch.equal(out2.images, out.images)
    assert "transcoders" not in str(eager.pipeline.transformer.state_dict().keys())


def test_not_a_pipeline() -> None:
    with pytest.raises(TypeError, match="wraps a diffusers pipeline"):
        FluxModel(torch.nn.Linear(2, 2))


def test_remote_refused_clearly(pipe) -> None:
    with pytest.raises(NotImplementedError, match="runs locally only"):
        FluxModel(pipe).trace(PROMPTS[0], remote=True)
