"""``difract dashboards``: scan a prompt set and write feature dashboards for a folder of
dictionaries; ``difract dashboards export``: write them in Neuronpedia's formats.

Python::

    from difract_ext.cli.dashboards_job import build_dashboards
    build_dashboards("outputs/dash", model="shapes", prompts="shapes:held_out", top_k=5)

For the shapes model (``--model shapes``, the default) the dictionaries default to the shipped
transcoders, the prompts to the held-out split, and concept labels are computed.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difract_ext.cli.argtypes import device, output_folder, positive_int, seed

logger = logging.getLogger(__name__)

__all__ = ["add_dashboards_parser", "build_dashboards", "copy_shipped_dashboards", "run_dashboards"]


def build_dashboards(
    out: str | Path,
    *,
    model: str = "shapes",
    dictionaries: str | Path | None = None,
    role: str = "transcoder",
    prompts: str = "shapes:held_out",
    seeds: Sequence[int] = (0,),
    top_k: int = 10,
    batch_size: int = 16,
    scan: str | None = None,
    labels: bool | None = None,
    resume: bool = False,
    device: str = "cpu",
    max_prompts: int | None = None,
    progress: bool = True,
) -> Path:
    """Load the pipeline and dictionaries and run
    :func:`~difract_ext.dashboards.scan.scan_dashboards` into ``out``.

    Args:
        out: the dashboard folder.
        model: a pipeline spec (:func:`~difract_ext.cli.sources.load_pipeline`).
        dictionaries: folder of dictionaries (None: the shipped ones, shapes model only).
        role: which dictionaries of the folder: ``"transcoder"`` or ``"sae"``.
        prompts: a prompt spec (:func:`~difract_ext.cli.sources.load_prompts`).
        seeds, top_k, batch_size: see :class:`~difract_ext.dashboards.scan.ScanConfig`.
        scan: the scan's name (None: ``"shapes"`` for the shipped shapes transcoders, else the
            folder name of ``out``).
        labels: compute shapes-world concept labels (None: for the shapes model).
        resume: continue an interrupted scan.
        max_prompts: use only the first prompts (quick looks).
    """
    from difract_ext.adapters.checkpoints import load_dictionary_dir
    from difract_ext.cli.sources import load_pipeline, load_prompts
    from difract_ext.dashboards.scan import ScanConfig, scan_dashboards

    is_shapes = model == "shapes" or model.startswith("shapes:")
    if dictionaries is None:
        if not is_shapes:
            raise ValueError("--dictionaries DIR is needed for a model other than the shapes one")
        from difract_ext.toy.pipeline import shapes_dictionaries_path

        dictionaries = shapes_dictionaries_path() / f"{role}s"
    loaded = load_pipeline(model, device=device)
    dicts = load_dictionary_dir(dictionaries, role=role, device=device)
    prompt_list = load_prompts(prompts)[:max_prompts]
    if scan is None:
        scan = "shapes" if is_shapes and role == "transcoder" else Path(out).name
    concepts = None
    if labels or (labels is None and is_shapes):
        from difract_ext.dashboards.labels import ShapesConcepts

        concepts = ShapesConcepts()
    config = ScanConfig(
        seeds=seeds,
        top_k=top_k,
        batch_size=batch_size,
        call_kwargs=dict(loaded.call_kwargs),
        model_name=loaded.model_name,
        scan=scan,
    )
    return scan_dashboards(
        loaded.pipe,
        dicts,
        prompt_list,
        out,
        config,
        concepts=concepts,
        resume=resume,
        progress=progress,
    )


def copy_shipped_dashboards(dest: str | Path) -> Path | None:
    """Copy the shipped shapes transcoder dashboards to ``dest`` (e.g. ``OUT/dashboards/shapes``);
    None when they are not built in this checkout."""
    import shutil

    from difract_ext.dashboards.shipped import shipped_dashboards_path

    src = shipped_dashboards_path("transcoder")
    if src is None:
        return None
    dest = Path(dest)
    if dest.exists():
        if not (dest / "index.json").is_file():
            raise FileExistsError(
                f"{dest} exists and is not a dashboard folder; it is left untouched. "
                "Move it away or choose another output folder"
            )
        shutil.rmtree(dest)  # an earlier copy of the dashboards
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("saes", ".*"))
    return dest


def _relaunch(args: argparse.Namespace) -> int:
    """Run this build under ``torch.distributed.run`` with ``args.processes`` CPU/GPU processes."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    argv = ["dashboards", "build", "--out", str(args.out), "--model", args.model]
    argv += ["--role", args.role, "--prompts", args.prompts, "--top-k", str(args.top_k)]
    argv += ["--batch-size", str(args.batch_size), "--device", args.device]
    argv += ["--seeds", *[str(s) for s in args.seeds]]
    for flag, value in (
        ("--dictionaries", args.dictionaries),
        ("--max-prompts", args.max_prompts),
        ("--scan", args.scan),
    ):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--resume"] * bool(args.resume) + ["--no-progress"] * bool(args.no_progress)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "difract_ext.cli"]
    return subprocess.run([*cmd, *argv], env=os.environ.copy(), check=False).returncode


def run_dashboards(args: argparse.Namespace) -> int:
    """The ``difract dashboards`` command (build or export)."""
    import os

    if args.action == "build" and args.processes > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(args)
    if args.action == "export":
        from difract_ext.dashboards.neuronpedia import export_neuronpedia

        files = export_neuronpedia(args.dash, args.out, model_id=args.model_id, source=args.source)
        print(
            f"wrote {len(files)} Neuronpedia feature files and the batch upload body to {args.out}"
        )
        return 0
    out = build_dashboards(
        args.out,
        model=args.model,
        dictionaries=args.dictionaries,
        role=args.role,
        prompts=args.prompts,
        seeds=args.seeds,
        top_k=args.top_k,
        batch_size=args.batch_size,
        scan=args.scan,
        resume=args.resume,
        device=args.device,
        max_prompts=args.max_prompts,
        progress=not args.no_progress,
    )
    from difract_ext.capture.processes import process_state

    if process_state().is_main_process:
        print(f"dashboards written to {out}; view them with:  difract serve {out}")
    return 0


def add_dashboards_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``difract dashboards [build|export]`` to the subcommands ``sub``."""
    p = sub.add_parser(
        "dashboards",
        help="build feature dashboards (top examples, quantiles, profiles, labels); export them",
        description=(
            "build (default): run the pipeline over a prompt set and write, for every dictionary "
            "of a folder, each feature's top examples per denoising step (image + patch/token "
            "activations), quantiles, density, profile over t, strongest tokens and (shapes "
            "model) concept labels, to OUT (resumable: --resume; several processes: torchrun). "
            "export: write a dashboard folder DASH in Neuronpedia's feature JSON format to OUT."
        ),
    )
    p.add_argument("action", nargs="?", choices=["build", "export"], default="build")
    p.add_argument(
        "--out", required=True, type=output_folder, help="dashboard folder (build) or export folder"
    )
    p.add_argument("--model", default="shapes", help="pipeline: shapes (default), tiny, a folder")
    p.add_argument(
        "--dictionaries", default=None, help="dictionary folder (default: the shipped shapes ones)"
    )
    p.add_argument("--role", default="transcoder", choices=["transcoder", "sae"])
    p.add_argument(
        "--prompts", default="shapes:held_out", help="shapes:held_out, shapes:train or a file"
    )
    p.add_argument("--seeds", type=seed, nargs="+", default=[0])
    p.add_argument("--top-k", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-prompts", type=positive_int, default=None)
    p.add_argument("--scan", default=None, help="scan name (default: shapes, or OUT's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted scan")
    p.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        help="data-parallel processes (relaunched under torch.distributed.run; same result)",
    )
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dash", default=None, help="export: the dashboard folder to export")
    p.add_argument("--model-id", default="difract-shapes", help="export: Neuronpedia model id")
    p.add_argument("--source", default=None, help="export: Neuronpedia source set (default: scan)")
    p.set_defaults(func=run_dashboards)
    return p
