"""The step's transformer with each freeze of the replacement model switched on or off.

An attribution graph describes the *frozen* replacement model: attention patterns and LayerNorm
denominators taped from the clean pass, MLPs replaced by transcoders whose selected features pass
on changes of their pre-activation linearly (slope 1, as a ReLU-family activation does where it
is active) while residue and error nodes are constants. :class:`PartialFlux` evaluates the step
with any subset of those freezes lifted, in a batch of interventions:

- ``Freeze()`` (everything frozen, ``mlp="linear"``): the graph's own model, so removing a node
  changes a target by exactly minus the node's total effect
  (:func:`~difract_ext.attribution.effects.total_effects`);
- ``Freeze(attention=False)``: q and k recomputed (patterns follow the intervention);
- ``Freeze(layernorm=False)``: LayerNorm denominators recomputed;
- ``Freeze(mlp="transcoder")``: the transcoders recomputed (active sets change, errors constant);
  ``mlp="real"``: the model's own MLPs recomputed (the transcoders play no part);
- :data:`UNFROZEN`: the real transformer.

An :class:`Edit` subtracts vectors from MLP outputs and scales input embeddings: removing a
fraction of a graph node's value (:func:`node_edit`) or of a set of active features
(:func:`features_edit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from difract_ext.attribution.graph_meta import RESIDUE_FEATURE
from difract_ext.replacement.frozen import FrozenFlux, frozen_parameters

MLP_MODES = ("linear", "transcoder", "real")


@dataclass(frozen=True)
class Freeze:
    """Which parts of the replacement model stay frozen (see the module docstring)."""

    attention: bool = True
    layernorm: bool = True
    mlp: str = "linear"

    def __post_init__(self) -> None:
        if self.mlp not in MLP_MODES:
            raise ValueError(f"mlp must be one of {MLP_MODES}, got {self.mlp!r}")

    @property
    def live(self) -> frozenset[str]:
        """The lifted freezes of attention and LayerNorm (``FrozenFlux``'s ``live``)."""
        return frozenset(
            part
            for part, frozen in (("layernorm", self.layernorm), ("attention", self.attention))
            if not frozen
        )

    @property
    def name(self) -> str:
        live = [
            n for n, on in (("attention", self.attention), ("layernorm", self.layernorm)) if not on
        ]
        if self.mlp != "linear":
            live.append(f"mlp={self.mlp}")
        return "frozen" if not live else "live: " + ", ".join(live)


FROZEN = Freeze()
UNFROZEN = Freeze(attention=False, layernorm=False, mlp="real")


@dataclass
class Edit:
    """One intervention (a batch element).

    Attributes:
        mlp: ``(layer, position, vector [d])`` subtracted from that MLP output.
        embed: ``(position, fraction)``: that input embedding scaled by ``1 - fraction``.
    """

    mlp: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    embed: list[tuple[int, float]] = field(default_factory=list)


def node_vectors(result: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S, 2]`` (layer, position) and ``[S, d]`` MLP-output contribution of every feature node
    (a residue node: the summed contributions of the unexpanded active features there)."""
    g, c = result.graph, result.components
    feats = g.active_features[g.selected_features]
    n_active = c.n_active
    out = torch.zeros(len(feats), c.decoder_vecs.shape[1], dtype=c.decoder_vecs.dtype)
    real = g.selected_features < n_active
    out[real] = c.decoder_vecs[g.selected_features[real]].cpu()
    if bool((~real).any()):
        chosen = torch.zeros(n_active, dtype=torch.bool)
        chosen[g.selected_features[real]] = True
        af = c.features
        for i in torch.nonzero(~real, as_tuple=True)[0].tolist():
            layer, pos = int(feats[i, 0]), int(feats[i, 1])
            mask = (~chosen) & (af[:, 0] == layer) & (af[:, 1] == pos)
            out[i] = c.decoder_vecs[mask.to(c.decoder_vecs.device)].sum(0).cpu()
    return feats[:, :2], out


def node_edit(
    result: Any,
    node: int,
    fraction: float = 1.0,
    vectors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Edit:
    """Remove ``fraction`` of source node ``node``'s value (feature, residue, error or input).

    ``vectors``: :func:`node_vectors` of the result, when already computed.
    """
    g = result.graph
    if node < g.n_features:
        loc, vec = vectors if vectors is not None else node_vectors(result)
        return Edit(mlp=[(int(loc[node, 0]), int(loc[node, 1]), fraction * vec[node])])
    if node < g.error_end:
        layer, pos = divmod(node - g.n_features, g.n_pos)
        err = result.components.error_vectors[layer, pos]
        return Edit(mlp=[(layer, pos, fraction * err)])
    if node < g.token_end:
        return Edit(embed=[(node - g.error_end, fraction)])
    raise IndexError(f"node {node} is a target, not a source")


def features_edit(result: Any, active: Sequence[int], fraction: float = 1.0) -> Edit:
    """Remove ``fraction`` of each listed active feature (indices into the step's components)."""
    c = result.components
    loc = c.decoder_locations
    return Edit(
        mlp=[(int(loc[0, i]), int(loc[1, i]), fraction * c.decoder_vecs[i]) for i in active]
    )


class PartialFlux(FrozenFlux):
    """A :class:`~difract_ext.replacement.frozen.FrozenFlux` replaying the attribution's clean
    tape with the freezes of ``freeze`` lifted (see the module docstring).

    Args:
        result: an attribution result (graph, components, model with its recorded step).
        freeze: which parts stay frozen.
    """

    def __init__(self, result: Any, freeze: Freeze) -> None:
        source = result.model.frozen
        super().__init__(source.flux, source.step_input, live=freeze.live)
        self._tape = source._tape
        self._clean_mlp_out = source._clean_mlp_out
        self.cfg = freeze
        self.result = result
        self.clean = result.model.clean
        self._features = self._linear_features() if freeze.mlp == "linear" else {}

    def _linear_features(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{layer: (positions [n], encoder [n, d], unit decoder [n, d])}`` of the graph's
        expanded features (the nodes whose value follows their pre-activation)."""
        g, c = self.result.graph, self.result.components
        sel = g.selected_features
        feats = g.active_features[sel]
        real = (feats[:, 2] != RESIDUE_FEATURE) & (sel < c.n_active)
        idx = sel[real]
        layers = feats[real, 0]
        dev = self.clean["mlp_in"].device
        out = {}
        for layer in layers.unique().tolist():
            m = layers == layer
            act = idx[m]
            values = g.activation_values[act].to(dev, torch.float64)
            dec = c.decoder_vecs[act.to(c.decoder_vecs.device)].to(dev)
            out[layer] = (
                feats[real][m, 1].to(dev),
                c.encoder_vecs[act.to(c.encoder_vecs.device)].to(dev),
                (dec.double() / values[:, None]).to(dec.dtype),
            )
        return out

    def _mlp(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The MLP output of ``layer`` for inputs ``x [B, P, d]`` (``y``: the clean one)."""
        mode = self.cfg.mlp
        if mode == "linear":
            if layer not in self._features:
                return y
            pos, enc, unit = self._features[layer]
            delta = ((x[:, pos] - self.clean["mlp_in"][layer, pos]) * enc).sum(-1)  # [B, n]
            y = y.clone()
            y.index_add_(1, pos, delta[..., None] * unit)
            return y
        if mode == "transcoder":
            y = y.clone()
            t = float(self.step_input.t)
            err = self.result.components.error_vectors[layer]
            for site, dic in self.result.model.dictionaries.items():
                if site.layer != layer:
                    continue
                sl = slice(0, self.n_txt) if site.stream == "txt" else slice(self.n_txt, None)
                home = dic.W_dec.device
                recon = dic(x[:, sl].to(home, dic.W_dec.dtype), t=t).to(y.device, y.dtype)
                y[:, sl] = recon + err[sl]
            return y
        if layer < self.n_double:
            block = self.flux.transformer_blocks[layer]
            return torch.cat(
                [block.ff_context(x[:, : self.n_txt]), block.ff(x[:, self.n_txt :])], dim=1
            )
        block = self.flux.single_transformer_blocks[layer - self.n_double]
        d_attn = block.proj_out.weight.shape[1] - block.proj_mlp.weight.shape[0]
        return F.linear(block.act_mlp(block.proj_mlp(x)), block.proj_out.weight[:, d_attn:])

    # ---- running ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, edits: Sequence[Edit], layers: Sequence[int] = ()) -> dict[str, Any]:
        """The step under each edit (one batch element each).

        Returns ``{"mlp_in": {layer: [B, P, d]} (the layers a target reads, and ``layers``),
        "resid_final": [B, P, d]}``, the tensors the targets' functionals read.
        """
        embed = self.clean["embed"].expand(len(edits), -1, -1).clone()
        return self._run(embed, edits, layers)

    def input_effects(self) -> torch.Tensor:
        """``[P, K]`` total effect of every input node on each target (:meth:`linear_effects`)."""
        return self.linear_effects()["input"]

    def linear_effects(self) -> dict[str, torch.Tensor]:
        """Total effects of every source on every target, from one backward pass per target:
        a gradient at the clean step times a source's value. In :data:`FROZEN` (the affine
        graph's model) that is exactly the change when the source is removed; with the
        attention or LayerNorm freeze lifted (``mlp="linear"`` still) it is the first-order
        effect, the total effect of a graph built with that ``live``.

        Returns ``{"input": [P, K], "mlp_out": [L, P, d, K]}``: each input node's effect, and
        the gradient of each target with respect to each MLP output (the effect of removing a
        vector ``v`` there, e.g. a feature's decoder contribution or an error, is ``⟨g, v⟩``).
        """
        if self.cfg.mlp != "linear":
            raise ValueError(
                "linear_effects needs the graph's linearised MLPs: Freeze(mlp='linear'), "
                f"got {self.cfg}"
            )
        embed = self.clean["embed"][None].clone().requires_grad_(True)
        outs: list[torch.Tensor] = []
        with torch.enable_grad(), frozen_parameters(self.flux):
            cap = self._run(embed, [Edit()], outputs=outs)
            inputs, grads = [], []
            for spec in self.result.targets:
                value = _functional(spec, cap, self.n_layers)[0]
                g = torch.autograd.grad(value, [embed, *outs], retain_graph=True, allow_unused=True)
                g = [torch.zeros_like(x) if d is None else d for x, d in zip([embed, *outs], g)]
                inputs.append((g[0][0].double() * embed[0].detach().double()).sum(-1))
                grads.append(torch.stack([x[0] for x in g[1:]]).double())
        return {
            "input": torch.stack(inputs, dim=1).cpu(),
            "mlp_out": torch.stack(grads, dim=-1).cpu(),
        }

    def _run(
        self,
        embed: torch.Tensor,
        edits: Sequence[Edit],
        layers: Sequence[int] = (),
        outputs: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        b = len(edits)
        subtract: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for i, e in enumerate(edits):
            for pos, fraction in e.embed:
                embed[i, pos] = embed[i, pos] * (1.0 - fraction)
            for layer, pos, vec in e.mlp:
                subtract.setdefault(layer, []).append((i, pos, vec))
        keep = {layer for spec in self.result.targets for layer, _, _ in spec.injections}
        keep |= set(layers)
        captured: dict[str, Any] = {"mlp_in": {}}
        inputs: dict[int, torch.Tensor] = {}

        def grab_in(layer: int) -> Any:
            def hook(t: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
                inputs[layer] = t
                if layer in keep:
                    captured["mlp_in"][layer] = t

            return hook

        def replace_out(layer: int) -> Any:
            def hook(t: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
                y = self._mlp(layer, inputs.pop(layer), t)
                if layer in subtract:
                    items = subtract[layer]
                    rows = torch.tensor([i for i, _, _ in items], device=y.device)
                    cols = torch.tensor([p for _, p, _ in items], device=y.device)
                    vecs = torch.stack([v for _, _, v in items]).to(y.device, y.dtype)
                    y = y.index_put((rows, cols), -vecs, accumulate=True)
                if outputs is not None:  # every layer's MLP output, in order
                    outputs.append(y)
                return y

            return hook

        fwd: list[tuple[str, Any]] = []
        for layer in range(self.n_layers):
            fwd.append((f"blocks.{layer}.mlp.hook_in", grab_in(layer)))
            fwd.append((f"blocks.{layer}.mlp.hook_out", replace_out(layer)))

        def final(t: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            captured["resid_final"] = t

        fwd.append(("unembed.hook_pre", final))
        self._mode, self._cursor = "replay", 0
        self._mlp_override = self._clean_mlp_out
        try:
            with self.hooks(fwd_hooks=fwd):
                self.forward(batch=b, embed=embed)
        finally:
            self._mode, self._mlp_override = "live", None
        return captured

    def target_values(self, edits: Sequence[Edit]) -> torch.Tensor:
        """``[len(edits), K]`` every target's value (with its offset) under each edit, float64."""
        cap = self.run(edits)
        return torch.stack(
            [_functional(s, cap, self.n_layers) + s.offset for s in self.result.targets], dim=1
        ).cpu()

    def target_changes(self, edits: Sequence[Edit], batch: int = 32) -> torch.Tensor:
        """``[len(edits), K]`` change of every target under each edit, float64 (each chunk
        carries its own unedited copy, so float rounding of the batch cancels)."""
        specs = self.result.targets
        out = []
        for s in range(0, len(edits), batch):
            chunk = [Edit(), *edits[s : s + batch]]
            cap = self.run(chunk)
            vals = torch.stack([_functional(spec, cap, self.n_layers) for spec in specs], dim=1)
            out.append(vals[1:] - vals[:1])
        if not out:
            return torch.zeros(0, len(specs), dtype=torch.float64)
        return torch.cat(out).cpu()


def _functional(spec: Any, captured: dict[str, Any], n_layers: int) -> torch.Tensor:
    """``[B]`` a target's functional (without its offset) on captured tensors, float64."""
    total = None
    for layer, pos, vecs in spec.injections:
        h = captured["resid_final"] if layer == n_layers else captured["mlp_in"][layer]
        part = (h[:, pos.to(h.device)].double() * vecs.to(h.device).double()).sum(dim=(1, 2))
        total = part if total is None else total + part
    assert total is not None
    return total
