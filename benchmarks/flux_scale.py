"""Attribution graphs at FLUX.1 scale: measured peak memory and time beside the memory model.

    python benchmarks/flux_scale.py                 # the CPU cases (several minutes)
    python benchmarks/flux_scale.py --cases deep512 # one case
    python benchmarks/flux_scale.py --gpu           # FLUX.1-schnell architecture, one CUDA GPU

No FLUX weights are needed: every transformer here is a ``FluxTransformer2DModel`` with random
weights, and every transcoder a random ``TimestepTranscoder`` whose encoder biases are set so
that ``--active`` features fire per position on average (ReLU: the count varies by position).
Cases (each in its own process, so peak memory is its own; the peak is reset with
``/proc/self/clear_refs`` right before attribution, so it counts attribution and not the setup):

- ``deep512`` / ``deep1024``: FLUX.1 depth (19 double + 38 single blocks), narrow width (64),
  at 512 px (1,024 patches + 256 tokens = 1,280 positions) and 1024 px (4,096 + 512 = 4,608),
  transcoders on all 38 double-block MLPs, a 1,000-feature graph;
- ``wide512-fp32`` / ``wide512-bf16``: FLUX.1 width (3072, 24 heads), 49,152-wide transcoders,
  1 double + 1 single block at 512 px, a 200-feature graph (each row's backward costs ~3 TFLOP
  of value/output projections at this width: 2 CPU cores manage ~7 rows a minute);
- the shapes model at 256 px / 512 tokens, 300 features, is run through ``difract attribute``
  (``--cases shapes256``).

Each case: ``attribute_step``, the graph's scores and pruning, conservation on every row, graph
files. ``--gpu`` builds FLUX.1-schnell's architecture (19 + 38 blocks, width 3072) in bf16 with
38 random 49,152-wide transcoders kept in host memory, at 512 px, and builds 1,000- and
7,500-feature graphs, reporting ``torch.cuda.max_memory_allocated`` beside the model's device
prediction (it stops at once without CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FLUX1 = {"heads": 24, "head_dim": 128, "joint": 4096, "pooled": 768, "axes": (16, 56, 56)}
NARROW = {"heads": 2, "head_dim": 32, "joint": 64, "pooled": 64, "axes": (8, 12, 12)}

CASES: dict[str, dict[str, Any]] = {
    "deep512": {"arch": NARROW, "double": 19, "single": 38, "px": 512, "txt": 256, "d_sae": 4096},
    "deep1024": {"arch": NARROW, "double": 19, "single": 38, "px": 1024, "txt": 512, "d_sae": 4096},
    "wide512-fp32": {
        "arch": FLUX1,
        "double": 1,
        "single": 1,
        "px": 512,
        "txt": 256,
        "features": 200,
    },
}
CASES["wide512-bf16"] = {**CASES["wide512-fp32"], "dtype": "bfloat16"}
GIB = 2**30


def flux_transformer(
    n_double: int, n_single: int, arch: dict[str, Any], dtype: torch.dtype, device: str, seed: int
) -> torch.nn.Module:
    """A ``FluxTransformer2DModel`` of FLUX.1's layout (schnell: no guidance), random weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        tf = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=n_double,
            num_single_layers=n_single,
            attention_head_dim=arch["head_dim"],
            num_attention_heads=arch["heads"],
            joint_attention_dim=arch["joint"],
            pooled_projection_dim=arch["pooled"],
            guidance_embeds=False,
            axes_dims_rope=tuple(arch["axes"]),
        )
    return tf.to(dtype).eval()


def random_step(tf: torch.nn.Module, px: int, n_txt: int, seed: int) -> Any:
    """One transformer call of a ``px``-square image (16 px per patch, as FLUX.1) at t = 0.75."""
    from difract_ext.replacement.inputs import FluxStepInput

    g = torch.Generator().manual_seed(seed)
    side = px // 16
    dev, dtype = tf.x_embedder.weight.device, tf.x_embedder.weight.dtype
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    cfg = tf.config
    return FluxStepInput(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g).to(dev, dtype),
        encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g).to(
            dev, dtype
        ),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dev, dtype),
        timestep=torch.tensor([0.75], device=dev, dtype=dtype),
        img_ids=img_ids.to(dev),
        txt_ids=torch.zeros(n_txt, 3, device=dev),
        prompt="random",
        step=1,
        num_inference_steps=4,
        height=px,
        width=px,
        text_tokens=[f"tok{i}" for i in range(n_txt)],
    )


@torch.no_grad()
def random_transcoders(
    tf: torch.nn.Module,
    step: Any,
    d_sae: int,
    active: int,
    dtype: torch.dtype,
    seed: int,
    home: str = "cpu",
) -> dict[Any, Any]:
    """A random transcoder on every double-block MLP (both streams); each feature's encoder bias
    puts it above zero on ``active / d_sae`` of its stream's positions, so ``active`` features
    fire per position on average. Transcoders are built on the model's device and kept on
    ``home``."""
    from difract_ext import Site, TimestepTranscoder, TimestepTranscoderConfig
    from difract_ext.replacement.frozen import FrozenFlux

    dev = tf.x_embedder.weight.device
    d = int(tf.inner_dim)
    mlp_in = FrozenFlux(tf, step).record()["mlp_in"]
    n_txt = step.n_txt
    out = {}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(len(tf.transformer_blocks)):
        for stream in ("img", "txt"):
            with torch.device(dev):
                tc = TimestepTranscoder(
                    TimestepTranscoderConfig(
                        d_in=d, d_sae=d_sae, d_out=d, d_t_embed=32, device=str(dev)
                    )
                )
            tc = tc.to(dtype)
            x = mlp_in[layer, :n_txt] if stream == "txt" else mlp_in[layer, n_txt:]
            tc.b_enc.zero_()
            pre = tc.encode_with_hidden_pre(x.to(dtype), t=step.t)[1].float()
            # fire count per feature: active * P / d_sae on average (whole numbers, spread at
            # random), so that `active` features fire per position on average
            share = len(x) * active / d_sae
            n_on = torch.full((d_sae,), int(share), dtype=torch.long)
            extra = torch.randperm(d_sae, generator=gen)[: round((share - int(share)) * d_sae)]
            n_on[extra] += 1
            n_on = n_on.clamp(max=len(x))
            thresholds = torch.empty(d_sae, device=pre.device)
            for f in range(0, d_sae, 4096):
                # halfway between the n_on-th and (n_on + 1)-th largest value of each feature
                # (halfway: rounding a bf16 bias must not let the next position fire too)
                top = pre[:, f : f + 4096].sort(dim=0, descending=True).values
                span = top[0] - top[-1] + 1
                top = torch.cat([top[:1] + span, top, top[-1:] - span])
                k = n_on[f : f + 4096].to(pre.device)[None]
                thresholds[f : f + 4096] = (top.gather(0, k) + top.gather(0, k + 1)).squeeze(0) / 2
            tc.b_enc.copy_(-thresholds.to(dtype))
            out[Site(layer, stream)] = tc.to(home)
            del pre
    return out


def _hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_case(
    name: str,
    case: dict[str, Any],
    active: int,
    budget: int,
    out_dir: Path,
    files: bool = True,
    rank_entries: int | None = None,
) -> dict:
    """One case in this process: setup, then attribution (with scores, pruning, conservation
    and graph files) with its peak memory and time, beside the memory model's predictions:
    from sizes alone (``N`` as planned) and as ``difract attribute --estimate`` makes it (``N``
    and the kernels' padding measured on the step)."""
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.attribution import validation
    from difract_ext.attribution.memory import (
        attribution_size,
        estimate_attribution,
        kernel_padding,
    )
    from difract_ext.flux.directions import region_patches
    from difract_ext.graphs.files import write_graph_files
    from difract_ext.replacement.targets import output_target

    dtype = getattr(torch, case.get("dtype", "float32"))
    tf = flux_transformer(case["double"], case["single"], case["arch"], dtype, "cpu", seed=0)
    step = random_step(tf, case["px"], case["txt"], seed=1)
    d_sae = case.get("d_sae", 49152)
    dics = random_transcoders(tf, step, d_sae, active, dtype, seed=2)
    u = torch.randn(64, generator=torch.Generator().manual_seed(3))

    def targets(m: Any) -> list[Any]:
        left = region_patches("left", m.step.grid)
        return [output_target(m.frozen, left, u, kind="x0", label="x0·u @ left")]

    n_planned = active * step.n_txt * case["double"] + active * step.n_img * case["double"]
    opts: dict[str, Any] = {"rank_entries": rank_entries}
    est = estimate_attribution(
        attribution_size(tf, dics, step.n_txt, step.n_img, n_planned, budget, **opts)
    )
    import gc

    gc.collect()
    base = _rss()
    _reset_peak()
    t0 = time.perf_counter()
    res = attribute_step(
        tf, step, dics, targets, max_feature_nodes=budget, rank_entries=rank_entries
    )
    t_attr = time.perf_counter() - t0
    scores = res.graph.scores()
    cons = validation.conservation(res)
    graph: dict[str, list[Any]] = {"nodes": [], "links": []}
    if files:
        path = write_graph_files(res.graph, res.meta, out_dir, name, feature_files=False)
        graph = json.loads(path.read_text())
    else:
        res.graph.prune()
    t_all = time.perf_counter() - t0
    peak = _hwm()
    info = res.graph.info
    # the same prediction with the measured number of active features
    n_active = res.components.n_active
    opts["kernel_padding"] = kernel_padding(res.components.decoder_locations)
    est_n = estimate_attribution(
        attribution_size(tf, dics, step.n_txt, step.n_img, n_active, budget, **opts)
    )
    resident = sum(est_n.terms[k] for k in ("runtime", "weights", "dictionaries"))
    return {
        "case": name,
        "positions": step.n_txt + step.n_img,
        "layers": case["double"] + case["single"],
        "width": int(tf.inner_dim),
        "dtype": str(dtype).replace("torch.", ""),
        "n_active": res.components.n_active,
        "n_active_planned": n_planned,
        "features": int(info["n_expanded"]),
        "residue": int(info["n_residue"]),
        "rows_gib": res.graph.rows.numel() * 4 / GIB,
        "nodes": res.graph.n_nodes,
        "one_pass": bool(info["one_pass"]),
        "backward_passes": int(info["backward_passes"]),
        "predicted_passes": est.backward_passes,
        "attribute_s": t_attr,
        "total_s": t_all,
        "seconds": info["seconds"],
        "base_gib": base / GIB,
        "peak_gib": peak / GIB,
        "predicted_peak_gib": est.peak_bytes / GIB,
        "predicted_peak_measured_n_gib": est_n.peak_bytes / GIB,
        "increment_gib": (peak - base) / GIB,
        "predicted_increment_gib": (est_n.peak_bytes - resident) / GIB,
        "predicted_phase": est_n.peak_phase,
        "replacement": scores[0],
        "completeness": scores[1],
        "conservation_max_rel": cons["max_rel_error"],
        "json_nodes": len(graph["nodes"]),
        "json_links": len(graph["links"]),
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


def run_shapes256(budget: int, threads: int, out_dir: Path) -> dict:
    """``difract attribute`` on the shapes model at 256 px / 512 tokens, its own process;
    the prediction comes from ``difract attribute --estimate`` (which measures ``N``)."""
    args = [
        sys.executable,
        "-m",
        "difract_ext.cli",
        "attribute",
        "--prompt",
        "a red circle on the left and a blue square on the right",
        "--target",
        "x0:red@left",
        "--height",
        "256",
        "--width",
        "256",
        "--max-sequence-length",
        "512",
        "--max-feature-nodes",
        str(budget),
        "--out",
        str(out_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    est = subprocess.run(args + ["--estimate"], capture_output=True, text=True, env=env, check=True)
    estimate = json.loads(est.stdout)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore[union-attr]
    if status != 0:
        raise SystemExit(f"difract attribute failed:\n{stderr[-3000:]}")
    report = json.loads(stdout[: stdout.rindex("}") + 1])
    return {
        "case": "shapes256",
        "positions": estimate["positions"],
        "layers": estimate["layers"],
        "width": estimate["width"],
        "dtype": "float32",
        "n_active": report["n_active_features"],
        "features": report["n_feature_nodes"],
        "residue": report["n_residue_nodes"],
        "one_pass": report["graph"]["one_pass"],
        "backward_passes": report["graph"]["backward_passes"],
        "predicted_passes": estimate["backward_passes"],
        "total_s": elapsed,
        "peak_gib": usage.ru_maxrss * 1024 / GIB,
        "predicted_peak_gib": estimate["peak_gib"],
        "replacement": report["replacement_score"],
        "completeness": report["completeness_score"],
        "conservation_max_rel": report["conservation"]["max_rel_error"],
    }


def flux1_predictions() -> list[dict]:
    """The memory model for FLUX.1-schnell (built on the meta device: sizes only), one GPU."""
    from difract_ext.attribution.memory import attribution_size, estimate_attribution

    tf = flux_transformer(19, 38, FLUX1, torch.bfloat16, "meta", seed=0)
    n_dic = 2 * 19 * (2 * 49152 * 3072 + 49152 + 3072)  # W_enc, W_dec, biases (FiLM not counted)
    rows = []
    for px, n_txt, backward in ((512, 256, 64), (1024, 512, 32)):
        n_img = (px // 16) ** 2
        for active in (16, 32, 64):
            for budget in (1000, 7500):
                n = active * (n_txt + n_img) * 19
                size = attribution_size(
                    tf, {}, n_txt, n_img, n, budget, device="cuda", batch_size=256,
                    backward_batch=backward, dictionary_params=n_dic, dictionary_bytes=2,
                    d_sae=49152,
                )  # fmt: skip
                est = estimate_attribution(size)
                rows.append(
                    {
                        "px": px,
                        "backward_batch": backward,
                        "positions": n_txt + n_img,
                        "active": active,
                        "n_active": n,
                        "features": budget,
                        "device_gib": est.device_bytes / GIB,
                        "host_gib": est.host_bytes / GIB,
                        "phase": est.peak_phase,
                        "backward_passes": est.backward_passes,
                        "one_pass": est.one_pass,
                        "rows_gib": est.terms["graph_rows"] / GIB,
                    }
                )
    return rows


def run_gpu(budgets: list[int], active: int) -> list[dict]:
    """FLUX.1-schnell's architecture in bf16 on one CUDA GPU, 512 px (see the module)."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU (torch.cuda.is_available() is False); stopping")
    from difract_ext.adapters.attribution import attribute_step
    from difract_ext.attribution.memory import attribution_size, estimate_attribution
    from difract_ext.flux.directions import region_patches
    from difract_ext.replacement.targets import output_target

    t0 = time.perf_counter()
    tf = flux_transformer(19, 38, FLUX1, torch.bfloat16, "cuda", seed=0)
    step = random_step(tf, 512, 256, seed=1)
    dics = random_transcoders(tf, step, 49152, active, torch.bfloat16, seed=2, home="cpu")
    setup_s = time.perf_counter() - t0
    u = torch.randn(64, generator=torch.Generator().manual_seed(3))

    def targets(m: Any) -> list[Any]:
        left = region_patches("left", m.step.grid)
        return [output_target(m.frozen, left, u.cuda(), kind="x0", label="x0·u @ left")]

    out = []
    for budget in budgets:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        res = attribute_step(
            tf, step, dics, targets, max_feature_nodes=budget, batch_size=256, backward_batch=64
        )
        torch.cuda.synchronize()
        t_attr = time.perf_counter() - t1
        pruned = res.graph.prune()
        scores = res.graph.scores()
        torch.cuda.synchronize()
        t_all = time.perf_counter() - t1
        n = res.components.n_active
        size = attribution_size(
            tf, dics, step.n_txt, step.n_img, n, budget, batch_size=256, backward_batch=64
        )
        est = estimate_attribution(size)
        out.append(
            {
                "case": f"flux1-schnell-512-{budget}",
                "n_active": n,
                "features": int(res.graph.info["n_expanded"]),
                "backward_passes": int(res.graph.info["backward_passes"]),
                "predicted_passes": est.backward_passes,
                "attribute_s": t_attr,
                "with_prune_scores_s": t_all,
                "setup_s": setup_s,
                "peak_device_gib": torch.cuda.max_memory_allocated() / GIB,
                "predicted_device_gib": est.device_bytes / GIB,
                "kept_nodes": int(pruned.node_mask.sum()),
                "replacement": scores[0],
                "completeness": scores[1],
            }
        )
        print(json.dumps(out[-1]), flush=True)
        del res, pruned
    return out


def _table(rows: list[dict]) -> str:
    head = (
        f"{'case':<14} {'P':>5} {'L':>3} {'d':>5} {'dtype':>8} {'N active':>9} {'feat':>5} "
        f"{'passes':>7} {'pred':>5} {'time s':>7} {'peak GiB':>9} {'pred GiB':>9} "
        f"{'repl':>6} {'compl':>6} {'cons err':>9}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['case']:<14} {r['positions']:>5} {r['layers']:>3} {r['width']:>5} "
            f"{r['dtype']:>8} {r['n_active']:>9,} {r['features']:>5} {r['backward_passes']:>7} "
            f"{r['predicted_passes']:>5} {r['total_s']:>7.1f} {r['peak_gib']:>9.2f} "
            f"{r['predicted_peak_gib']:>9.2f} {r['replacement']:>6.3f} {r['completeness']:>6.3f} "
            f"{r['conservation_max_rel']:>9.1e}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", nargs="+", default=[*CASES, "shapes256"])
    p.add_argument("--active", type=int, default=32, help="mean active features per position")
    p.add_argument("--features", type=int, default=1000, help="feature budget (shapes256: 300)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="FLUX.1-schnell architecture on CUDA")
    p.add_argument("--gpu-features", type=int, nargs="+", default=[1000, 7500])
    p.add_argument("--predict", action="store_true", help="only the FLUX.1 predictions")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--case-json", help="a case as JSON (keys of CASES' entries), for --worker")
    p.add_argument("--rank-entries", type=int, help="force truncated ranking rows")
    p.add_argument("--no-files", action="store_true", help="prune, but write no graph files")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpu:
        run_gpu(args.gpu_features, args.active)
        return
    if args.worker:
        case = json.loads(args.case_json) if args.case_json else CASES[args.worker]
        case["arch"] = {"narrow": NARROW, "flux1": FLUX1}.get(str(case["arch"]), case["arch"])
        with tempfile.TemporaryDirectory() as tmp:
            row = run_case(
                args.worker,
                case,
                args.active,
                args.features,
                Path(tmp),
                files=not args.no_files,
                rank_entries=args.rank_entries,
            )
        print(json.dumps(row))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, {args.active} active per position")
    if not args.predict:
        rows = []
        for name in args.cases:
            if name == "shapes256":
                with tempfile.TemporaryDirectory() as tmp:
                    row = run_shapes256(300, args.threads, Path(tmp))
            else:
                cmd = [sys.executable, __file__, "--worker", name, "--active", str(args.active)]
                features = CASES[name].get("features", args.features)
                cmd += ["--features", str(features), "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stderr[-3000:]}", flush=True)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(_table(rows))
    print("FLUX.1-schnell predictions (one GPU, bf16, offload and host vectors by default):")
    for r in flux1_predictions():
        print(
            f"  {r['px']:>4} px P={r['positions']:>5} B={r['backward_batch']} "
            f"active/pos {r['active']:>2} "
            f"N={r['n_active']:>9,} features {r['features']:>5}: device {r['device_gib']:6.1f} GiB "
            f"(peak in {r['phase']}), host {r['host_gib']:5.1f} GiB, graph rows "
            f"{r['rows_gib']:5.2f} GiB, {r['backward_passes']} backward passes"
        )


if __name__ == "__main__":
    main()
