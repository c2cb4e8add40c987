"""Static HTML pages of feature dashboards: one searchable page per dictionary.

``write_dashboard_pages(DASH)`` writes, inside the dashboard folder,

- ``DASH/pages/index.html``: the dictionaries (sites) with their feature counts and labelled
  features;
- ``DASH/pages/{site}.html``: every feature of one dictionary in a searchable list (index,
  label, label F1, max activation, density; the rows are embedded in the page), and beside it
  the clicked feature's dashboard (its label, profile over t, strongest tokens, top examples per
  step as thumbnails with the patch heat-map and token highlights);
- ``DASH/pages/{site}/f{feature}.js``: one feature's ``DashboardStore.feature_payload``, loaded
  by a ``<script>`` tag (never ``fetch``), so the pages open from ``file://`` as well as from
  ``difract serve`` (``/dashboards/{scan}/pages/{site}.html``).

The page's script and style are the frontend's own (``assets/difract/difract-dashboard.js``,
``difract.css``), inlined. ``pages/{site}.html#123`` opens feature 123.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from difract_ext.graphs.dashlinks import open_dashboards
from difract_ext.graphs.server import ASSETS_DIR
from difract_ext.util.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from difract_ext.dashboards.store import DashboardStore
    from difract_ext.flux.sites import Site

logger = logging.getLogger(__name__)

__all__ = ["compact_payload", "write_dashboard_pages"]

_DIGITS = 4


def compact_payload(obj: Any, digits: int = _DIGITS) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits (smaller files)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: compact_payload(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [compact_payload(v, digits) for v in obj]
    return obj


def _script_json(obj: Any) -> str:
    """JSON safe inside a ``<script>`` element."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


_PAGE = """<!DOCTYPE html>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }}
#list {{ flex: 0 0 360px; border-right: 1px solid #ddd; display: flex; flex-direction: column; }}
#search {{ margin: 8px; padding: 4px; font-size: 14px; }}
#rows {{ overflow-y: auto; flex: 1; font-size: 12px; }}
.row {{ padding: 2px 8px; cursor: pointer; display: flex; gap: 6px; }}
.row:hover, .row.on {{ background: #f3e5f5; }}
.row .i {{ flex: 0 0 48px; color: #777; font-variant-numeric: tabular-nums; }}
.row .l {{ flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.row .n {{ color: #777; font-variant-numeric: tabular-nums; }}
#main {{ flex: 1; overflow-y: auto; padding: 8px 16px; }}
#main .difract-example {{ width: 150px; }}
h1 {{ font-size: 16px; margin: 8px; }}
{css}
</style>
<div id="list">
  <h1>{heading}</h1>
  <input id="search" type="search" placeholder="search: feature index or label" autofocus>
  <div id="count" class="difract-dash-h" style="margin: 0 8px"></div>
  <div id="rows"></div>
</div>
<div id="main"><div class="difract-dash-h">Click a feature to see its dashboard.</div></div>
<script>
{dashboard_js}
</script>
<script>
var SITE = {site_json};
var FEATURES = {features_json};
var loading = null;
var rowsEl = document.getElementById('rows');
var searchEl = document.getElementById('search');
function fmt(v) {{ return difractDashboard.fmt(v, 2); }}
function show(list) {{
  rowsEl.innerHTML = '';
  list.slice(0, 2000).forEach(function (f) {{
    var row = difractDashboard.el('div', 'row', rowsEl);
    row.dataset.feature = f.index;
    difractDashboard.el('span', 'i', row, '#' + f.index);
    difractDashboard.el('span', 'l', row, f.label ? f.label + ' (F1 ' + fmt(f.label_f1) + ')' : '');
    difractDashboard.el('span', 'n', row, 'max ' + fmt(f.act_max));
    row.onclick = function () {{ location.hash = String(f.index); }};
  }});
  document.getElementById('count').textContent = list.length + ' of ' + FEATURES.length +
    ' features' + (list.length > 2000 ? ' (first 2000 listed)' : '');
}}
function filter() {{
  var q = searchEl.value.trim().toLowerCase();
  show(FEATURES.filter(function (f) {{
    return !q || String(f.index) === q.replace('#', '') ||
      (f.label && f.label.toLowerCase().indexOf(q) >= 0);
  }}));
}}
searchEl.oninput = filter;
window.difractFeatureLoaded = function (payload) {{
  if (loading !== payload.index) return;
  difractDashboard.renderDashboard(document.getElementById('main'), payload,
    {{base: '../', maxPerStep: 8}});
}};
function openFeature() {{
  var i = parseInt(location.hash.slice(1));
  if (isNaN(i)) return;
  loading = i;
  [].forEach.call(rowsEl.children, function (r) {{
    r.classList.toggle('on', +r.dataset.feature === i);
  }});
  var s = document.createElement('script');
  s.src = SITE + '/f' + i + '.js';
  s.onerror = function () {{
    document.getElementById('main').textContent = 'no dashboard file for feature ' + i;
  }};
  document.body.appendChild(s);
}}
window.onhashchange = openFeature;
filter();
openFeature();
</script>
"""

_INDEX = """<!DOCTYPE html>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; }}
td {{ padding: 2px 12px; }}
</style>
<h1>{title}</h1>
<p>{about}</p>
<table>
<tr><th>dictionary</th><th>kind</th><th>features</th><th>labelled (F1 ≥ 0.9)</th></tr>
{rows}
</table>
"""


def _sort_key(row: dict[str, Any]) -> tuple[int, float, int]:
    f1 = row.get("label_f1")
    return (0 if row.get("label") else 1, -(f1 or 0.0), int(row["index"]))


def write_dashboard_pages(
    dashboards: DashboardStore | str | Path,
    sites: Iterable[Site | str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write the static pages of a dashboard folder (see the module docstring).

    Args:
        dashboards: a ``DashboardStore`` or its folder.
        sites: the dictionaries to write pages for (default: all).
        out: the pages folder; default ``DASH/pages`` (example images are read from ``../``
            relative to it, so keep it inside the dashboard folder).
        progress: show a progress bar over the features.

    Returns:
        The written ``{site}.html`` paths (then ``index.html``).
    """
    store = open_dashboards(dashboards)
    if store is None:
        raise ValueError("give a dashboard folder or a DashboardStore")
    out_dir = Path(out) if out is not None else Path(store.path) / "pages"
    chosen = [store.info(s).site for s in sites] if sites is not None else list(store.sites)
    css = (ASSETS_DIR / "difract" / "difract.css").read_text()
    dashboard_js = (ASSETS_DIR / "difract" / "difract-dashboard.js").read_text()
    scan = store.scan
    written: list[Path] = []
    summary_rows = []
    for site in chosen:
        info = store.info(site)
        rows = sorted(store.feature_summaries(site), key=_sort_key)
        for f in tqdm(
            range(info.d_sae), desc=f"pages {site}", disable=not progress, unit="feature"
        ):
            payload = compact_payload(store.feature_payload(site, f))
            body = f"window.difractFeatureLoaded({_script_json(payload)});\n"
            atomic_write_bytes(out_dir / str(site) / f"f{f}.js", body.encode())
        title = f"{scan} · {site} ({info.kind}, {info.d_sae} features)"
        page = _PAGE.format(
            title=html.escape(title),
            heading=html.escape(title),
            css=css,
            dashboard_js=dashboard_js.replace("</script", "<\\/script"),
            site_json=_script_json(str(site)),
            features_json=_script_json(compact_payload(rows)),
        )
        path = atomic_write_bytes(out_dir / f"{site}.html", page.encode())
        written.append(path)
        good = sum(1 for r in rows if r.get("label") and (r.get("label_f1") or 0) >= 0.9)
        summary_rows.append(
            f'<tr><td><a href="{site}.html">{site}</a></td><td>{html.escape(info.kind)}</td>'
            f"<td>{info.d_sae}</td><td>{good}</td></tr>"
        )
        logger.info("dashboard page written: %s", path)
    index = _INDEX.format(
        title=html.escape(f"feature dashboards: {scan}"),
        about=html.escape(
            f"model {store.index.get('model')}; {len(store.index.get('prompts', []))} prompts × "
            f"{len(store.index.get('seeds', []))} seeds, {store.index.get('num_inference_steps')} "
            "steps"
        ),
        rows="\n".join(summary_rows),
    )
    written.append(atomic_write_bytes(out_dir / "index.html", index.encode()))
    return written
