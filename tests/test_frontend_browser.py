"""The patched frontend in a real headless Chromium at 1600×1000: what a reader sees.

Uses Debian's ``chromium`` (``apt-get install chromium``) driven by Playwright (PyPI
``playwright``; its own browser download is never used). Skipped, with a message saying so,
when either is missing. Screenshots go to each test's tmp folder and, when
``DIFRACT_SCREENSHOT_DIR`` is set, are copied there (CI keeps them as artifacts).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
WIDTH, HEIGHT = 1600, 1000

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium at /usr/bin/chromium (install Debian's `chromium` package): "
    "browser test of the graph frontend skipped",
)

# [left, top, right, bottom] of the displayed elements matching a selector
BOXES_JS = """sel => [...document.querySelectorAll(sel)]
  .filter(e => getComputedStyle(e).display !== 'none')
  .map(e => e.getBoundingClientRect())
  .filter(r => r.width > 0 && r.height > 0)
  .map(r => [r.left, r.top, r.right, r.bottom])"""
# centres of the node glyphs (their translate), in the link graph's own coordinates
CENTRES_JS = """() => [...document.querySelectorAll('.link-graph text.node')].map(e => {
  const m = /translate\\(([-\\d.e]+)[ ,]+([-\\d.e]+)\\)/.exec(e.getAttribute('transform'))
  return [+m[1], +m[2]]
})"""


def _overlapping(boxes: list[list[float]], tol: float = 0.5) -> list[tuple[int, int]]:
    """Pairs of boxes that overlap by more than ``tol`` px in both directions."""
    out = []
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            if min(a[2], b[2]) - max(a[0], b[0]) > tol and min(a[3], b[3]) - max(a[1], b[1]) > tol:
                out.append((i, j))
    return out


class Watch:
    """Everything a page did that a test may want to refuse: failed requests, page errors and
    any console output (the pages print nothing; the browser's own line for a 404 excepted)."""

    def __init__(self, page: Any) -> None:
        self.requests: list[str] = []
        self.failures: list[str] = []
        self.errors: list[str] = []
        self.console: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("requestfailed", lambda r: self.failures.append(f"{r.url}: {r.failure}"))
        page.on(
            "response", lambda r: r.status >= 400 and self.failures.append(f"{r.url}: {r.status}")
        )
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on(
            "console",
            lambda m: "status of 404" not in m.text and self.console.append(f"{m.type}: {m.text}"),
        )

    def check(self, base_url: str, allowed_failures: tuple[str, ...] = ()) -> None:
        outside = [u for u in self.requests if not u.startswith((base_url, "data:"))]
        assert self.requests and not outside, outside
        assert not [f for f in self.failures if not any(a in f for a in allowed_failures)], (
            self.failures
        )
        assert not self.errors, self.errors
        assert not self.console, self.console


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Python package `playwright` missing: browser test skipped"
    )
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": WIDTH, "height": HEIGHT},
        )
        try:
            yield context
        finally:
            context.close()


def _screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    logger.info("frontend screenshot: %s", path)
    if keep := os.environ.get("DIFRACT_SCREENSHOT_DIR"):  # e.g. to keep it as a CI artifact
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    assert path.stat().st_size > 10_000
    return path


def _shown_nodes(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes the UI keeps at its default pruning threshold (util-cg.js formatData)."""
    threshold = data["metadata"]["node_threshold"]
    return [
        n
        for n in data["nodes"]
        if n["feature_type"] in ("embedding", "logit") or n["influence"] <= threshold
    ]


def _open_graph(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector(".link-graph text.node", timeout=20_000)
    page.wait_for_function(
        "document.querySelector('img.difract-generated')?.complete", timeout=10_000
    )


def _check_layout(page: Any, n_nodes: int) -> None:
    """The graph fills the window, every band is labelled once, labels never collide."""
    box = page.locator(".link-graph").bounding_box()
    assert box["width"] >= 0.6 * WIDTH and box["height"] >= 0.5 * HEIGHT, box
    assert page.locator(".link-graph text.node").count() == n_nodes
    ticks = page.evaluate(BOXES_JS, ".link-graph g.prompt-token text")
    assert len(ticks) >= 2 and not _overlapping(ticks)
    bands = page.evaluate(BOXES_JS, ".link-graph text.difract-band-label")
    assert len(bands) >= 3 and not _overlapping(bands)
    names = page.locator(".link-graph text.difract-band-label").all_text_contents()
    assert names[0] == "Emb" and names[-1] == "Targets" and len(set(names)) == len(names)
    legend = page.locator(".link-graph g.difract-graph-legend").text_content()
    assert all(w in legend for w in ("feature", "error", "residue", "target", "green +"))


@pytest.mark.parametrize("scale", ["small", "256px"])
def test_graph_page_renders_in_chromium(browser: Any, tmp_path: Path, scale: str) -> None:
    """``small``: a dense circuit-tracer graph of 13 positions; ``256px``: a row graph at the
    shapes model's 256 px / 512 tokens (4,608 positions, ~51 k nodes, 300 expanded features)."""
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
    expected = _shown_nodes(data)
    target = next(n for n in data["nodes"] if n["feature_type"] == "logit")

    with serve(data_dir) as server:
        page = browser.new_page()
        watch = Watch(page)
        _open_graph(page, f"{server.graph_url(slug)}&clickedId={target['node_id']}")
        _check_layout(page, len(expected))
        glyphs = page.locator(".link-graph text.node").all_text_contents()
        assert page.evaluate("document.body.dataset.difractNodes") == str(len(expected))
        if any(n["feature_type"] == RESIDUE_FEATURE_TYPE for n in expected):
            assert "▲" in glyphs  # residue nodes are drawn distinctly
        assert "◆" in glyphs  # error nodes
        # position labels: every shown position, or position groups when they are too many
        ticks = page.locator(".link-graph g.prompt-token text").all_text_contents()
        grouped = page.evaluate("document.body.dataset.difractGrouped") == "1"
        if scale == "small":
            assert not grouped and ticks == data["metadata"]["prompt_tokens"][:-1]
        else:
            assert grouped and 2 <= len(ticks) < len(data["metadata"]["prompt_tokens"])
            assert all(
                re.fullmatch(r'txt \d+(–\d+)?( ".*")?|img r\d+(–\d+)?(c\d+)?', t) for t in ticks
            )
        # targets say what they are (region × direction), not "(p=1.000)"
        labels = page.locator(".link-graph text.difract-target-label").all_text_contents()
        assert labels[0] == target["clerp"] and "(p=" not in "".join(labels)
        assert labels[0].startswith(f'Target "{meta.target_labels[0]}"')
        # image panel: the generated image, one rect per patch, coloured for the clicked target
        assert page.evaluate("document.querySelector('img.difract-generated').naturalWidth") > 0
        patches = page.locator(".difract-image rect.patch")
        assert patches.count() == meta.grid[0] * meta.grid[1]
        filled = page.evaluate(
            "[...document.querySelectorAll('.difract-image rect.patch')]"
            ".filter(r => r.getAttribute('fill') !== 'none').length"
        )
        assert filled > 0
        assert "inputs to Target" in page.locator(".difract-caption").inner_text()
        assert page.locator(".difract-legend .difract-legend-bar").count() == 1
        assert "summed input weight" in page.locator(".difract-legend").inner_text()
        # the node-connections pane lists the target's inputs under their one name
        rows = page.locator(".node-connections .feature-row")
        assert rows.count() > 0
        _screenshot(page, tmp_path, f"graph-{scale}")
        # clicking a feature: its one name, and (no dashboards) this step's activations
        rows.filter(has_text=re.compile(r"^\W*(img|txt)_\d+ #")).first.click()
        title = page.locator(".feature-detail .feature-title")
        title.wait_for(timeout=5_000)
        assert re.match(r"(img|txt)_\d+ #\d+ @ (r\d+c\d+|t\d+:\S+)$", title.inner_text())
        page.wait_for_selector(".difract-this-step .difract-example", timeout=5_000)
        page.close()
    watch.check(server.url)


def test_two_thousand_nodes_are_legible(browser: Any, tmp_path: Path) -> None:
    """A row graph with ~2,400 shown nodes: nodes keep their own spot, labels do not collide."""
    graph, meta = synthetic_row_graph(seed=0, grid=(16, 16), n_txt=32, n_expanded=2500)
    data_dir = tmp_path / "graphs"
    path = write_graph_files(
        graph,
        meta,
        data_dir,
        "dense",
        image=synthetic_image(meta.grid, patch_px=8),
        node_threshold=0.95,
        feature_files=False,
    )
    expected = _shown_nodes(json.loads(path.read_text()))
    assert len(expected) >= 2000
    with serve(data_dir) as server:
        page = browser.new_page()
        watch = Watch(page)
        _open_graph(page, server.graph_url("dense"))
        _check_layout(page, len(expected))
        font = float(page.evaluate("document.body.dataset.difractFontSize"))
        centres = page.evaluate(CENTRES_JS)
        assert len(centres) == len(expected)
        # no two glyphs closer than 0.9 × their size (checked on a grid of buckets)
        buckets: dict[tuple[int, int], list[tuple[float, float]]] = {}
        close = []
        for x, y in centres:
            bx, by = int(x // font), int(y // font)
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for u, v in buckets.get((bx + dx, by + dy), []):
                        if ((u - x) ** 2 + (v - y) ** 2) ** 0.5 < 0.9 * font:
                            close.append(((x, y), (u, v)))
            buckets.setdefault((bx, by), []).append((x, y))
        assert font >= 5 and not close, (font, close[:5])
        _screenshot(page, tmp_path, "graph-2000-nodes")
        page.close()
    watch.check(server.url)


def test_dashboards_patches_and_faithfulness(browser: Any, tmp_path: Path) -> None:
    """With dashboards: labels as clerps, a patch click lists its features, a feature click
    outlines its patches and shows its dashboard (thumbnails with heat-maps); the report's
    faithfulness summary is shown."""
    dashboards = pytest.importorskip("difract_ext.dashboards.synthetic")
    data_dir = tmp_path / "graphs"
    graph, meta = synthetic_graph(seed=3, grid=(4, 4), n_txt=8, dead_positions=())
    sites = ["img_0", "txt_0", "img_1", "txt_1"]
    dashboards.synthetic_dashboards(data_dir / "dashboards" / "synthetic", sites, d_sae=100)
    path = write_graph_files(
        graph, meta, data_dir, "dash", image=synthetic_image(meta.grid), scan="synthetic"
    )
    data = json.loads(path.read_text())
    assert data["metadata"]["dashboards"] == "synthetic"
    shown = _shown_nodes(data)
    feats = [n for n in shown if "difract" in n]
    # the synthetic dashboards label every other feature: that label is the clerp
    for n in feats:
        even = n["difract"]["feature"] % 2 == 0
        assert n["clerp"].startswith("colour=") == even, n
    on_patch = [n for n in feats if n["difract"]["patch"]]
    r, c = on_patch[0]["difract"]["patch"]
    at_patch = [n for n in feats if n["difract"]["patch"] == [r, c]]  # what the list must hold
    best = max(at_patch, key=lambda n: n["activation"])
    d = best["difract"]
    from difract_ext.graphs.pages import write_dashboard_pages

    write_dashboard_pages(data_dir / "dashboards" / "synthetic", sites=[d["site"]], progress=False)
    report = {"faithfulness": {"summary": {"ablation_spearman": 0.875, "kl_spliced": 0.0125}}}
    (data_dir / "dash.report.json").write_text(json.dumps(report))

    with serve(data_dir) as server:
        page = browser.new_page()
        watch = Watch(page)
        _open_graph(page, server.graph_url("dash"))
        faith = page.locator(".difract-faithfulness")
        faith.wait_for(timeout=5_000)
        assert "ablation spearman 0.875" in faith.inner_text()
        assert "kl spliced 0.0125" in faith.inner_text()
        page.locator(".difract-image rect.patch").nth(r * meta.grid[1] + c).click()
        items = page.locator(".difract-patch-feature")
        assert items.count() == len(at_patch)
        assert f"features at r{r}c{c}" in page.locator(".difract-patch-features").inner_text()
        name = f"{d['site']} #{d['feature']} @ r{r}c{c}"
        if d["feature"] % 2 == 0:
            name += f' "{best["clerp"]}"'
        assert items.first.inner_text().startswith(name)
        items.first.click()
        page.wait_for_selector(".feature-detail .difract-dash .difract-example img", timeout=5_000)
        assert page.locator(".feature-detail .feature-title").inner_text() == name
        link = page.locator(".feature-detail a.difract-page-link").get_attribute("href")
        assert link == f"./dashboards/synthetic/pages/{d['site']}.html#{d['feature']}"
        payload = json.loads(
            page.evaluate(
                f"fetch('./dashboards/synthetic/feature/{d['site']}/{d['feature']}.json')"
                ".then(r => r.text())"
            )
        )
        # where it fires in this graph's step, then its corpus examples
        assert page.locator(".feature-detail .difract-here .difract-example").count() == 1
        thumbs = page.locator(".feature-detail .difract-dash .difract-example")
        steps = {ex["step"] for ex in payload["examples"]}
        assert thumbs.count() == sum(
            min(4, sum(ex["step"] == s for ex in payload["examples"])) for s in steps
        )
        heat = page.locator(".feature-detail .difract-dash svg.difract-heat rect.heat")
        assert heat.count() == sum(
            sum(v > 0 for v in ex["patch_acts"])
            for s in steps
            for ex in [e for e in payload["examples"] if e["step"] == s][:4]
        )
        assert heat.count() > 0
        page.wait_for_function(
            "[...document.querySelectorAll('.difract-example img')].every(i => i.complete)"
        )
        same = [n for n in shown if n.get("difract", {}).get("site") == d["site"]]
        same = [
            n for n in same if n["difract"]["feature"] == d["feature"] and n["difract"]["patch"]
        ]
        assert page.locator(".difract-image rect.difract-feature-outline").count() == len(same)
        _screenshot(page, tmp_path, "graph-dashboards")
        page.close()
    watch.check(server.url, allowed_failures=("/features/",))


def test_empty_folder_says_so(browser: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(empty) as server:
        page = browser.new_page()
        watch = Watch(page)
        page.goto(server.url)
        message = page.locator(".difract-empty")
        message.wait_for(timeout=10_000)
        text = message.inner_text()
        assert "No graphs in this folder (empty)" in text and "difract attribute" in text
        _screenshot(page, tmp_path, "empty-folder")
        page.close()
    watch.check(server.url)


def test_static_dashboard_pages(browser: Any, tmp_path: Path) -> None:
    """The per-dictionary page opens from a file and from `difract serve`: search, dashboard,
    heat-maps and token highlights."""
    dashboards = pytest.importorskip("difract_ext.dashboards.synthetic")
    from difract_ext.graphs.pages import write_dashboard_pages

    data_dir = tmp_path / "graphs"
    dash = dashboards.synthetic_dashboards(
        data_dir / "dashboards" / "synthetic", ["img_0", "txt_1"], d_sae=12
    )
    write_dashboard_pages(dash, progress=False)
    page = browser.new_page()
    watch = Watch(page)
    page.goto((dash / "pages" / "img_0.html").as_uri() + "#6")
    page.wait_for_selector("#main .difract-dash .difract-example img", timeout=5_000)
    # the synthetic dashboards label even features colour=red/blue/green by feature % 3
    assert (
        page.locator("#main .difract-dash-title")
        .inner_text()
        .startswith('img_0 #6 "colour=red" F1 0.95')
    )
    assert page.locator("#main svg.difract-heat rect.heat").count() > 0
    assert page.locator("#rows .row").count() == 12
    page.fill("#search", "colour=red")
    assert page.locator("#rows .row").count() == len([f for f in range(0, 12, 2) if f % 3 == 0])
    page.fill("#search", "#5")
    assert page.locator("#rows .row").all_text_contents()[0].startswith("#5")
    _screenshot(page, tmp_path, "dashboard-page-file")
    page.close()
    watch.check(dash.as_uri())

    with serve(data_dir) as server:
        page = browser.new_page()
        watch = Watch(page)
        page.goto(server.url + "dashboards/synthetic/pages/txt_1.html#3")
        page.wait_for_selector("#main .difract-dash .difract-example img", timeout=5_000)
        assert page.locator("#main .difract-example .difract-tok.active").count() > 0
        assert page.locator("#main svg.difract-heat").count() == 0  # a text-stream feature
        page.close()
    watch.check(server.url)
