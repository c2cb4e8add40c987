"""The layering of ARCHITECTURE.md holds: import contracts, and what an import really loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
INTERP = ("sae_lens", "nnsight", "circuit_tracer", "transformer_lens")


def _loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``statement``."""
    code = f"import sys\n{statement}\nprint(','.join(m for m in {modules!r} if m in sys.modules))"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return [m for m in res.stdout.strip().split(",") if m]


def test_toy_world_is_torch_free() -> None:
    statement = "import difract_ext.toy.world, difract_ext.toy.analyzer"
    assert _loaded_after(statement, ("torch", "diffusers", *INTERP)) == []


def test_core_packages_load_no_interpretability_library() -> None:
    """One interpreter imports the core packages in flow order; none may load an interp library."""
    packages = ("util", "dictionary", "flux", "toy.pipeline", "capture", "training")
    statement = "\n".join(
        f"import difract_ext.{p}\nassert not [m for m in {INTERP!r} if m in sys.modules], {p!r}"
        for p in packages
    )
    assert _loaded_after(statement, INTERP) == []


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def test_import_contracts_hold() -> None:
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout[-5000:]
    assert "0 broken" in res.stdout


def test_import_contracts_catch_a_core_module_importing_saelens(tmp_path: Path) -> None:
    """The contracts see the whole package (adapters included) and fail on a forbidden import."""
    skip = shutil.ignore_patterns("__pycache__", "weights", "dictionaries", "assets")
    shutil.copytree(ROOT / "difract_ext", tmp_path / "difract_ext", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint_imports(tmp_path, tmp_path).returncode == 0  # the copy is as clean as the tree
    specs = tmp_path / "difract_ext" / "training" / "specs.py"
    specs.write_text(
        specs.read_text()
        + "\n\ndef _io():\n    from difract_ext.adapters import dictionaries\n\n"
        + "    return dictionaries.SAELENS_IO\n"
    )
    res = _lint_imports(tmp_path, tmp_path)
    assert res.returncode == 1
    assert "difract_ext.training is not allowed to import difract_ext.adapters" in res.stdout
    assert "difract_ext.training is not allowed to import sae_lens" in res.stdout
