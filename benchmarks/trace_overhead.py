"""Wall time of `flux.trace` versus a plain diffusers call on the same pipeline, side by side.

    python benchmarks/trace_overhead.py [--model shapes|small|tiny] [--reps 15]

Round-robin over the variants (plain call; empty trace; trace reading every step's timestep;
trace with transcoders attached on every double-block MLP, no edits; the same reading every
step's features), medians reported as ratios to the plain call. Goal: empty trace <= 1.15x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from difract_ext import Site, TimestepTranscoder, TimestepTranscoderConfig  # noqa: E402
from difract_ext.adapters.tracing import FluxModel  # noqa: E402
from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline  # noqa: E402


def build(model: str):
    if model == "shapes":
        from difract_ext.toy import SHAPES_CALL_DEFAULTS, load_shapes_pipeline

        # FluxModel.trace fills the pipeline's own defaults; the plain-diffusers baseline needs them
        kw = dict(SHAPES_CALL_DEFAULTS)
        kw.pop("num_inference_steps", None)
        return load_shapes_pipeline(), kw
    if model == "small":
        cfg = TinyFluxConfig(
            num_layers=4,
            num_single_layers=8,
            num_attention_heads=4,
            attention_head_dim=64,
            axes_dims_rope=(16, 24, 24),
        )
        return build_tiny_flux_pipeline(cfg, seed=0), dict(
            height=64, width=64, max_sequence_length=16
        )
    return build_tiny_flux_pipeline(seed=0), dict(height=32, width=32, max_sequence_length=16)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["shapes", "small", "tiny"], default="small")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe, kw = build(args.model)
    kw.update(num_inference_steps=args.steps, output_type="latent")
    prompt = "a red circle on the left"
    width = pipe.transformer.inner_dim
    n_layers = len(pipe.transformer.transformer_blocks)
    flux = FluxModel(pipe)
    flux_tc = FluxModel(pipe)
    tcs = {}
    for layer in range(n_layers):
        for stream in ("img", "txt"):
            tcs[Site(layer, stream)] = TimestepTranscoder(
                TimestepTranscoderConfig(d_in=width, d_sae=8 * width, d_out=width, d_t_embed=64)
            )
    flux_tc.attach_transcoders(tcs)

    def plain() -> None:
        pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)

    def empty() -> None:
        with flux.trace(prompt, seed=0, **kw):
            pass

    def read_t() -> None:
        with flux.trace(prompt, seed=0, **kw) as tracer:
            for _ in tracer.steps():
                flux.timestep.save()

    def tc_empty() -> None:
        with flux_tc.trace(prompt, seed=0, **kw):
            pass

    def tc_read() -> None:
        with flux_tc.trace(prompt, seed=0, **kw) as tracer:
            for _ in tracer.steps():
                flux_tc.transcoders[0].ff.features.output.save()

    variants: dict[str, Callable[[], None]] = {
        "plain diffusers call": plain,
        "flux.trace, empty": empty,
        "flux.trace, read timestep each step": read_t,
        f"flux.trace, {2 * n_layers} transcoders attached, empty": tc_empty,
        f"flux.trace, {2 * n_layers} transcoders, read features each step": tc_read,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    with torch.no_grad():
        for _ in range(args.reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain diffusers call"])
    print(
        f"model={args.model} width={width} double_blocks={n_layers} steps={args.steps} "
        f"reps={args.reps} threads={args.threads} torch={torch.__version__}"
    )
    print(f"{'variant':58s} {'median ms':>10s} {'ratio':>7s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:58s} {1000 * med:10.2f} {med / base:7.3f}x")
    ratio = statistics.median(times["flux.trace, empty"]) / base
    print(
        "goal: empty trace <= 1.15x plain -> "
        f"{'met' if ratio <= 1.15 else 'NOT met'} ({ratio:.3f}x)"
    )


if __name__ == "__main__":
    main()
