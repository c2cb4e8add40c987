"""One denoising step made ready for attribution.

:class:`AttributionStep` gathers what every attribution graph of a (prompt, seed, step) is built
from: the frozen replacement model and its clean cache, the dictionaries' components at the
step's ``t``, the graph's :class:`~difract_ext.attribution.graph_meta.GraphMeta` and the targets.
:meth:`AttributionStep.edges` returns the row computer
(:class:`~difract_ext.attribution.edges.StepEdges`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from difract_ext.attribution.edges import StepEdges
from difract_ext.attribution.graph_meta import GraphMeta
from difract_ext.flux.sites import as_site_dict
from difract_ext.replacement.components import step_components
from difract_ext.replacement.frozen import FrozenFlux
from difract_ext.replacement.inputs import FluxStepInput
from difract_ext.replacement.targets import TargetSpec


class AttributionStep:
    """The frozen model, components and metadata of one step.

    Args:
        transformer: the pipeline's ``FluxTransformer2DModel`` (shared, never modified).
        step: the captured step (:func:`~difract_ext.replacement.inputs.capture_step_input`).
        dictionaries: ``{site: transcoder}`` keyed by anything
            :func:`~difract_ext.flux.sites.as_site` reads (``Site(3, "img")``, ``"img_3"``,
            ``(3, "img")``); MLPs without one are error-only.
        model_name: recorded in the graph's metadata.
        host_vectors: keep the active features' encoder and decoder vectors (``2 N d``, the
            largest tensors at scale) in host memory; the edge kernels copy what they need to
            the model's device. None: when the model is on a GPU.
        live: freezes lifted from the edges (``"layernorm"``, ``"attention"``;
            :class:`~difract_ext.replacement.frozen.FrozenFlux`): edges become first-order
            derivatives of the model at the step and no longer sum to a node's value.

    Raises:
        SiteError: a key that is not a site (e.g. a ``(stream, layer)`` tuple), or a layer the
            transformer does not have.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        step: FluxStepInput,
        dictionaries: Mapping[Any, Any],
        model_name: str = "flux",
        host_vectors: bool | None = None,
        live: Collection[str] = (),
    ) -> None:
        self.dictionaries = as_site_dict(dictionaries)
        if host_vectors is None:
            host_vectors = next(transformer.parameters()).is_cuda
        self.frozen = FrozenFlux(transformer, step, live=live)
        self.step = step
        for site in self.dictionaries:
            site.check_in(self.frozen.n_double)
        self.targets: list[TargetSpec] = []
        self.clean = self.frozen.record()
        self.components = step_components(
            self.dictionaries,
            self.clean["mlp_in"],
            self.clean["mlp_out"],
            step.t,
            step.n_txt,
            self.frozen.n_double,
            vectors_device="cpu" if host_vectors else None,
        )
        self.meta = GraphMeta(
            prompt=step.prompt,
            seed=step.seed,
            step=step.step,
            timestep=step.t,
            num_inference_steps=step.num_inference_steps,
            n_txt=step.n_txt,
            grid=step.grid,
            text_tokens=list(step.text_tokens) or [f"tok{i}" for i in range(step.n_txt)],
            n_double=self.frozen.n_double,
            n_layers=self.frozen.n_layers,
            d_img=self.components.d_img,
            target_labels=[],
            model_name=model_name,
            height=step.height,
            width=step.width,
            live=sorted(self.frozen.live),
        )

    def set_targets(
        self, targets: Sequence[TargetSpec] | Callable[[Any], Sequence[TargetSpec]]
    ) -> list[TargetSpec]:
        """Fix the graph's targets: a list, or a callable ``(self) -> list`` (targets often need
        the frozen step, e.g. :func:`~difract_ext.replacement.targets.output_target`).

        Raises:
            ValueError: no target.
        """
        specs = list(targets(self) if callable(targets) else targets)
        if not specs:
            raise ValueError(
                "attribution needs at least one target, e.g. "
                "[output_target(model.frozen, 'all', direction)]"
            )
        self.targets = specs
        self.meta.target_labels = [t.label for t in specs]
        return specs

    def edges(self) -> StepEdges:
        """A row computer over this step's components, input embeddings and targets."""
        return StepEdges(self.components, self.clean["embed"], self.targets)

    def target_values(self) -> torch.Tensor:
        """``[K]`` each target's value on the real step."""
        mlp_in, resid = self.clean["mlp_in"][None], self.clean["resid_final"][None]
        return torch.stack([t.value(mlp_in, resid)[0] for t in self.targets])
