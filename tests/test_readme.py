"""Every ```python block of README.md runs as written, in order, in one fresh process.

Blocks that need files this machine cannot download (FLUX.1-schnell, DifFRACT's released
transcoders) say so on their first line (``# Needs ...``) and run against offline stand-ins put at
the very paths the README uses: a tiny random FLUX-architecture pipeline saved as
``black-forest-labs/FLUX.1-schnell/`` (diffusers loads a local folder of that name before asking
the hub) and DifFRACT-format ``.pt`` files of its width in ``temporal-aware-transcoders/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NEEDS_RELEASE = ("temporal-aware-transcoders", "black-forest-labs/")


def readme_blocks() -> list[tuple[int, str]]:
    """``[(first line number, source)]`` of every python block."""
    text = (ROOT / "README.md").read_text()
    return [(text[: m.start(1)].count("\n") + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_blocks_that_need_release_files_say_so() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 5
    for line, src in blocks:
        if any(name in src for name in NEEDS_RELEASE):
            assert src.startswith("# Needs "), f"README.md:{line}: say what the block needs"


STAND_INS = """
import torch
from difract_ext import TimestepTranscoder, TimestepTranscoderConfig, save_difract_checkpoint
from difract_ext.flux.tiny import TinyFluxConfig, build_tiny_flux_pipeline

# 8 double blocks and FLUX's 8x VAE downsampling (512 px -> 32 x 32 patches), tiny widths
pipe = build_tiny_flux_pipeline(
    TinyFluxConfig(num_layers=8, vae_block_out_channels=(8, 8, 8, 8)), seed=0
)
pipe.save_pretrained("black-forest-labs/FLUX.1-schnell")
width = pipe.transformer.inner_dim
torch.manual_seed(0)
for layer in range(8):
    for stream in ("img", "txt"):
        tc = TimestepTranscoder(TimestepTranscoderConfig(d_in=width, d_sae=4 * width, d_out=width))
        save_difract_checkpoint(tc, f"temporal-aware-transcoders/transcoder_{stream}_{layer}.pt")
"""

RUNNER = """
import linecache
blocks = {blocks!r}
readme = {readme!r}
text = open(readme).read()
# nnsight reads a trace's `with` body back from its source: README.md is that source
linecache.cache[readme] = (len(text), None, text.splitlines(True), readme)
ns = {{"__name__": "__main__"}}
for line, src in blocks:
    exec(compile("\\n" * (line - 1) + src, readme, "exec"), ns)
    print(f"README block at line {{line}}: ok", flush=True)
"""


def test_readme_python_blocks_run_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    prep = subprocess.run(
        [sys.executable, "-c", STAND_INS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    blocks = readme_blocks()
    res = subprocess.run(
        [sys.executable, "-c", RUNNER.format(blocks=blocks, readme=str(ROOT / "README.md"))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if res.returncode != 0:
        pytest.fail(
            f"a README block failed (traceback lines are README.md lines):\n"
            f"{res.stdout[-2000:]}\n{res.stderr[-6000:]}"
        )
    assert res.stdout.count(": ok") == len(blocks)
