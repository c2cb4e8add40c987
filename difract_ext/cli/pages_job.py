"""``difract dashboards-page`` and ``difract dashboard-png``: render feature dashboards.

Argument parsing only; the work is :func:`difract_ext.graphs.pages.write_dashboard_pages` and
:func:`difract_ext.graphs.dashboard_png.write_dashboard_png`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difract_ext.cli.argtypes import nonnegative_int, positive_int


def _cmd_pages(args: argparse.Namespace) -> int:
    from difract_ext.graphs.pages import write_dashboard_pages

    paths = write_dashboard_pages(args.dash, sites=args.site or None, out=args.out)
    for path in paths:
        print(path)
    index = paths[-1]
    print(
        f"open {index} in a browser (file:// works), or serve it: "
        f"difract serve GRAPHS --dashboards {args.dash}"
    )
    return 0


def _cmd_png(args: argparse.Namespace) -> int:
    from difract_ext.graphs.dashboard_png import write_dashboard_png

    out = args.out or f"{args.site}-{args.feature}.png"
    print(write_dashboard_png(args.dash, args.site, args.feature, Path(out), args.per_step))
    return 0


def add_pages_commands(sub: Any) -> None:
    """Register ``dashboards-page`` and ``dashboard-png`` on the ``difract`` sub-parser."""
    p = sub.add_parser(
        "dashboards-page",
        help="static HTML pages of a dashboard folder: one searchable page per dictionary",
        description=(
            "Write DASH/pages/index.html and DASH/pages/{site}.html (searchable list of the "
            "features; click one for its dashboard) with one {site}/f{i}.js per feature. The "
            "pages open from file:// and are served by `difract serve` under "
            "/dashboards/{scan}/pages/."
        ),
    )
    p.add_argument("dash", metavar="DASH", help="dashboard folder (`difract dashboards`)")
    p.add_argument("--site", action="append", help="only this dictionary, e.g. img_1 (repeatable)")
    p.add_argument("--out", help="pages folder (default DASH/pages; keep it inside DASH)")
    p.set_defaults(func=_cmd_pages)

    q = sub.add_parser(
        "dashboard-png",
        help="one feature's dashboard as a PNG (matplotlib)",
        description="Title and label, profile over t, histogram, top examples with heat-maps.",
    )
    q.add_argument("dash", metavar="DASH", help="dashboard folder (`difract dashboards`)")
    q.add_argument("site", metavar="SITE", help="dictionary, e.g. img_1")
    q.add_argument("feature", metavar="FEATURE", type=nonnegative_int, help="feature index")
    q.add_argument("--out", help="PNG path (default SITE-FEATURE.png)")
    q.add_argument(
        "--per-step", type=positive_int, default=4, help="examples shown per step (default 4)"
    )
    q.set_defaults(func=_cmd_png)
