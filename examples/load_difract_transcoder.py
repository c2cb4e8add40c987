"""Load DifFRACT transcoders as SAELens objects and encode a FLUX MLP input at its timestep.

With the released weights (a local copy of the Hub repo ``Artalmaz31/DifFRACT``) and
FLUX.1-schnell::

    python examples/load_difract_transcoder.py \\
        --checkpoints DifFRACT/temporal-aware-transcoders --model black-forest-labs/FLUX.1-schnell

With no arguments it runs offline anywhere: it builds a tiny random FLUX pipeline and writes a
*stand-in* checkpoint in DifFRACT's exact layout for its layer 0, then does the same steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sae_lens import SAE, Transcoder  # noqa: E402

import difract_ext  # noqa: E402  (registers our SAELens architectures)


def build_inputs(args: argparse.Namespace, workdir: Path) -> tuple[object, Path, dict, dict]:
    """Pipeline, checkpoint folder, call kwargs and load kwargs (tiny stand-ins if none given)."""
    if args.checkpoints and args.model:
        from difract_ext.flux.loading import load_pipeline

        pipe = load_pipeline(args.model, dtype=torch.bfloat16)  # a folder or hub id
        return pipe, Path(args.checkpoints), dict(height=512, width=512, guidance_scale=0.0), {}
    from difract_ext.flux.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(seed=0)
    d_model = pipe.transformer.inner_dim
    standin = difract_ext.TimestepTranscoder(
        difract_ext.TimestepTranscoderConfig(
            d_in=d_model, d_sae=8 * d_model, d_out=d_model, d_t_embed=32
        )
    )
    with torch.no_grad():  # a non-trivial time conditioning, as a trained file would have
        standin.mod_linear.weight.normal_(0, 0.05)
    difract_ext.save_difract_checkpoint(standin, workdir / "transcoder_img_0.pt")
    print("no --checkpoints/--model given: using a tiny random FLUX and a stand-in checkpoint")
    # A float32 pipeline passes t = 0.75 exactly (schnell in bf16 passes 0.75390625), so the
    # stand-in does not claim schnell's trained timesteps.
    call = dict(height=32, width=32, max_sequence_length=16, guidance_scale=0.0)
    return pipe, workdir, call, {"trained_timesteps": None}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", help="folder with transcoder_{img,txt}_{layer}.pt")
    parser.add_argument("--model", help="FLUX.1-schnell hub id or local folder")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--prompt", default="a red circle on the left")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        pipe, folder, call, load_kw = build_inputs(args, Path(tmp))

        # 1. A DifFRACT file becomes a SAELens Transcoder subclass (weights-only, memory-mapped).
        tcs = difract_ext.load_difract_dir(folder, layers=[args.layer], streams=("img",), **load_kw)
        tc = tcs[difract_ext.Site(args.layer, "img")]
        print(
            f"loaded {type(tc).__name__} (a sae_lens Transcoder: {isinstance(tc, Transcoder)}): "
            f"d_in={tc.cfg.d_in} d_sae={tc.cfg.d_sae} hook={tc.cfg.metadata.hook_name}"
        )

        # 2. Capture the image MLP's input and output, and the transformer's timestep, at each step.
        block = pipe.transformer.transformer_blocks[args.layer]
        seen: list[tuple[float, torch.Tensor, torch.Tensor]] = []
        state: dict[str, float] = {}
        h1 = pipe.transformer.register_forward_pre_hook(
            lambda mod, a, kw: state.__setitem__("t", float(kw["timestep"][0])), with_kwargs=True
        )
        h2 = block.ff.register_forward_hook(
            lambda mod, a, out: seen.append((state["t"], a[0], out))
        )
        try:
            pipe(
                args.prompt,
                num_inference_steps=4,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                **call,
            )
        finally:
            h1.remove()
            h2.remove()

        # 3. Encode each step's MLP input at that step's t; compare the reconstruction to the MLP.
        for t, x, y in seen:
            x, y = x.float(), y.float()
            with torch.no_grad():
                y_hat, z = tc.to(x.device).forward_with_activations(x, t=t)
            fvu = float(((y - y_hat) ** 2).sum() / ((y - y.mean(dim=(0, 1))) ** 2).sum())
            print(
                f"t={t:.8g}  x {tuple(x.shape)}  "
                f"mean L0 {float((z > 0).sum(-1).float().mean()):.1f}"
                f"  FVU {fvu:.3f}"
            )

        # 4. SAELens' own loader returns our class after a save (or after `difract convert`).
        tc.save_model(Path(tmp) / "saelens" / f"img_{args.layer}")
        again = SAE.load_from_disk(Path(tmp) / "saelens" / f"img_{args.layer}")
        with torch.no_grad():
            same = torch.equal(
                again(seen[0][1].float(), t=seen[0][0]), tc(seen[0][1].float(), t=seen[0][0])
            )
        print(f"SAE.load_from_disk -> {type(again).__name__}, identical outputs: {same}")


if __name__ == "__main__":
    main()
