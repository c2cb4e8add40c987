"""What the load-time integrity checks cost on a DifFRACT-size checkpoint (issue 17).

    python benchmarks/integrity_checks.py [--d-model 3072] [--expansion 16] [--reps 3]

Writes one random ``transcoder_img_0.pt`` in DifFRACT's layout (``d_model x expansion·d_model``
encoder and decoder in float32: 1.2 GB at the defaults) to a temporary folder, then loads it in
fresh processes, round-robin: ``verify=False`` (shapes, dtypes and the NaN/inf scan) and
``verify=True`` (plus the zip CRC-32 of every record). Reports median wall time and the
process's anonymous memory (copies; the memory map's file pages are the page cache's), and, for
scale, the old lazy load that touched no page (``decoder_norm_atol=None`` everywhere).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import sys, time, torch
torch.set_num_threads(2)
from difract_ext.adapters.checkpoints import load_difract_checkpoint
t0 = time.perf_counter()
m = load_difract_checkpoint(sys.argv[1], verify=sys.argv[2] == "1", decoder_norm_atol=None)
dt = time.perf_counter() - t0
anon = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon"))
print(dt, anon / 1024)
"""

BASELINE = r"""
import sys, time, torch
torch.set_num_threads(2)
import difract_ext.adapters.checkpoints
t0 = time.perf_counter()
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=True)
dt = time.perf_counter() - t0
anon = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon"))
print(dt, anon / 1024)
"""


def write_checkpoint(path: Path, d_model: int, d_feat: int, d_t: int = 256) -> None:
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(d_model, d_feat, generator=g)
    dec /= dec.norm(dim=0, keepdim=True)
    sd = {
        "time_mlp.0.weight": torch.randn(d_t, d_t, generator=g),
        "time_mlp.0.bias": torch.zeros(d_t),
        "time_mlp.2.weight": torch.randn(d_t, d_t, generator=g),
        "time_mlp.2.bias": torch.zeros(d_t),
        "mod_linear.weight": torch.zeros(2 * d_model, d_t),
        "mod_linear.bias": torch.zeros(2 * d_model),
        "encoder.weight": dec.T.contiguous(),
        "encoder.bias": torch.zeros(d_feat),
        "decoder.weight": dec,
        "decoder.bias": torch.zeros(d_model),
    }
    torch.save(sd, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=3072)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "transcoder_img_0.pt"
        write_checkpoint(path, args.d_model, args.d_model * args.expansion)
        size = path.stat().st_size
        runs: dict[str, list[tuple[float, float]]] = {"mmap only": [], "checks": [], "+ CRC": []}
        for _ in range(args.reps):
            for name, code, flag in (
                ("mmap only", BASELINE, "0"),
                ("checks", CHILD, "0"),
                ("+ CRC", CHILD, "1"),
            ):
                out = subprocess.run(
                    [sys.executable, "-c", code, str(path), flag],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                t, anon = out.stdout.split()
                runs[name].append((float(t), float(anon)))
        print(f"file: {size / 1e9:.2f} GB; medians of {args.reps} fresh processes")
        print("| load | wall (s) | GB/s | anonymous memory (MiB) |")
        print("|---|---|---|---|")
        for name, vals in runs.items():
            t = statistics.median(v[0] for v in vals)
            anon = statistics.median(v[1] for v in vals)
            print(f"| {name} | {t:.2f} | {size / 1e9 / max(t, 1e-9):.1f} | {anon:.0f} |")


if __name__ == "__main__":
    main()
