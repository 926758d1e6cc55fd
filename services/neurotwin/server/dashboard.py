"""The live session dashboard at ``/ui/`` on the HTTP listener: a read-only view of the closed-loop
sessions in the journal, for people watching a rig.

``/ui/`` is one static page (HTML, JS and CSS shipped as package data, no build step) that polls the
JSON below and draws it; ``reports.session_live`` computes what it shows, from the same summary as
``rig-sim --report``. Routes (all GET, all behind the bearer token or the login cookie of
``dashboard_auth``):

- ``/ui/api/sessions``: every session with its status and best score, newest first;
- ``/ui/api/sessions/{id}``: one session's score per generation, best stimuli with measured and
  confirmed scores, last generation; ``ETag`` is the journal revision, so a poll that finds nothing
  new is a 304 after one indexed read;
- ``/ui/api/sessions/{id}/images/{generation}/{index}``: a stimulus as the rig got it (PNG/JPEG);
- ``/ui/api/sessions/{id}/export.nwb`` / ``export.h5``: the session's NWB or HDF5 export, written by
  the same code as ``ExportSession``;
- ``/ui/sessions/{id}/report``: the static report's page and figures (``/figures/{name}.png``), live.

Every response forbids framing and sniffing; the pages' Content-Security-Policy allows scripts and
styles from this server only (no inline script), so text from a session can never run as code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from neurotwin.errors import NotFound
from neurotwin.reports.session_live import LiveSessions, summary_json
from neurotwin.reports.session_report import FIGURES, render_html
from neurotwin.reports.session_summary import StimulusScore
from neurotwin.server.dashboard_auth import CookieAuth

if TYPE_CHECKING:
    from neurotwin.engines.closed_loop import ClosedLoopEngine
    from neurotwin.server.common import GrpcServer

ASSET_PACKAGE = "neurotwin.server"
ASSET_FOLDER = "dashboard_assets"
# Files served under /ui/static/ and their types; nothing else in the folder is reachable.
STATIC_TYPES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
EXPORTS = {"nwb": ("nwb", ".nwb", "application/x-hdf5"), "h5": ("hdf5", ".h5", "application/x-hdf5")}
_IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))

_BASE_CSP = "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    + _BASE_CSP
)
API_CSP = "default-src 'none'; " + _BASE_CSP


def _style_hashes(page: str) -> str:
    """CSP sources for a page's inline <style> blocks (pages without scripts carry their CSS inline)."""
    blocks = re.findall(r"<style>(.*?)</style>", page, flags=re.S)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks
    )


def inline_page_csp(page: str) -> str:
    styles = _style_hashes(page) or "'none'"
    return f"default-src 'none'; img-src 'self'; style-src {styles}; {_BASE_CSP}"


def secured(response: Response, csp: str = API_CSP, cache: str = "no-cache") -> Response:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Not "no-referrer": that makes browsers send "Origin: null" on the login form's POST.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers.setdefault("Cache-Control", cache)
    return response


def _etag_matches(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match", "")
    return any(candidate.strip() in (etag, "*") for candidate in wanted.split(","))


def _json(request: Request, data: Any, etag: str | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    etag = etag or f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if _etag_matches(request, etag):
        return secured(Response(status_code=304, headers={"ETag": etag}))
    return secured(Response(body, media_type="application/json", headers={"ETag": etag}))


def image_type(data: bytes) -> str:
    return next((kind for magic, kind in _IMAGE_TYPES if data.startswith(magic)), "application/octet-stream")


def _safe_file_name(session_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", session_id).strip(".") or "session"


def load_assets() -> dict[str, str]:
    folder = resources.files(ASSET_PACKAGE) / ASSET_FOLDER
    names = ("index.html", "login.html", *STATIC_TYPES)
    return {name: (folder / name).read_text(encoding="utf-8") for name in names}


class Dashboard:
    def __init__(
        self, engine: ClosedLoopEngine, auth: CookieAuth, assets: dict[str, str], refresh_seconds: float = 1.0
    ) -> None:
        self.engine = engine
        self.live = LiveSessions(engine.journal, min_interval_s=refresh_seconds)
        self.auth = auth
        self.assets = assets
        self._static_etags = {
            name: f'"{hashlib.sha256(assets[name].encode()).hexdigest()[:32]}"' for name in STATIC_TYPES
        }

    def routes(self) -> list[Route]:
        auth = self.auth
        return [
            Route("/ui", lambda request: RedirectResponse("ui/", status_code=308)),
            Route("/ui/", self.index),
            Route("/ui/login", self.login_page, methods=["GET"]),
            Route("/ui/login", self.login, methods=["POST"]),
            Route("/ui/logout", auth.logout, methods=["POST"]),
            Route("/ui/static/{name}", self.static),
            Route("/ui/api/sessions", self.sessions),
            Route("/ui/api/sessions/{session_id}", self.session),
            Route("/ui/api/sessions/{session_id}/images/{generation:int}/{index:int}", self.image),
            Route("/ui/api/sessions/{session_id}/export.{fmt}", self.export),
            Route("/ui/sessions/{session_id}/report", self.report),
            Route("/ui/sessions/{session_id}/figures/{name}.png", self.figure),
        ]

    # -- pages and assets --------------------------------------------------------------------------
    def index(self, request: Request) -> Response:
        return secured(HTMLResponse(self.assets["index.html"]), PAGE_CSP)

    async def login_page(self, request: Request) -> Response:
        response = await self.auth.login_page(request)
        return secured(response, inline_page_csp(self.assets["login.html"]), cache="no-store")

    async def login(self, request: Request) -> Response:
        response = await self.auth.login(request)
        return secured(response, inline_page_csp(self.assets["login.html"]), cache="no-store")

    def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_TYPES:
            raise NotFound(f"no dashboard file {name!r}")
        etag = self._static_etags[name]
        if _etag_matches(request, etag):
            return secured(Response(status_code=304, headers={"ETag": etag}))
        return secured(Response(self.assets[name], media_type=STATIC_TYPES[name], headers={"ETag": etag}))

    # -- JSON --------------------------------------------------------------------------------------
    def sessions(self, request: Request) -> Response:
        return _json(request, {"sessions": self.live.sessions()})

    def session(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        snapshot = self.live.snapshot(session_id)
        etag = f'"rev-{snapshot.revision}"'
        if _etag_matches(request, etag):
            return secured(Response(status_code=304, headers={"ETag": etag}))
        base = f"{urllib.parse.quote(session_id, safe='')}"

        def image_url(stimulus: StimulusScore) -> str:
            return f"api/sessions/{base}/images/{stimulus.generation}/{stimulus.index}"

        data = summary_json(snapshot, image_url)
        data["exports"] = [
            {"label": "NWB", "url": f"api/sessions/{base}/export.nwb"},
            {"label": "HDF5", "url": f"api/sessions/{base}/export.h5"},
        ]
        data["report_url"] = f"sessions/{base}/report"
        return _json(request, data, etag)

    # -- files -------------------------------------------------------------------------------------
    def image(self, request: Request) -> Response:
        p = request.path_params
        data, sha256 = self.live.image(p["session_id"], p["generation"], p["index"])
        etag = f'"{sha256}"'
        if _etag_matches(request, etag):
            return secured(Response(status_code=304, headers={"ETag": etag}))
        # A (session, generation, index) never changes its pixels once proposed.
        response = Response(data, media_type=image_type(data), headers={"ETag": etag})
        return secured(response, cache="private, max-age=86400")

    def export(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        kind = EXPORTS.get(request.path_params["fmt"])
        if kind is None:
            raise NotFound(f"no export format {request.path_params['fmt']!r}: export.nwb or export.h5")
        fmt, suffix, media_type = kind
        folder = Path(tempfile.mkdtemp(prefix="neurotwin-ui-export-"))
        try:
            path = self.engine.export(session_id, folder / f"{_safe_file_name(session_id)}{suffix}", fmt)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        response = FileResponse(
            path,
            media_type=media_type,
            filename=path.name,
            background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
        )
        return secured(response, cache="no-store")

    def report(self, request: Request) -> Response:
        """The static report's page for this session as it is now (figures rendered by matplotlib)."""
        session_id = request.path_params["session_id"]
        snapshot = self.live.snapshot(session_id)
        summary = snapshot.summary
        base = urllib.parse.quote(session_id, safe="")
        # Relative to /ui/sessions/{id}/report. Figures answer with the revision as ETag and no-cache,
        # so a reload shows the current ones.
        figures = {name: f"figures/{name}.png" for name in FIGURES}
        shown = [*summary.best, *summary.last_generation]
        if summary.best_natural is not None:
            shown.append(summary.best_natural)
        images = {s.stimulus_id: f"../../api/sessions/{base}/images/{s.generation}/{s.index}" for s in shown}
        exports = [
            (f"{_safe_file_name(session_id)}.nwb (NWB)", f"../../api/sessions/{base}/export.nwb"),
            (f"{_safe_file_name(session_id)}.h5 (HDF5)", f"../../api/sessions/{base}/export.h5"),
        ]
        page = render_html(summary, figures, images, exports)
        return secured(HTMLResponse(page), inline_page_csp(page), cache="no-store")

    def figure(self, request: Request) -> Response:
        session_id, name = request.path_params["session_id"], request.path_params["name"]
        snapshot = self.live.snapshot(session_id)
        etag = f'"rev-{snapshot.revision}"'
        if _etag_matches(request, etag):
            return secured(Response(status_code=304, headers={"ETag": etag}))
        png = self.live.figure(snapshot, name)
        return secured(Response(png, media_type="image/png", headers={"ETag": etag}))


def attach(server: GrpcServer, engine: ClosedLoopEngine, refresh_seconds: float = 1.0) -> Dashboard:
    """Add ``/ui`` to the server's HTTP listener (which must exist) for ``engine``'s journal;
    ``refresh_seconds``: the least time between two summaries of a running session."""
    http = server.http
    assert http is not None, "the server has no HTTP listener (http_port)"
    assets = load_assets()
    settings = server.settings
    tls = bool(settings.tls_cert and settings.tls_key)
    auth = CookieAuth(settings.tokens(), secure=tls, login_page=assets["login.html"])
    dashboard = Dashboard(engine, auth, assets, refresh_seconds)
    http.add_browser_auth(auth)
    http.add_routes(dashboard.routes())
    return dashboard
