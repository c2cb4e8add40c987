"""Packaging: every subpackage and data folder is installed, quietly, under ``difract_ext`` only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: every code package of the distribution (a new one must be added here and ship)
PACKAGES = (
    "adapters",
    "attribution",
    "capture",
    "cli",
    "dashboards",
    "dictionary",
    "flux",
    "graphs",
    "intervene",
    "replacement",
    "toy",
    "training",
    "util",
)
DATA = ("toy/weights", "toy/dictionaries", "graphs/assets")


def test_wheel_layout(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # a quiet build: no setuptools warnings (packages missing from the configuration, licence table)
    log = res.stdout + res.stderr
    assert "Warning" not in log, log[-3000:]
    (wheel,) = tmp_path.glob("difract_ext-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "difract_ext/adapters/dictionaries.py" in names
    assert "difract_ext/adapters/checkpoints.py" in names
    assert not any(n.startswith("adapters/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    for pkg in PACKAGES:
        assert f"difract_ext/{pkg}/__init__.py" in names, pkg
    # the data: shipped toy weights and dictionaries, the frontend assets
    shipped = [
        p.relative_to(ROOT).as_posix()
        for d in DATA
        for p in (ROOT / "difract_ext" / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert len(shipped) > 50
    assert sorted(set(shipped) - set(names)) == []
    assert not any("__pycache__" in n for n in names)

    # a plain (non-editable) install of that wheel imports and registers from its own files
    target = tmp_path / "site"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, r"{target}")
import difract_ext, difract_ext.adapters.dictionaries as d
import difract_ext.attribution, difract_ext.cli.main
from difract_ext.toy import shapes_dictionaries_path, shapes_pipeline_path
assert (shapes_pipeline_path() / "model_index.json").is_file()
assert (shapes_dictionaries_path() / "index.json").is_file()
from sae_lens.registry import SAE_CLASS_REGISTRY
assert difract_ext.__file__.startswith(r"{target}"), difract_ext.__file__
assert d.__file__.startswith(r"{target}"), d.__file__
assert SAE_CLASS_REGISTRY["difract_timestep_transcoder"][0] is d.TimestepTranscoder
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_adapters_folder_is_the_subpackage() -> None:
    """``adapters/`` is installed as ``difract_ext.adapters``; ``difract_ext/adapters`` is a
    symlink to it (so import-linter and setuptools' discovery see the subpackage)."""
    import difract_ext.adapters.dictionaries as mod

    link = ROOT / "difract_ext" / "adapters"
    assert (ROOT / "adapters").is_dir() and not (ROOT / "adapters").is_symlink()
    assert link.is_symlink() and link.resolve() == (ROOT / "adapters").resolve()
    assert Path(mod.__file__).resolve().parent == (ROOT / "adapters").resolve()
