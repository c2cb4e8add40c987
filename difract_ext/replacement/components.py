"""Transcoder quantities of one step, laid out as circuit-tracer's attribution expects.

Both streams of a double block form one layer: feature ids ``[0, d_img)`` belong to the image
dictionary (image positions), ``[d_img, d_img + d_txt)`` to the text dictionary (text positions).
Each dictionary is evaluated at the step's ``t`` (FiLM folded in), so a feature's *encoder
vector* is ``∂ pre / ∂ x = W_enc[:, i] ⊙ (1 + scale(t))`` and its *decoder vector* ``a_i W_dec[i]``.
A stream (or a single-stream block) without a dictionary is error-only: its whole MLP output is
its error node.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from difract_ext.flux.roles import check_transcoder
from difract_ext.flux.sites import Site


@dataclass
class StepComponents:
    """Sparse activations and the vectors attribution injects and contracts.

    Shapes (``L`` layers, ``P`` positions, ``d`` width, ``N`` active features):
    ``activation_matrix`` sparse ``[L, P, d_tc]`` (coalesced; nnz order = row order below),
    ``encoder_vecs [N, d]``, ``decoder_vecs [N, d]`` (scaled by the activation),
    ``decoder_locations [2, N]`` (layer, position), ``reconstruction [L, P, d]`` (with ``b_dec``),
    ``error_vectors [L, P, d]``, ``bias [L, P, d]`` (``b_dec`` where a dictionary writes),
    ``pre_activations [N]``.
    """

    activation_matrix: torch.Tensor
    encoder_vecs: torch.Tensor
    decoder_vecs: torch.Tensor
    decoder_locations: torch.Tensor
    reconstruction: torch.Tensor
    error_vectors: torch.Tensor
    bias: torch.Tensor
    pre_activations: torch.Tensor
    d_img: dict[int, int]
    d_tc: int

    @property
    def n_active(self) -> int:
        return int(self.activation_matrix._nnz())

    @property
    def features(self) -> torch.Tensor:
        """``[N, 3]`` (layer, position, feature id)."""
        return self.activation_matrix.indices().T


@contextmanager
def _on_device(dic: Any, device: torch.device) -> Iterator[None]:
    """``dic`` on ``device`` inside the block, back where it was after (transcoders may be kept
    in host memory: FLUX.1's 38 at 49,152 features are 23 GB in bf16)."""
    home = dic.W_dec.device
    if home == device:
        yield
        return
    dic.to(device)
    try:
        yield
    finally:
        dic.to(home)


def stream_positions(site: Site, n_txt: int, n_pos: int) -> slice:
    return slice(0, n_txt) if site.stream == "txt" else slice(n_txt, n_pos)


@torch.no_grad()
def step_components(
    dictionaries: Mapping[Site, Any],
    mlp_in: torch.Tensor,
    mlp_out: torch.Tensor,
    t: float,
    n_txt: int,
    n_double: int,
    vectors_device: torch.device | str | None = None,
) -> StepComponents:
    """Encode every dictionary at ``t`` on the cached MLP inputs of one step.

    ``vectors_device``: where the encoder and decoder vectors go, site by site (default: with
    ``mlp_in``; ``"cpu"`` keeps the largest tensors of a GPU step in host memory).

    Args:
        dictionaries: ``{Site(layer, stream): TimestepTranscoder}`` (double blocks only).
        mlp_in, mlp_out: ``[L, P, d]`` cached MLP inputs and outputs (joint order, text first).
        t: the step's timestep.
        n_txt: number of text positions.
        n_double: number of double-stream blocks (the first layers).

    Raises:
        DictionaryRoleError: a dictionary is not a transcoder (e.g. an SAE).
        DictionarySiteError: a dictionary's metadata names another site than its key.
    """
    n_layers, n_pos, d = mlp_in.shape
    d_img = {layer: 0 for layer in range(n_double)}
    d_txt = {layer: 0 for layer in range(n_double)}
    for site, dic in dictionaries.items():
        check_transcoder(site, dic, "attribution (attribute_step)")
        if site.layer >= n_double:
            raise ValueError(f"{site}: transcoders are only supported on double-stream blocks")
        (d_img if site.stream == "img" else d_txt)[site.layer] = int(dic.cfg.d_sae)
    d_tc = max([d_img[layer] + d_txt[layer] for layer in range(n_double)] + [1])
    recon = torch.zeros_like(mlp_out)
    bias = torch.zeros_like(mlp_out)
    idx, vals, pres, enc_rows, dec_rows = [], [], [], [], []
    # text sites before image sites of a layer: rows then come out in (layer, position, id) order
    for site in sorted(dictionaries, key=lambda s: (s.layer, s.stream != "txt")):
        dic = dictionaries[site]
        pos = stream_positions(site, n_txt, n_pos)
        with _on_device(dic, mlp_in.device):
            x = mlp_in[site.layer, pos].to(dic.W_dec.dtype)
            acts, pre = dic.encode_with_hidden_pre(x, t=float(t))
            folded = dic.fold(float(t))
            recon[site.layer, pos] = dic.decode(acts).to(recon.dtype)
            bias[site.layer, pos] = dic.b_dec.to(bias.dtype)
            p_local, f_local = torch.nonzero(acts, as_tuple=True)
            offset = 0 if site.stream == "img" else d_img[site.layer]
            layer_col = torch.full_like(p_local, site.layer)
            idx.append(torch.stack([layer_col, p_local + pos.start, f_local + offset]))
            a = acts[p_local, f_local]
            vals.append(a)
            pres.append(pre[p_local, f_local])
            home = vectors_device or mlp_in.device
            enc_rows.append(folded.W_enc.index_select(1, f_local).T.to(home, mlp_in.dtype))
            dec_rows.append(
                (a[:, None] * dic.W_dec.index_select(0, f_local)).to(home, mlp_in.dtype)
            )
            del folded, acts, pre
    if idx:
        indices = torch.cat(idx, dim=1)
        values = torch.cat(vals)
        enc, dec, pre_all = torch.cat(enc_rows), torch.cat(dec_rows), torch.cat(pres)
        key = indices[0] * (n_pos * d_tc) + indices[1] * d_tc + indices[2]
        if not bool(
            (key[1:] > key[:-1]).all()
        ):  # sparse COO order (already so for text-first sites)
            order = torch.argsort(key)
            on_vectors = order.to(enc.device)
            indices, values, enc, dec, pre_all = (
                indices[:, order],
                values[order],
                enc[on_vectors],
                dec[on_vectors],
                pre_all[order],
            )
    else:
        indices = torch.zeros(3, 0, dtype=torch.long)
        values = torch.zeros(0, dtype=mlp_in.dtype)
        enc = dec = torch.zeros(0, d, dtype=mlp_in.dtype)
        pre_all = torch.zeros(0, dtype=mlp_in.dtype)
    matrix = torch.sparse_coo_tensor(
        indices, values.to(mlp_in.dtype), (n_layers, n_pos, d_tc), check_invariants=True
    ).coalesce()
    return StepComponents(
        activation_matrix=matrix,
        encoder_vecs=enc,
        decoder_vecs=dec,
        decoder_locations=indices[:2],
        reconstruction=recon,
        error_vectors=mlp_out - recon,
        bias=bias,
        pre_activations=pre_all,
        d_img=d_img,
        d_tc=d_tc,
    )
