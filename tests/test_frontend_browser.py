"""The patched frontend in a real headless Chromium: the page loads a graph and shows its nodes.

Uses Debian's ``chromium`` (``apt-get install chromium``) driven by Playwright (PyPI
``playwright``; its own browser download is never used). Skipped, with a message saying so,
when either is missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from difract_ext.graphs.files import RESIDUE_FEATURE_TYPE, write_graph_files
from difract_ext.graphs.server import serve
from difract_ext.graphs.synthetic import synthetic_graph, synthetic_image, synthetic_row_graph

logger = logging.getLogger(__name__)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM = next((p for p in CHROMIUM_CANDIDATES if Path(p).is_file()), None) or shutil.which(
    "chromium"
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium at /usr/bin/chromium (install Debian's `chromium` package): "
    "browser test of the graph frontend skipped",
)


@pytest.mark.parametrize("scale", ["small", "256px"])
def test_graph_page_renders_in_chromium(tmp_path: Path, scale: str) -> None:
    """``small``: a dense circuit-tracer graph of 13 positions; ``256px``: a row graph at the
    shapes model's 256 px / 512 tokens (4,608 positions, ~51 k nodes, 300 expanded features)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Python package `playwright` missing: browser test skipped"
    )
    data_dir = tmp_path / "graphs"
    if scale == "small":
        graph, meta = synthetic_graph(seed=0)
        image = synthetic_image(meta.grid)
    else:
        graph, meta = synthetic_row_graph(seed=0)
        image = synthetic_image(meta.grid, patch_px=4)
    slug = f"synthetic-{scale}"
    path = write_graph_files(graph, meta, data_dir, slug, image=image)
    data = json.loads(path.read_text())
    threshold = data["metadata"]["node_threshold"]
    # the nodes the UI keeps at its default pruning threshold (util-cg.js formatData)
    expected = [
        n
        for n in data["nodes"]
        if n["feature_type"] in ("embedding", "logit") or n["influence"] <= threshold
    ]
    target_id = next(n["node_id"] for n in data["nodes"] if n["feature_type"] == "logit")
    screenshot = tmp_path / "graph.png"

    requests: list[str] = []
    failures: list[str] = []
    errors: list[str] = []
    with serve(data_dir) as server, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("requestfailed", lambda r: failures.append(f"{r.url}: {r.failure}"))
            page.on(
                "response", lambda r: r.status >= 400 and failures.append(f"{r.url}: {r.status}")
            )
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on(
                "console",
                lambda m: (
                    m.type == "error"
                    and "status of 404" not in m.text  # the browser's own line for that 404
                    and errors.append(m.text)
                ),
            )
            page.goto(f"{server.graph_url(slug)}&clickedId={target_id}")
            page.wait_for_selector(".link-graph text.node", timeout=20_000)
            page.wait_for_function(
                "document.querySelector('img.difract-generated')?.complete", timeout=10_000
            )

            glyphs = page.locator(".link-graph text.node").all_text_contents()
            assert len(glyphs) == len(expected) > 0
            assert page.evaluate("document.body.dataset.difractNodes") == str(len(expected))
            if any(n["feature_type"] == RESIDUE_FEATURE_TYPE for n in expected):
                assert "▲" in glyphs  # residue nodes are drawn distinctly
            assert "◆" in glyphs  # error nodes
            # positions are labelled with text tokens and image patches
            ticks = page.locator(".link-graph g.prompt-token text").all_text_contents()
            assert ticks == data["metadata"]["prompt_tokens"]
            assert any(t.startswith("img r") for t in ticks) and any(
                t.startswith("txt ") for t in ticks
            )
            # image panel: the generated image, one rect per patch, coloured for the clicked target
            assert page.evaluate("document.querySelector('img.difract-generated').naturalWidth") > 0
            patches = page.locator(".difract-image rect.patch")
            assert patches.count() == meta.grid[0] * meta.grid[1]
            filled = page.evaluate(
                "[...document.querySelectorAll('.difract-image rect.patch')]"
                ".filter(r => r.getAttribute('fill') !== 'none').length"
            )
            assert filled > 0
            assert "inputs to Output" in page.locator(".difract-caption").inner_text()
            # the node-connections pane shows the clicked target's inputs
            assert page.locator(".node-connections .feature-row").count() > 0
            page.screenshot(path=str(screenshot))
            # clicking a feature opens its detail pane; with no feature file it degrades quietly
            page.locator(".node-connections .feature-row", has_text=" L").first.click()
            page.wait_for_selector(".feature-detail .feature-title", timeout=5_000)
            page.wait_for_timeout(300)
        finally:
            context.close()

    logger.info("frontend screenshot: %s", screenshot)
    if keep := os.environ.get("DIFRACT_SCREENSHOT_DIR"):  # e.g. to keep it as a CI artifact
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    assert screenshot.stat().st_size > 10_000
    outside = [u for u in requests if not u.startswith((server.url, "data:"))]
    assert requests and not outside, outside
    # feature files are optional: a 404 under /features/ is the only failure allowed
    assert not [f for f in failures if "/features/" not in f], failures
    assert not errors, errors
