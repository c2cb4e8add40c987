"""The conditioned-dictionary core: embedding, activations, t broadcasting, folding, decoder
norms.
"""

from __future__ import annotations

import math

import pytest
import torch
from difract_reference import reference_embedding

from difract_ext import TimestepSAE, TimestepSAEConfig, TimestepTranscoder, TimestepTranscoderConfig
from difract_ext.dictionary import (
    ActivationSpec,
    DecoderNormError,
    TimestepEmbeddingSpec,
    TimestepError,
)
from difract_ext.dictionary.activations import activate

ACTS = [("relu", None), ("topk", 5), ("jumprelu", None)]


def make_tc(
    activation: str = "relu", k: int | None = None, d_in: int = 12, d_sae: int = 48
) -> TimestepTranscoder:
    tc = TimestepTranscoder(
        TimestepTranscoderConfig(
            d_in=d_in, d_sae=d_sae, d_out=d_in, d_t_embed=16, activation=activation, k=k
        )
    )
    with torch.no_grad():  # a non-trivial FiLM and biases, so conditioning matters
        tc.mod_linear.weight.normal_(0, 0.3)
        tc.mod_linear.bias.normal_(0, 0.3)
        tc.b_enc.normal_(0, 0.5)
        tc.b_dec.normal_()
        if activation == "jumprelu":
            tc.threshold.uniform_(0.0, 0.5)
    return tc


# ---- embedding ------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1.0, 0.75390625, 0.5, 0.25, 0.0, 0.013])
def test_embedding_matches_independent_formula_exactly(t: float) -> None:
    spec = TimestepEmbeddingSpec(dim=256)
    got = spec.embed(torch.tensor([t]))
    assert torch.equal(got, reference_embedding(t, 256))


def test_embedding_convention_endpoints() -> None:
    # sin half first; f_0 = 1 and f_127 = 1e-4 (so at t = 1: sin(1), ..., cos(1e-4))
    emb = TimestepEmbeddingSpec(dim=256).embed(torch.tensor([1.0]))[0]
    assert emb[0].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert emb[127].item() == pytest.approx(math.sin(1e-4), rel=1e-5)
    assert emb[128].item() == pytest.approx(math.cos(1.0), abs=1e-7)
    flipped = TimestepEmbeddingSpec(dim=256, flip_sin_to_cos=True).embed(torch.tensor([1.0]))[0]
    assert torch.equal(flipped[:128], emb[128:])


def test_timestep_scale() -> None:
    a = TimestepEmbeddingSpec(dim=32, timestep_scale=0.001).embed(torch.tensor([500.0]))
    b = TimestepEmbeddingSpec(dim=32).embed(torch.tensor([0.5]))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kw", [{"dim": 7}, {"dim": 8, "downscale_freq_shift": 4}, {"timestep_scale": 0.0}]
)
def test_bad_embedding_specs(kw: dict) -> None:
    with pytest.raises(ValueError):
        TimestepEmbeddingSpec(**kw)


# ---- activations ----------------------------------------------------------------------------


def test_activations_against_definitions() -> None:
    pre = torch.randn(6, 40)
    assert torch.equal(activate(pre, ActivationSpec("relu")), torch.where(pre > 0, pre, 0.0))
    out = activate(pre, ActivationSpec("topk", k=3))
    for row, orow in zip(pre, out):
        keep = set(row.argsort(descending=True)[:3].tolist())
        for j in range(40):
            expected = max(row[j].item(), 0.0) if j in keep else 0.0
            assert orow[j].item() == expected
    thr = torch.rand(40)
    out = activate(pre, ActivationSpec("jumprelu"), thr)
    assert torch.equal(out, torch.where(pre > thr, pre, 0.0))


@pytest.mark.parametrize(
    "kw", [{"kind": "gelu"}, {"kind": "topk"}, {"kind": "topk", "k": 0}, {"kind": "relu", "k": 3}]
)
def test_bad_activation_specs(kw: dict) -> None:
    with pytest.raises(ValueError):
        ActivationSpec(**kw)


@pytest.mark.parametrize(("activation", "k"), ACTS)
def test_all_activations_sparsify_in_encode(activation: str, k: int | None) -> None:
    tc = make_tc(activation, k)
    z = tc.encode(torch.randn(20, 12), t=0.5)
    assert (z == 0).any() and (z > 0).any() and (z >= 0).all()
    if activation == "topk":
        assert int((z != 0).sum(-1).max()) <= 5


# ---- conditioning ----------------------------------------------------------------------------


def test_fresh_dictionary_film_is_identity() -> None:
    tc = TimestepTranscoder(TimestepTranscoderConfig(d_in=8, d_sae=32, d_out=8, d_t_embed=16))
    x = torch.randn(4, 8)
    assert torch.equal(tc.condition(x, torch.tensor(0.3)), x)
    # DifFRACT init: encoder = transpose of the unnormalised decoder => W_enc parallel to W_dec rows
    cos = torch.nn.functional.cosine_similarity(tc.W_enc.T, tc.W_dec, dim=-1)
    torch.testing.assert_close(cos, torch.ones(32))
    tc.check_unit_norm_decoder()


def test_per_row_and_per_batch_timesteps() -> None:
    tc = make_tc()
    x = torch.randn(3, 5, 12)
    t = torch.tensor([1.0, 0.5, 0.25])
    x_mod = tc.condition(x, t)
    z = tc.encode(x, t=t)
    for b in range(3):
        # FiLM is computed once per distinct t on one row: exactly batch-independent
        assert torch.equal(x_mod[b], tc.condition(x[b], torch.tensor(float(t[b]))))
        # the encoder GEMM may round differently with the number of rows (MKL): 1e-6 relative
        torch.testing.assert_close(z[b], tc.encode(x[b], t=float(t[b])), rtol=1e-6, atol=1e-6)
    tt = t[:, None].expand(3, 5)
    assert torch.equal(tc.condition(x, tt), x_mod)
    assert torch.equal(tc.encode(x, t=tt), z)


def test_timestep_shape_errors() -> None:
    tc = make_tc()
    with pytest.raises(
        TimestepError,
        match=r"timestep of shape \[4\] does not fit activations of shape \[3, 5, 12\]",
    ):
        tc.encode(torch.randn(3, 5, 12), t=torch.ones(4))
    with pytest.raises(TimestepError, match="NaN"):
        tc.encode(torch.randn(2, 12), t=float("nan"))
    with pytest.raises(TimestepError, match="needs the diffusion timestep t"):
        tc.encode(torch.randn(2, 12))


def test_scoping_set_and_bound_source() -> None:
    tc = make_tc()
    x = torch.randn(4, 12)
    ref = tc(x, t=0.25)
    with tc.timestep(0.25):
        assert torch.equal(tc(x), ref)
        with tc.timestep(1.0):
            assert not torch.equal(tc(x), ref)
        assert torch.equal(tc(x), ref)  # inner scope popped
    with pytest.raises(TimestepError):
        tc(x)
    tc.set_timestep(0.25)
    assert torch.equal(tc(x), ref)
    tc.set_timestep(None)
    box = {"t": 0.25}
    tc.bind_timestep_source(lambda: box["t"])
    assert torch.equal(tc(x), ref)
    assert torch.equal(tc(x, t=1.0), tc.forward(x, t=1.0))  # explicit beats bound
    tc.bind_timestep_source(None)


def test_warns_on_unseen_timestep(caplog: pytest.LogCaptureFixture) -> None:
    tc = make_tc()
    tc.cfg.trained_timesteps = [1.0, 0.5]
    tc.encode(torch.randn(2, 12), t=0.5)
    assert not caplog.records
    tc.encode(torch.randn(2, 12), t=0.3)
    assert any("untested" in r.message for r in caplog.records)


# ---- folding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("activation", "k"), ACTS)
@pytest.mark.parametrize("t", [1.0, 0.75390625, 0.5, 0.25])
def test_fold_agrees_with_conditioned(activation: str, k: int | None, t: float) -> None:
    tc = make_tc(activation, k)
    x = torch.randn(64, 12)
    folded = tc.fold(t)
    pre_c = tc.encode_with_hidden_pre(x, t=t)[1].detach()
    pre_f = x @ folded.W_enc + folded.b_enc
    # folding reassociates float sums: 1e-5 relative to the pre-activation scale
    torch.testing.assert_close(pre_f, pre_c, rtol=0, atol=1e-5 * float(pre_c.abs().max()))
    z_c, z_f = tc.encode(x, t=t), folded.encode(x)
    assert torch.equal(z_c != 0, z_f != 0) or activation == "topk"
    torch.testing.assert_close(folded.decode(z_f), tc(x, t=t), rtol=1e-4, atol=1e-4)
    assert folded.t == t and folded.activation == tc.activation


def test_fold_needs_one_float() -> None:
    with pytest.raises(TimestepError, match="one float timestep"):
        make_tc().fold(torch.tensor([0.5, 1.0]))  # type: ignore[arg-type]


# ---- decoder norm ----------------------------------------------------------------------------


def test_decoder_norm_check_and_normalize() -> None:
    tc = make_tc()
    tc.check_unit_norm_decoder()
    with torch.no_grad():
        tc.W_dec[7] *= 3
    with pytest.raises(
        DecoderNormError, match="1 of 48 decoder rows are not unit-norm \\(feature 7 has norm 3"
    ):
        tc.check_unit_norm_decoder()
    tc.normalize_decoder_()
    tc.check_unit_norm_decoder(atol=1e-6)


@pytest.mark.parametrize(("activation", "k"), [("relu", None), ("jumprelu", None)])
def test_fold_W_dec_norm_is_output_invariant(activation: str, k: int | None) -> None:
    tc = make_tc(activation, k)
    with torch.no_grad():
        tc.W_dec.mul_(torch.rand(48, 1) + 0.5)
    x = torch.randn(16, 12)
    before = tc(x, t=0.5)
    tc.fold_W_dec_norm()
    tc.check_unit_norm_decoder(atol=1e-5)
    torch.testing.assert_close(tc(x, t=0.5), before, rtol=1e-5, atol=1e-5)


def test_fold_W_dec_norm_refuses_topk_with_uneven_norms() -> None:
    tc = make_tc("topk", 5)
    with torch.no_grad():
        tc.W_dec[0] *= 2
    with pytest.raises(NotImplementedError, match="TopK"):
        tc.fold_W_dec_norm()


def test_inexact_folds_refused() -> None:
    tc = make_tc()
    with pytest.raises(NotImplementedError):
        tc.fold_activation_norm_scaling_factor(2.0)
    with pytest.raises(NotImplementedError):
        tc.fold_activation_whitening()


def test_sae_role_reconstructs_its_input_space() -> None:
    sae = TimestepSAE(TimestepSAEConfig(d_in=10, d_sae=40, d_t_embed=16, activation="topk", k=4))
    y = torch.randn(3, 7, 10)
    out = sae(y, t=0.75390625)
    assert out.shape == y.shape
    assert sae.W_dec.shape == (40, 10) and sae.W_enc.shape == (10, 40)
