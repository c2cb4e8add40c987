"""The distribution installs `adapters/` as `difract_ext.adapters`, never as a top-level package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = tmp_path.glob("difract_ext-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "difract_ext/adapters/dictionaries.py" in names
    assert "difract_ext/adapters/checkpoints.py" in names
    assert not any(n.startswith("adapters/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)

    # a plain (non-editable) install of that wheel imports and registers from its own files
    target = tmp_path / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, r"{target}")
import difract_ext, difract_ext.adapters.dictionaries as d
from sae_lens.registry import SAE_CLASS_REGISTRY
assert difract_ext.__file__.startswith(r"{target}"), difract_ext.__file__
assert d.__file__.startswith(r"{target}"), d.__file__
assert SAE_CLASS_REGISTRY["difract_timestep_transcoder"][0] is d.TimestepTranscoder
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_installed_package_maps_adapters() -> None:
    import difract_ext.adapters.dictionaries as mod

    assert Path(mod.__file__).parent.name == "adapters"  # the source folder, mapped by setuptools
    import importlib.util

    assert importlib.util.find_spec("adapters") is None or "difract" not in str(importlib.util.find_spec("adapters").origin)
