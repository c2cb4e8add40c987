"""Batched attribution (the row driver, circuit-tracer's ranking) vs a per-node reference.

    python benchmarks/attribution.py [--model shapes|tiny] [--sizes 32 64] [--nodes 400]

The per-node reference does what the DifFRACT reference does: one full forward and one backward of
the frozen replacement model per expanded node (targets, then features), contracting the gradients
with decoder rows, error vectors and input embeddings. Both build the same graph (the same budget:
every target row and the first ``--nodes`` feature rows by circuit-tracer's influence order);
the script checks they agree edge for edge (<= 1e-5 relative) before it prints a ratio. Each
variant runs in its own subprocess, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def setup(model: str, size: int, d_sae: int):
    from difract_ext import Site, TimestepTranscoder, TimestepTranscoderConfig
    from difract_ext.flux.defaults import TrainedRangeWarning
    from difract_ext.replacement.inputs import capture_step_input

    if model == "shapes":
        from difract_ext.toy import load_shapes_pipeline

        pipe = load_shapes_pipeline()
        call = {}  # its own T5 length and steps; the size is the benchmark's
        try:
            from difract_ext import load_shapes_dictionaries

            dics = load_shapes_dictionaries()
        except (ImportError, FileNotFoundError):
            dics = None
    else:
        from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline

        cfg = TinyFluxConfig(
            num_layers=4,
            num_single_layers=2,
            num_attention_heads=4,
            attention_head_dim=32,
            axes_dims_rope=(8, 12, 12),
        )
        pipe = build_tiny_flux_pipeline(cfg, seed=0)
        call, dics = {"max_sequence_length": 16}, None
    if dics is None:
        torch.manual_seed(0)
        width = pipe.transformer.inner_dim
        dics = {}
        for layer in range(len(pipe.transformer.transformer_blocks)):
            for stream in ("img", "txt"):
                tc = TimestepTranscoder(
                    TimestepTranscoderConfig(d_in=width, d_sae=d_sae, d_out=width, d_t_embed=32)
                )
                with torch.no_grad():
                    tc.b_enc.normal_(-0.4, 0.2)  # sparse enough to be transcoder-like
                dics[Site(layer, stream)] = tc
    with warnings.catch_warnings():  # cost is measured at sizes the shapes model was not trained at
        warnings.simplefilter("ignore", TrainedRangeWarning)
        step = capture_step_input(
            pipe,
            "a red circle on the left and a blue square on the right",
            step=1,
            seed=0,
            num_inference_steps=4,
            height=size,
            width=size,
            **call,
        )
    return pipe, step, dics


def targets_for(model_obj):
    from difract_ext.replacement.targets import output_target

    g = torch.Generator().manual_seed(0)
    c_out = model_obj.frozen.flux.proj_out.weight.shape[0]
    rows, cols = model_obj.step.grid
    left = [(r, c) for r in range(rows) for c in range(cols // 2)]
    return [
        output_target(
            model_obj.frozen, left, torch.randn(c_out, generator=g), kind="x0", label="x0 left"
        )
    ]


def run_batched(args: argparse.Namespace, out: Path) -> dict:
    from difract_ext.adapters.attribution import attribute_step

    pipe, step, dics = setup(args.model, args.size, args.d_sae)
    # warm-up (allocator, thread pool, lazy imports), not timed
    attribute_step(
        pipe.transformer,
        step,
        dics,
        targets_for,
        max_feature_nodes=args.backward_batch,
        batch_size=args.batch,
        backward_batch=args.backward_batch,
    )
    t0 = time.perf_counter()
    res = attribute_step(
        pipe.transformer,
        step,
        dics,
        targets_for,
        max_feature_nodes=args.nodes,
        batch_size=args.batch,
        backward_batch=args.backward_batch,
    )
    elapsed = time.perf_counter() - t0
    g = res.graph
    n_feat = len(g.selected_features)
    feats = g.active_features[g.selected_features]
    torch.save(
        {
            "adjacency": g.dense_adjacency(),  # small graphs: the square form
            "features": feats,
            "n_feat": n_feat,
            "n_residue": res.n_residue,
        },
        out,
    )
    return {
        "seconds": elapsed,
        "rows": n_feat - res.n_residue + 1,
        "n_active": res.components.n_active,
        "positions": res.meta.n_pos,
        "layers": res.meta.n_layers,
    }


def run_reference(args: argparse.Namespace, out: Path, batched_file: Path) -> dict:
    """One forward and one backward per node, DifFRACT-style."""
    from difract_ext.adapters.attribution import FluxReplacementModel
    from difract_ext.attribution.graph_meta import RESIDUE_FEATURE

    pipe, step, dics = setup(args.model, args.size, args.d_sae)
    # gradients with respect to activations only, as DifFRACT's torch.autograd.grad(inputs=...)
    pipe.transformer.requires_grad_(False)
    ref = torch.load(batched_file, weights_only=True)
    warm = FluxReplacementModel(
        pipe.transformer, step, dics
    )  # warm-up as for the batched run, not timed
    with torch.enable_grad():
        warm.frozen(batch=1).sum().backward()
    del warm
    t0 = time.perf_counter()
    model = FluxReplacementModel(pipe.transformer, step, dics)
    model.targets = targets_for(model)
    c, frozen = model.components, model.frozen
    n_layers, n_pos = frozen.n_layers, frozen.n_txt + frozen.n_img
    feats = c.features
    lookup = {tuple(f.tolist()): i for i, f in enumerate(feats)}
    wanted = [lookup[tuple(f.tolist())] for f in ref["features"] if int(f[2]) != RESIDUE_FEATURE]

    def one_row(inject) -> torch.Tensor:
        cache: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        fwd = [
            (f"blocks.{layer}.mlp.hook_in", lambda t, hook: cache.__setitem__(hook.name, t))
            for layer in range(n_layers)
        ]
        fwd.append(("unembed.hook_pre", lambda t, hook: cache.__setitem__(hook.name, t)))
        bwd = [
            (
                f"blocks.{layer}.mlp.hook_out",
                lambda g, hook: grads.__setitem__(hook.name, g.detach()),
            )
            for layer in range(n_layers)
        ]
        bwd.append(("hook_embed", lambda g, hook: grads.__setitem__("hook_embed", g.detach())))
        with frozen.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            frozen(batch=1)
            inject(cache).backward()
        row = torch.zeros(c.n_active + (n_layers + 1) * n_pos)
        for layer in range(n_layers):
            g = grads.get(f"blocks.{layer}.mlp.hook_out", torch.zeros(1, n_pos, frozen.d_model))[0]
            mask = c.decoder_locations[0] == layer
            pos = c.decoder_locations[1][mask]
            row[torch.nonzero(mask, as_tuple=True)[0]] = (g[pos] * c.decoder_vecs[mask]).sum(-1)
            row[c.n_active + layer * n_pos : c.n_active + (layer + 1) * n_pos] = (
                g * c.error_vectors[layer]
            ).sum(-1)
        row[c.n_active + n_layers * n_pos :] = (grads["hook_embed"][0] * model.clean["embed"]).sum(
            -1
        )
        return row

    rows = []
    target = model.targets[0]
    rows.append(
        one_row(
            lambda cache: sum(
                (cache["unembed.hook_pre"][0, pos] * v).sum() for layer, pos, v in target.injections
            )
        )
    )
    for i in wanted:
        layer, pos = int(feats[i, 0]), int(feats[i, 1])
        enc = c.encoder_vecs[i]
        rows.append(
            one_row(
                lambda cache, layer=layer, p=pos, e=enc: (
                    cache[f"blocks.{layer}.mlp.hook_in"][0, p] * e
                ).sum()
            )
        )
    elapsed = time.perf_counter() - t0
    torch.save({"rows": torch.stack(rows), "wanted": torch.tensor(wanted)}, out)
    return {"seconds": elapsed, "rows": len(rows)}


def compare(batched_file: Path, ref_file: Path) -> float:
    """Max relative disagreement over every edge the two share (the reference has no residue)."""
    from difract_ext.attribution.graph_meta import RESIDUE_FEATURE

    b = torch.load(batched_file, weights_only=True)
    r = torch.load(ref_file, weights_only=True)
    adj, feats, n_feat = b["adjacency"], b["features"], b["n_feat"]
    real = torch.nonzero(feats[:, 2] != RESIDUE_FEATURE, as_tuple=True)[0]
    ref_rows = r["rows"]
    n_active_cols = ref_rows.shape[1] - (adj.shape[0] - n_feat - 1)
    # the batched graph keeps columns [selected features..., errors, inputs]; map the reference's
    cols = torch.cat([r["wanted"], torch.arange(n_active_cols, ref_rows.shape[1])])
    graph_cols = torch.cat([real, torch.arange(n_feat, adj.shape[0] - 1)])
    graph_rows = torch.cat([adj[-1:], adj[real]])
    a = graph_rows[:, graph_cols]
    e = ref_rows[:, cols]
    scale = e.abs().max(dim=1, keepdim=True).values.clamp(min=1e-12)
    return float(((a - e).abs() / scale).max())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=["shapes", "tiny"], default="shapes")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[32, 64], help="image sizes (grid = size / 4)"
    )
    p.add_argument("--nodes", type=int, default=300, help="feature rows expanded by both methods")
    p.add_argument(
        "--batch",
        type=int,
        default=128,
        help="circuit-tracer's batch (rows per compute_batch call)",
    )
    p.add_argument(
        "--backward-batch",
        type=int,
        default=32,
        help=(
            "rows per backward pass; larger batches are layer-sorted into these "
            "(32 is fastest on CPU)"
        ),
    )
    p.add_argument(
        "--d-sae", type=int, default=512, help="width of random transcoders if none are shipped"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=["batched", "reference"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--io", nargs=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        out, other = Path(args.io[0]), Path(args.io[1])
        info = (
            run_batched(args, out) if args.worker == "batched" else run_reference(args, out, other)
        )
        info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(info))
        return
    print(
        f"model={args.model} feature rows={args.nodes} "
        f"batch={args.batch}/{args.backward_batch} threads={args.threads} "
        f"torch={torch.__version__}"
    )
    print(
        f"{'size':>5} {'P':>5} {'L':>3} {'active':>7} {'rows':>5} {'batched s':>10} "
        f"{'reference s':>12} {'speed-up':>9} {'RSS batched':>12} {'RSS ref':>8} "
        f"{'max rel diff':>13}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            bf, rf = Path(tmp) / f"b{size}.pt", Path(tmp) / f"r{size}.pt"
            common = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--size",
                str(size),
                "--nodes",
                str(args.nodes),
                "--batch",
                str(args.batch),
                "--backward-batch",
                str(args.backward_batch),
                "--d-sae",
                str(args.d_sae),
                "--threads",
                str(args.threads),
            ]
            b = json.loads(
                subprocess.run(
                    common + ["--worker", "batched", "--io", str(bf), str(rf)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(
                subprocess.run(
                    common + ["--worker", "reference", "--io", str(rf), str(bf)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            diff = compare(bf, rf)
            if diff > 1e-5:
                raise SystemExit(
                    f"size {size}: the two methods disagree (max relative diff {diff:.2e} > 1e-5)"
                )
            print(
                f"{size:>5} {b['positions']:>5} {b['layers']:>3} {b['n_active']:>7} {b['rows']:>5} "
                f"{b['seconds']:>10.2f} {r['seconds']:>12.2f} {r['seconds'] / b['seconds']:>8.1f}x "
                f"{b['peak_rss_mb']:>10.0f}MB {r['peak_rss_mb']:>6.0f}MB {diff:>13.2e}"
            )
    print(flux_estimate())


def flux_estimate() -> str:
    """Back-of-envelope FLUX.1 graph at 512 px, FLOPs per method (both on the frozen model).

    Per-node (the DifFRACT way): every row runs the full forward (12 B parameters over all
    tokens) and a backward from its layer down. Batched: one forward, then per row only the
    backward of the affine path (value and output projections and the frozen pattern of each
    block; no MLP, q/k or RoPE work) from the row's layer down, i.e. over ~half the 19 double
    blocks for a feature spread evenly over them.
    """
    d, img, txt, n_double, n_single = 3072, 1024, 256, 19, 38
    tokens = img + txt
    fwd = 2 * 12e9 * tokens + 4 * tokens**2 * d * (n_double + n_single)  # weights + attention
    block_bwd = 2 * (2 * d * d * tokens) + 2 * tokens**2 * d  # to_v + to_out, pattern @ V
    rows, targets = 7500, 10
    row_bwd = block_bwd * (n_double / 2 + 1)
    per_node = rows * (fwd + row_bwd) + targets * (fwd + block_bwd * (n_double + n_single))
    batched = fwd + rows * row_bwd + targets * block_bwd * (n_double + n_single)
    rate = 400e12  # sustained bf16 FLOP/s on one H100-class GPU (assumption)
    return (
        f"FLUX.1 estimate (512 px, {rows} feature rows + {targets} targets, "
        f"{rate / 1e12:.0f} TFLOP/s sustained): per-node {per_node / rate / 60:.1f} min, "
        f"batched {batched / rate:.0f} s of FLOPs ({per_node / batched:.0f}x); the dense "
        "adjacency (every block a layer, as FrozenFlux lays it out) would be "
        f"~{(rows + (n_double + n_single + 1) * tokens) ** 2 * 4 / 1e9:.0f} GB fp32."
    )


if __name__ == "__main__":
    main()
