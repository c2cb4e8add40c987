"""nnsight for FLUX: ``with flux.trace(prompt):`` over a diffusers ``FluxPipeline``.

::

    flux = FluxModel(pipe)                       # a pipeline object, a hub id or a local folder
    flux.attach_transcoders(tcs)                 # {Site(layer, stream): TimestepTranscoder}
    with flux.trace("a red circle on the left", seed=0) as tracer:
        for step in tracer.steps():              # bounded: every denoising step, then it ends
            t = flux.timestep.save()             # what the transformer receives, [B]
            y = flux.transformer.transformer_blocks[1].ff.output.save()
            f = flux.transcoders[1].ff.features.output
            f[..., 7] = 0                        # ablate feature 7 at this step
        image = tracer.result.save()

Differences from nnsight's ``DiffusionModel`` (whose traps are documented in
``../shared/design/nnsight_flux.md``): calls default to the pipeline's own size, T5 length and
steps (its folder's ``difract_call_defaults.json``; else diffusers' defaults with 4 steps for
schnell-style and 28 for dev-style), never a silent 1 step; ``tracer.steps()`` is a bounded loop,
so code after it runs; a built pipeline object is accepted; transcoders survive lazy dispatch.

Order of access inside one step follows execution: ``flux.timestep`` / transformer inputs, then
block 0 (``ff.output`` → ``transcoders[0].ff.features`` → ``ff_context.output`` →
``transcoders[0].ff_context.features``), block 1, ...; ``tracer.result`` after the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from nnsight import DiffusionModel
from nnsight.intervention.tracer import InterleavingTracer
from torch import nn

from difract_ext.flux.defaults import resolve, set_call_defaults
from difract_ext.flux.loading import find_call_defaults, load_pipeline
from difract_ext.flux.sites import (
    STREAM_MODULES,
    Site,
    as_site,
    transformer_calls_per_step,
)
from difract_ext.intervene.spec import Intervention, InterventionError, edit_features
from difract_ext.intervene.splice import SpliceMode, TranscoderSite, check_dictionary_fits, spliced


class PipelineRoot(nn.Module):
    """An ``nn.Module`` over a ``DiffusionPipeline``: its module components as children, and a
    ``forward`` that runs the pipeline (``seed`` becomes a generator; ``seed + i`` per image)."""

    def __init__(self, pipeline: Any) -> None:
        super().__init__()
        self.pipeline = pipeline  # not an nn.Module: a plain attribute
        for name, component in pipeline.components.items():
            if isinstance(component, nn.Module):
                self.add_module(name, component)

    def forward(self, *args: Any, seed: int | None = None, **kwargs: Any) -> Any:
        if seed is not None and kwargs.get("generator") is None:
            prompt = kwargs.get("prompt", args[0] if args else None)
            embeds = kwargs.get("prompt_embeds")
            n = (
                embeds.shape[0]
                if embeds is not None
                else len(prompt)
                if isinstance(prompt, (list, tuple))
                else 1
            )
            n *= kwargs.get("num_images_per_prompt", 1) or 1
            device = self.pipeline.device
            gens = [torch.Generator(device).manual_seed(seed + i) for i in range(n)]
            kwargs["generator"] = gens if n > 1 else gens[0]
        return self.pipeline(*args, **kwargs)


class FluxTracer(InterleavingTracer):
    """nnsight's tracer plus bounded step loops for a denoising run."""

    def _n_steps(self) -> tuple[int, int]:
        kwargs = self.kwargs
        return int(kwargs["num_inference_steps"]), transformer_calls_per_step(kwargs)

    def steps(self, *selection: int | slice | Iterable[int]) -> Any:
        """Loop over denoising steps: ``steps()`` all, ``steps(2)``, ``steps(0, 3)``,
        ``steps(slice(1, 3))``. Each pass of the loop body sees one transformer call: one per
        step, or two per step under true CFG (the conditional call, then the unconditional one).

        Raises:
            ValueError: a step outside ``0 .. num_inference_steps - 1``, or steps not distinct
                and increasing (a step listed after a later one would be skipped).
        """
        n, calls = self._n_steps()
        if not selection:
            wanted = list(range(n))
        else:
            wanted = []
            for item in selection:
                if isinstance(item, slice):
                    wanted.extend(range(n)[item])
                elif isinstance(item, int) and not isinstance(item, bool):
                    wanted.append(item)
                else:
                    wanted.extend(int(i) for i in item)
        bad = [s for s in wanted if not 0 <= s < n]
        if bad or not wanted:
            raise ValueError(
                f"step(s) {bad or list(selection)} out of range: this trace runs {n} denoising "
                f"steps (0..{n - 1}); pass num_inference_steps= to trace() for more"
            )
        if any(b <= a for a, b in zip(wanted, wanted[1:])):
            raise ValueError(
                f"steps {wanted} must be distinct and in increasing order: the denoising loop "
                f"runs forward, so a step listed after a later one would be skipped silently; "
                f"use tracer.steps({', '.join(map(str, sorted(set(wanted))))})"
            )
        occurrences = [s * calls + c for s in wanted for c in range(calls)]
        if occurrences == list(range(n * calls)):
            return self.iter[: n * calls]
        return self.iter[occurrences]


class FluxModel(DiffusionModel):
    """An nnsight model over a diffusers ``FluxPipeline``, with transcoders as traceable sites.

    Args:
        model: a ``FluxPipeline`` (or any ``DiffusionPipeline`` with a FLUX transformer), a hub
            id or a local ``save_pretrained`` folder.
        transcoders: optional dictionaries to attach (see :meth:`attach_transcoders`).
        default_steps: steps when ``num_inference_steps`` is not given (default: the
            pipeline's own, see :func:`difract_ext.flux.defaults.resolve`).
        **kwargs: nnsight / ``from_pretrained`` arguments (``dispatch=True``, ``torch_dtype``...).
    """

    def __init__(
        self,
        model: Any,
        *args: Any,
        transcoders: Any = None,
        default_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        from diffusers import DiffusionPipeline

        object.__setattr__(self, "_difract_sites", {})
        object.__setattr__(self, "_difract_default_steps", default_steps)
        if isinstance(model, DiffusionPipeline):
            model = PipelineRoot(load_pipeline(model))
        super().__init__(model, *args, **kwargs)
        if self.pipeline is not None:
            self.pipeline.set_progress_bar_config(disable=True)
        if transcoders is not None:
            self.attach_transcoders(transcoders)

    # ---- loading ------------------------------------------------------------------------------
    def _wrap(self, module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        if not isinstance(module, PipelineRoot):
            raise TypeError(
                "FluxModel wraps a diffusers pipeline, a hub id or a folder, "
                f"not {type(module).__name__}"
            )
        self.pipeline = module.pipeline
        return module

    def _load(self, repo_id: str, *args: Any, automodel: Any = None, **kwargs: Any) -> nn.Module:
        cls = self._pipeline_class(automodel)
        self.pipeline = load_pipeline(repo_id, pipeline_class=cls, revision=self.revision, **kwargs)
        return PipelineRoot(self.pipeline)

    def _load_meta(
        self, repo_id: str, *args: Any, automodel: Any = None, **kwargs: Any
    ) -> nn.Module:
        self.pipeline = self._meta_pipeline(repo_id, automodel)
        set_call_defaults(self.pipeline, find_call_defaults(repo_id, revision=self.revision))
        return PipelineRoot(self.pipeline)

    def dispatch(self) -> None:
        """Load real weights (lazy models), then re-mount attached transcoders on them."""
        if self.dispatched:
            return
        super().dispatch()
        self.pipeline.set_progress_bar_config(disable=True)
        self._mount()

    # ---- running ------------------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """Trace a whole denoising run at the pipeline's own call defaults.

        Keywords go to ``FluxPipeline.__call__`` (``height``, ``width``, ``num_inference_steps``,
        ``guidance_scale``, ``max_sequence_length``, ``output_type``...); those not given come from
        the pipeline's folder (``difract_call_defaults.json``), else diffusers' defaults with 4
        steps for schnell-style and 28 for dev-style transformers. ``seed=`` gives reproducible
        generators.

        Warns:
            TrainedRangeWarning: a size or T5 length outside the range the pipeline was trained at.
        """
        if kwargs.get("remote"):
            raise NotImplementedError(
                "FluxModel runs locally only. Remote (NDIF) execution is untested here and cannot "
                "carry attached transcoders (they exist only in this process); for remote runs use "
                "nnsight.DiffusionModel with a hub id the server hosts, without transcoders."
            )
        if self.pipeline is None:
            raise RuntimeError("no pipeline loaded")
        if kwargs.get("num_inference_steps") is None and self._difract_default_steps is not None:
            kwargs["num_inference_steps"] = self._difract_default_steps
        kwargs = resolve(self.pipeline, **kwargs)
        if int(kwargs["num_inference_steps"]) < 1:
            raise ValueError(
                f"num_inference_steps must be >= 1, got {kwargs['num_inference_steps']}"
            )
        kwargs.setdefault("tracer_cls", FluxTracer)
        return super().trace(*inputs, **kwargs)

    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.dispatch()  # hooks must land on the real modules, not on meta ones
        with self._hooked():
            return super().interleave(fn, *args, **kwargs)

    @contextlib.contextmanager
    def _hooked(self) -> Iterator[None]:
        sites: dict[Site, TranscoderSite] = self._difract_sites
        if not sites:
            yield
            return
        with spliced(self.pipeline.transformer, sites):
            yield

    @property
    def timestep(self) -> Any:
        """Inside a trace: the ``timestep`` the transformer receives at this step, ``[B]`` in
        [0, 1].
        """
        return self.transformer.inputs[1]["timestep"]

    # ---- transcoders --------------------------------------------------------------------------
    def attach_transcoders(
        self,
        transcoders: Mapping[Any, Any] | Iterable[Any],
        mode: SpliceMode = "delta",
        keep_error: bool = False,
    ) -> None:
        """Attach dictionaries, one per :class:`~difract_ext.flux.sites.Site`.

        Args:
            transcoders: ``{Site: transcoder}`` (as every loader returns; ``"img_3"`` and
                ``(3, "img")`` keys are converted), or an iterable of transcoders whose metadata
                names their layer and stream.
            mode: ``"delta"`` (edits add ``(z' − z)·W_dec`` to the true MLP output; unedited runs
                are bit-identical) or ``"replace"`` (the MLP output becomes ``decode(z')``).
            keep_error: in replace mode, add the transcoder's error ``y − decode(z)`` back.

        Raises:
            SiteError: an unknown stream, a layer the model lacks, a single-stream block, or a
                dictionary whose width does not match the model.
        """
        items = (
            transcoders.items()
            if isinstance(transcoders, Mapping)
            else (
                (Site(int(d.cfg.metadata.layer), str(d.cfg.metadata.stream)), d)
                for d in transcoders
            )
        )
        new: dict[Site, TranscoderSite] = {}
        for key, dictionary in items:
            site = as_site(key)
            check_dictionary_fits(self.pipeline.transformer, site, dictionary)
            new[site] = TranscoderSite(dictionary, site, mode=mode, keep_error=keep_error)
        self._difract_sites.update(new)
        self._mount()

    def detach_transcoders(self) -> None:
        """Remove every attached dictionary."""
        self._difract_sites.clear()
        self._mount()

    @property
    def attached_sites(self) -> list[Site]:
        return sorted(self._difract_sites)

    def _mount(self) -> None:
        """(Re)build ``flux.transcoders``: a ModuleList over double blocks of ModuleDicts."""
        sites: dict[Site, TranscoderSite] = self._difract_sites
        if "transcoders" in self._module._modules:
            del self._module._modules["transcoders"]
            self._update(self._module)  # drop the envoys of the removed modules
        if not sites:
            return
        n = len(self.pipeline.transformer.transformer_blocks)
        blocks = nn.ModuleList(nn.ModuleDict() for _ in range(n))
        for site, mod in sites.items():
            blocks[site.layer][STREAM_MODULES[site.stream]] = mod
        self.transcoders = blocks

    # ---- interventions (difract_ext.intervene.spec) ---------------------------------------------
    def apply_intervention(
        self,
        intervention: Intervention,
        step: int,
        dictionaries: Mapping[Any, Any] | None = None,
    ) -> None:
        """Inside a step loop of :meth:`trace`: apply ``intervention``'s edits of denoising
        ``step`` as deltas on the true MLP outputs, ``(z' − z) · W_dec`` (error term kept).

        ``role="transcoder"`` edits the features of the attached transcoders (as
        ``flux.transcoders[l].ff.features.output`` edits do); ``role="sae"`` encodes the MLP
        output with ``dictionaries[site]`` (SAEs), edits and adds the delta. Call it first in
        the loop body (it reads ``flux.timestep``, then the sites in execution order).

        Raises:
            InterventionError: an edit at a site without a dictionary, or out of range.
        """
        by_site = intervention.at_step(step)
        if not by_site:
            return
        if intervention.role == "transcoder":
            intervention.check(self._difract_sites)
            for site, edits in by_site.items():
                env = getattr(self.transcoders[site.layer], STREAM_MODULES[site.stream]).features
                env.output = edit_features(env.output, edits)
            return
        dicts = {as_site(k): v for k, v in (dictionaries or {}).items()}
        intervention.check(dicts)
        t = self.timestep
        blocks = self.transformer.transformer_blocks
        for site, edits in by_site.items():
            env = getattr(blocks[site.layer], STREAM_MODULES[site.stream])
            y, sae = env.output, dicts[site]
            with torch.no_grad():
                z = sae.encode(y.to(sae.W_dec.dtype), t=t.to(y.device))
                delta = edit_features(z, edits) - z
                env.output = y + (delta @ sae.W_dec).to(y.dtype)

    def run_intervention(
        self,
        prompts: str | Iterable[str],
        intervention: Intervention | None = None,
        *,
        seeds: int | Iterable[int] = 0,
        dictionaries: Mapping[Any, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate ``prompts`` (one image each; row ``i`` gets ``torch.Generator`` seeded
        ``seeds[i]``, or ``seeds + i`` for an int) with ``intervention`` applied at every step
        it names; returns the pipeline output (``.images``). Keywords as for :meth:`trace`.

        Batch several interventions with :meth:`Intervention.on_rows` and ``+``.
        """
        plist = [prompts] if isinstance(prompts, str) else list(prompts)
        slist = (
            [int(seeds) + i for i in range(len(plist))]
            if isinstance(seeds, int)
            else [int(s) for s in seeds]
        )
        if len(slist) != len(plist):
            raise InterventionError(f"{len(plist)} prompts but {len(slist)} seeds")
        device = self.pipeline.device
        kwargs["generator"] = [torch.Generator(device).manual_seed(s) for s in slist]
        if intervention is not None:
            if kwargs.get("num_inference_steps") is None:
                kwargs["num_inference_steps"] = self._difract_default_steps
            n = int(resolve(self.pipeline, **kwargs)["num_inference_steps"])
            sites = (
                self._difract_sites
                if intervention.role == "transcoder"
                else {as_site(k): v for k, v in (dictionaries or {}).items()}
            )
            intervention.check(sites, n_steps=n, n_rows=len(plist))
        with self.trace(plist, **kwargs) as tracer:
            calls = tracer._n_steps()[1]
            for i in tracer.steps():
                if intervention is not None:
                    self.apply_intervention(intervention, i // calls, dictionaries)
            out = tracer.result.save()
        return out
