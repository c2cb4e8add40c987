"""Serve a folder of graph files with circuit-tracer's frontend (our patched copy of its assets).

Builds on circuit-tracer's ``frontend.local_server`` (its request handler and ``Server``
life-cycle: daemon thread, ``stop()`` also at exit) with the same routes:

- ``GET /data/<file>`` and ``GET /graph_data/<file>``: files of the data folder
  (``graph-metadata.json``, ``{slug}.json``, ``{slug}.png``), with their real content type;
- ``GET /features/<path>``: ``{data}/features/<path>`` (local feature files);
- ``POST /save_graph/<slug>``: replaces the ``qParams`` of ``{slug}.json`` (the Save button);
- ``GET /report/<slug>.json``: the graph's ``{slug}.report.json`` (``null`` when there is none);
- ``GET /dashboards/index.json``: the feature dashboards it knows, by scan name
  (``DIR/dashboards/*/``, ``--dashboards`` folders, the shipped shapes dashboards), with their
  sites and static pages; ``GET /dashboards/<scan>/feature/<site>/<feature>.json``: one feature's
  dashboard (``DashboardStore.feature_payload``); ``GET /dashboards/<scan>/<path>``: a file of
  that folder (example images, ``pages/``);
- anything else: a static file of the assets folder (``index.html`` for ``/``).

A folder without ``graph-metadata.json`` is served as an empty index (``{"graphs": []}``); the
page then says that the folder holds no graphs and how to write some.

Unlike the stock server it binds ``127.0.0.1`` only, serves several requests at once, and never
reads or writes outside its two folders: a request path is decoded once, rejected if it holds
``..``, a backslash, a NUL or an absolute part, and the resolved file (symlinks followed) must
lie inside the folder. Rejected paths are answered 404, like missing files. Directory listings
are off, and requests whose ``Host`` is not a loopback name are refused (DNS rebinding).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import http.server
import json
import logging
import mimetypes
import threading
import urllib.parse
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from circuit_tracer.frontend.local_server import CircuitGraphHandler, Server
from typing_extensions import Self

from difract_ext.graphs.dashlinks import dashboard_folders, read_dashboard_index
from difract_ext.graphs.schema import GRAPH_METADATA_FILE, validate_slug
from difract_ext.util.atomic import atomic_write_json
from difract_ext.util.files import BadFileError, read_json

logger = logging.getLogger(__name__)

#: The patched copy of circuit-tracer's frontend assets shipped with this package.
ASSETS_DIR = Path(str(files("difract_ext.graphs") / "assets"))
DEFAULT_PORT = 8041
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
COMPRESSION_THRESHOLD_BYTES = 1024**2
MAX_POST_BYTES = 16 * 1024**2
#: seconds of client silence before a request is dropped (see ``GraphRequestHandler.timeout``)
REQUEST_TIMEOUT_S = 10


def safe_resolve(root: Path, rel: str) -> Path | None:
    """The file ``rel`` (already URL-decoded, ``/``-separated) inside ``root``, or ``None``.

    ``None`` when ``rel`` has a ``..`` segment, a backslash, a NUL, a drive or absolute part,
    or when the resolved path (symlinks followed) is not inside ``root``.
    """
    if "\x00" in rel or "\\" in rel:
        return None
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." or ":" in p for p in parts) or rel.startswith("/"):
        return None
    base = root.resolve()
    try:
        target = base.joinpath(*parts).resolve()
    except (OSError, RuntimeError):  # e.g. a symlink loop
        return None
    if target != base and base not in target.parents:
        return None
    return target


def _content_type(path: Path) -> str:
    if path.suffix == ".json":
        return "application/json"
    guessed = mimetypes.guess_type(path.name)[0]
    return guessed or "application/octet-stream"


class Dashboards:
    """The dashboard folders a server knows (scan name → folder), their stores opened lazily."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def store(self, scan: str) -> Any:
        from difract_ext.dashboards.store import DashboardStore

        with self._lock:
            if scan not in self._stores:
                self._stores[scan] = DashboardStore.open(self.folders[scan])
            return self._stores[scan]

    def listing(self) -> dict[str, Any]:
        """``{"scans": {scan: {"model", "sites", "pages"}}}`` for the page."""
        scans: dict[str, Any] = {}
        for scan, folder in self.folders.items():
            index = read_dashboard_index(folder) or {}
            sites = {
                k: {f: v.get(f) for f in ("kind", "d_sae", "stream", "layer")}
                for k, v in dict(index.get("sites") or {}).items()
            }
            pages = {
                site: f"dashboards/{scan}/pages/{site}.html"
                for site in sites
                if (folder / "pages" / f"{site}.html").is_file()
            }
            scans[scan] = {"model": index.get("model"), "sites": sites, "pages": pages}
        return {"scans": scans}


class BadRequest(Exception):
    """A request the server answers with a 4xx (``status``) and a message, not a traceback."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GraphRequestHandler(CircuitGraphHandler):
    """circuit-tracer's handler with every path confined to the data or the assets folder."""

    server_version = "difract-graphs"
    #: seconds a connection may stay silent (a body shorter than its Content-Length, a client
    #: that never sends its request): the socket times out and the thread is freed
    timeout = REQUEST_TIMEOUT_S

    def __init__(
        self,
        *args: Any,
        frontend_dir: Path,
        data_dir: Path,
        dashboards: Dashboards | None = None,
        **kwargs: Any,
    ) -> None:
        self.frontend_root = Path(frontend_dir).resolve()
        self.data_root = Path(data_dir).resolve()
        self.dashboards = dashboards or Dashboards({})
        super().__init__(*args, frontend_dir=self.frontend_root, data_dir=self.data_root, **kwargs)

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), fmt % args)

    # --- request entry points -------------------------------------------------------------

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        self._guarded("GET", lambda: self._get(head_only=False))

    def do_HEAD(self) -> None:
        if not self._host_ok():
            return
        self._guarded("HEAD", lambda: self._get(head_only=True))

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        self._guarded("POST", self._post)

    def _guarded(self, method: str, handle: Any) -> None:
        """Run a request; a client that went away or stalled is dropped, a bad request gets a
        4xx, and only our own faults a 500 (logged with the traceback)."""
        try:
            handle()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except TimeoutError:
            logger.warning("%s %s: client too slow (%ds); dropped", method, self.path, self.timeout)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_error(408, "request timed out")
        except BadRequest as e:
            logger.warning("%s %s: %s", method, self.path, e)
            self.send_error(e.status, str(e))
        except Exception:
            logger.exception("error handling %s %s", method, self.path)
            self.send_error(500)

    # --- helpers --------------------------------------------------------------------------

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name in LOOPBACK_HOSTS:
            return True
        self.send_error(403, "only loopback host names are served")
        return False

    def _url_path(self) -> str | None:
        raw = urllib.parse.urlsplit(self.path).path
        try:
            decoded = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        # a path that still decodes differently (double encoding) is refused
        return None if "%" in decoded else decoded

    def _get(self, head_only: bool) -> None:
        path = self._url_path()
        if path is None:
            self.send_error(404)
            return
        if path in (f"/data/{GRAPH_METADATA_FILE}", f"/graph_data/{GRAPH_METADATA_FILE}"):
            if not (self.data_root / GRAPH_METADATA_FILE).is_file():  # an empty folder
                self._send_json({"graphs": [], "empty_folder": self.data_root.name}, head_only)
                return
        if path.startswith("/report/") and path.endswith(".json"):
            self._send_report(path[len("/report/") : -len(".json")], head_only)
            return
        if path.startswith("/dashboards/"):
            self._send_dashboards(path[len("/dashboards/") :], head_only)
            return
        for prefix, root in (
            ("/data/", self.data_root),
            ("/graph_data/", self.data_root),
            ("/features/", self.data_root / "features"),
        ):
            if path.startswith(prefix):
                self._send_file(safe_resolve(root, path[len(prefix) :]), head_only)
                return
        rel = path.lstrip("/") if path != "/" else "index.html"
        self._send_file(safe_resolve(self.frontend_root, rel), head_only)

    def _send_json(self, obj: Any, head_only: bool) -> None:
        content = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head_only:
            self.wfile.write(content)

    def _send_report(self, slug: str, head_only: bool) -> None:
        try:
            validate_slug(slug)
        except ValueError:
            self.send_error(404)
            return
        target = safe_resolve(self.data_root, f"{slug}.report.json")
        report = None
        if target is not None and target.is_file():
            try:
                report = json.loads(target.read_text())
            except ValueError:
                logger.warning("%s is not valid JSON: not shown", target)
        self._send_json(report, head_only)

    def _send_dashboards(self, rel: str, head_only: bool) -> None:
        if rel == "index.json":
            self._send_json(self.dashboards.listing(), head_only)
            return
        scan, _, rest = rel.partition("/")
        folder = self.dashboards.folders.get(scan)
        if folder is None or not rest:
            self.send_error(404)
            return
        parts = rest.split("/")
        if len(parts) == 3 and parts[0] == "feature" and parts[2].endswith(".json"):
            from difract_ext.flux.sites import Site, SiteError

            try:
                site = Site.parse(parts[1])
                feature = int(parts[2][: -len(".json")])
                payload = self.dashboards.store(scan).feature_payload(site, feature)
            except (ValueError, SiteError):  # DashboardError is a ValueError
                self.send_error(404)
                return
            self._send_json(payload, head_only)
            return
        self._send_file(safe_resolve(folder, rest), head_only)

    def _send_file(self, target: Path | None, head_only: bool) -> None:
        if target is None or not target.is_file():
            self.send_error(404)
            return
        content = target.read_bytes()
        encoding = None
        accepts = self.headers.get("Accept-Encoding", "")
        if len(content) > COMPRESSION_THRESHOLD_BYTES and "gzip" in accepts:
            content, encoding = gzip.compress(content, compresslevel=3), "gzip"
        self.send_response(200)
        self.send_header("Content-Type", _content_type(target))
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.end_headers()
        if not head_only:
            self.wfile.write(content)

    def _post(self) -> None:
        path = self._url_path()
        prefix = "/save_graph/"
        if path is None or not path.startswith(prefix):
            self.send_error(404)
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self.send_error(415, "expected application/json")  # also blocks simple CSRF forms
            return
        try:
            slug = validate_slug(path[len(prefix) :])
        except ValueError:
            self.send_error(404)
            return
        target = safe_resolve(self.data_root, f"{slug}.json")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest(400, "Content-Length is not an integer") from None
        if target is None or not target.is_file():
            self.send_error(404)
            return
        if not 0 < length <= MAX_POST_BYTES:
            self.send_error(413)
            return
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise BadRequest(400, f"body ended after {len(raw)} of {length} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(400, f"body is not JSON ({e})") from None
        if not isinstance(body, dict) or not isinstance(body.get("qParams"), dict):
            self.send_error(400, "expected {'qParams': {...}}")
            return
        try:
            graph = read_json(target, "graph file")
        except BadFileError as e:
            raise BadRequest(422, f"cannot update it: {e}") from None
        graph["qParams"] = body["qParams"]
        atomic_write_json(target, graph)
        logger.info("saved qParams of %s", slug)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def list_directory(self, path: str | Any) -> None:  # never list folders
        self.send_error(404)


class _ThreadingServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class GraphServer(Server):
    """circuit-tracer's ``Server`` (``stop()``, stopped at exit) plus ``host``/``port``/``url``."""

    def __init__(self, httpd: _ThreadingServer, thread: threading.Thread) -> None:
        super().__init__(httpd, thread)
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/`` (the graph page)."""
        return f"http://{self.host}:{self.port}/"

    def graph_url(self, slug: str) -> str:
        """The page showing graph ``slug``."""
        return f"{self.url}index.html?slug={urllib.parse.quote(slug)}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    data_dir: str | Path,
    port: int = 0,
    host: str = "127.0.0.1",
    frontend_dir: str | Path | None = None,
    dashboards: list[str | Path] | tuple[str | Path, ...] = (),
) -> GraphServer:
    """Serve ``data_dir`` with the patched frontend in a daemon thread.

    Args:
        data_dir: folder written by :func:`difract_ext.graphs.files.write_graph_files`.
        port: TCP port; 0 picks a free one (read it from the result's ``.port``).
        host: ``127.0.0.1`` (or ``localhost``, which binds the same); anything else is refused.
        frontend_dir: assets folder; defaults to the packaged patched copy.
        dashboards: dashboard folders to serve besides ``data_dir/dashboards/*`` and the shipped
            ones (:func:`~difract_ext.graphs.dashlinks.dashboard_folders`; a graph uses the
            folder of its ``metadata.dashboards`` or ``metadata.scan``).

    Returns:
        A running server with ``.url``, ``.port`` and ``.stop()``.
    """
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"refusing to bind {host!r}: graphs are served on 127.0.0.1 only")
    data = Path(data_dir).resolve()
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    frontend = Path(frontend_dir).resolve() if frontend_dir else ASSETS_DIR.resolve()
    if not (frontend / "index.html").is_file():
        raise FileNotFoundError(f"{frontend} has no index.html")
    if not (data / GRAPH_METADATA_FILE).is_file():
        logger.warning(
            "%s holds no graphs yet (no %s): the page will say so; write one with "
            "`difract attribute --prompt ... --target ... --out %s`",
            data,
            GRAPH_METADATA_FILE,
            data_dir,
        )
    boards = Dashboards(dashboard_folders(data, list(dashboards)))
    logger.info(
        "dashboards served: %s",
        ", ".join(f"{scan} ({folder})" for scan, folder in boards.folders.items()) or "none",
    )
    handler = functools.partial(
        GraphRequestHandler, frontend_dir=frontend, data_dir=data, dashboards=boards
    )
    try:
        httpd = _ThreadingServer(("127.0.0.1", port), handler)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        raise OSError(
            e.errno,
            f"port {port} is in use (another `difract serve`?); pass --port 0 for a free port, "
            "or another port",
        ) from None
    thread = threading.Thread(target=httpd.serve_forever, name="difract-graph-server", daemon=True)
    thread.start()
    server = GraphServer(httpd, thread)
    logger.debug("serving graphs of %s at %s", data, server.url)
    return server


def serve_forever(
    data_dir: str | Path,
    port: int = DEFAULT_PORT,
    ready: Callable[[GraphServer], None] | None = None,
    dashboards: list[str | Path] | tuple[str | Path, ...] = (),
) -> None:
    """Blocking variant for ``difract serve DIR``: serve until interrupted (Ctrl-C).

    Announces nothing itself; ``ready(server)`` runs once the server listens (``difract serve``
    prints its one banner there, with the real URL).
    """
    server = serve(data_dir, port=port, dashboards=dashboards)
    try:  # a Ctrl-C during ready() too must stop the (non-daemon) server thread
        if ready is not None:
            ready(server)
        server.server_thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
