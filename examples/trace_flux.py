"""Trace a FLUX pipeline with nnsight: read MLPs and the timestep per step, edit transcoder
features.

    python examples/trace_flux.py [--model shapes|tiny] [--out outputs/trace_flux]

Uses the shipped shapes model (and its shipped transcoders) when they are installed, else a tiny
random FLUX pipeline with a freshly initialised transcoder, so it runs offline anywhere.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import difract_ext  # noqa: E402
from difract_ext import FluxModel  # noqa: E402
from difract_ext.flux.defaults import resolve  # noqa: E402


def load(model: str):
    """(pipeline, call kwargs, {Site: transcoder}, prompt)."""
    if model == "shapes":
        from difract_ext.toy import load_shapes_pipeline

        pipe = load_shapes_pipeline()
        kw = {}  # the shipped pipeline carries its own call defaults (32 px, 16 tokens, 4 steps)
        try:
            from difract_ext import load_shapes_dictionaries

            tcs = load_shapes_dictionaries(layers=[1], streams=("img",))
        except (ImportError, FileNotFoundError):
            tcs = None
        return pipe, kw, tcs, "a red circle on the left"
    from difract_ext.flux.tiny import build_tiny_flux_pipeline

    return (
        build_tiny_flux_pipeline(seed=0),
        dict(height=32, width=32, max_sequence_length=16),
        None,
        "a red circle",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=["shapes", "tiny"],
        default=None,
        help="default: shapes if its weights are installed, else tiny",
    )
    args = parser.parse_args()
    model = args.model
    if model is None:
        from importlib.util import find_spec

        model = (
            "shapes" if find_spec("difract_ext.toy.pipeline") and _shapes_available() else "tiny"
        )
    pipe, kw, tcs, prompt = load(model)
    kw["output_type"] = "latent"
    torch.manual_seed(0)
    if tcs is None:  # an untrained transcoder, just to show the mechanics
        width = pipe.transformer.inner_dim
        tcs = {
            (1, "img"): difract_ext.TimestepTranscoder(
                difract_ext.TimestepTranscoderConfig(
                    d_in=width, d_sae=8 * width, d_out=width, d_t_embed=32
                )
            )
        }
    flux = FluxModel(pipe, transcoders=tcs)
    print(
        f"model={model}: {len(pipe.transformer.transformer_blocks)} double blocks, "
        f"transcoders at {[(s.layer, s.stream) for s in flux.attached_sites]}"
    )

    # 1. read: the timestep, an MLP's input/output and the transcoder's features at every step
    with flux.trace(prompt, seed=0, **kw) as tracer:
        rows = list().save()
        for _ in tracer.steps():
            t = flux.timestep
            x = flux.transformer.transformer_blocks[1].ff.input
            y = flux.transformer.transformer_blocks[1].ff.output
            f = flux.transcoders[1].ff.features.output
            rows.append(
                (float(t[0]), tuple(x.shape), float(y.norm()), int((f > 0).sum(-1).float().mean()))
            )
        clean = tracer.result.save()
    for t, shape, ynorm, l0 in rows:
        print(f"t={t:<6g} ff input {shape}  |ff output|={ynorm:8.3f}  mean active features={l0}")

    # 2. edit: switch off the strongest feature at the first step only
    with flux.trace(prompt, seed=0, **kw) as tracer:
        for _ in tracer.steps(0):
            f = flux.transcoders[1].ff.features.output
            top = f[0].sum(0).argmax()
            f[..., top] = 0
            chosen = top.save()
        edited = tracer.result.save()
    change = float((edited.images - clean.images).norm() / clean.images.norm())
    print(f"ablating feature {int(chosen)} at step 0 changed the final latent by {change:.2%}")

    # 3. no edit: the traced run is bit-identical to plain diffusers
    call = resolve(pipe, num_inference_steps=len(rows), **kw)  # what trace() filled in
    plain = pipe(prompt, generator=torch.Generator().manual_seed(0), **call)
    print(f"unedited trace identical to plain diffusers: {torch.equal(plain.images, clean.images)}")


def _shapes_available() -> bool:
    try:
        from difract_ext.toy import shapes_pipeline_path

        return shapes_pipeline_path().exists()
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return False


if __name__ == "__main__":
    main()
