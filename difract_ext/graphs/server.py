"""Serve a folder of graph files with circuit-tracer's frontend (our patched copy of its assets).

Builds on circuit-tracer's ``frontend.local_server`` (its request handler and ``Server``
life-cycle: daemon thread, ``stop()`` also at exit) with the same routes:

- ``GET /data/<file>`` and ``GET /graph_data/<file>``: files of the data folder
  (``graph-metadata.json``, ``{slug}.json``, ``{slug}.png``), with their real content type;
- ``GET /features/<path>``: ``{data}/features/<path>`` (local feature files);
- ``POST /save_graph/<slug>``: replaces the ``qParams`` of ``{slug}.json`` (the Save button);
- anything else: a static file of the assets folder (``index.html`` for ``/``).

Unlike the stock server it binds ``127.0.0.1`` only, serves several requests at once, and never
reads or writes outside its two folders: a request path is decoded once, rejected if it holds
``..``, a backslash, a NUL or an absolute part, and the resolved file (symlinks followed) must
lie inside the folder. Rejected paths are answered 404, like missing files. Directory listings
are off, and requests whose ``Host`` is not a loopback name are refused (DNS rebinding).
"""

from __future__ import annotations

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

from difract_ext.graphs.schema import validate_slug
from difract_ext.util.atomic import atomic_write_json

logger = logging.getLogger(__name__)

#: The patched copy of circuit-tracer's frontend assets shipped with this package.
ASSETS_DIR = Path(str(files("difract_ext.graphs") / "assets"))
DEFAULT_PORT = 8041
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
COMPRESSION_THRESHOLD_BYTES = 1024**2
MAX_POST_BYTES = 16 * 1024**2


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


class GraphRequestHandler(CircuitGraphHandler):
    """circuit-tracer's handler with every path confined to the data or the assets folder."""

    server_version = "difract-graphs"

    def __init__(self, *args: Any, frontend_dir: Path, data_dir: Path, **kwargs: Any) -> None:
        self.frontend_root = Path(frontend_dir).resolve()
        self.data_root = Path(data_dir).resolve()
        super().__init__(*args, frontend_dir=self.frontend_root, data_dir=self.data_root, **kwargs)

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), fmt % args)

    # --- request entry points -------------------------------------------------------------

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        try:
            self._get(head_only=False)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            logger.exception("error handling GET %s", self.path)
            self.send_error(500)

    def do_HEAD(self) -> None:
        if not self._host_ok():
            return
        self._get(head_only=True)

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        try:
            self._post()
        except Exception:
            logger.exception("error handling POST %s", self.path)
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
        length = int(self.headers.get("Content-Length") or 0)
        if target is None or not target.is_file():
            self.send_error(404)
            return
        if not 0 < length <= MAX_POST_BYTES:
            self.send_error(413)
            return
        body = json.loads(self.rfile.read(length).decode("utf-8"))
        if not isinstance(body, dict) or not isinstance(body.get("qParams"), dict):
            self.send_error(400, "expected {'qParams': {...}}")
            return
        graph = json.loads(target.read_text())
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
) -> GraphServer:
    """Serve ``data_dir`` with the patched frontend in a daemon thread.

    Args:
        data_dir: folder written by :func:`difract_ext.graphs.files.write_graph_files`.
        port: TCP port; 0 picks a free one (read it from the result's ``.port``).
        host: ``127.0.0.1`` (or ``localhost``, which binds the same); anything else is refused.
        frontend_dir: assets folder; defaults to the packaged patched copy.

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
    handler = functools.partial(GraphRequestHandler, frontend_dir=frontend, data_dir=data)
    httpd = _ThreadingServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="difract-graph-server", daemon=True)
    thread.start()
    server = GraphServer(httpd, thread)
    logger.debug("serving graphs of %s at %s", data, server.url)
    return server


def serve_forever(
    data_dir: str | Path,
    port: int = DEFAULT_PORT,
    ready: Callable[[GraphServer], None] | None = None,
) -> None:
    """Blocking variant for ``difract serve DIR``: serve until interrupted (Ctrl-C).

    Announces nothing itself; ``ready(server)`` runs once the server listens (``difract serve``
    prints its one banner there, with the real URL).
    """
    server = serve(data_dir, port=port)
    try:  # a Ctrl-C during ready() too must stop the (non-daemon) server thread
        if ready is not None:
            ready(server)
        server.server_thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
