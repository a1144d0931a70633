"""The web chat page at ``/``: plain HTML, CSS and ES modules shipped in ``static/``, no build step.

The page is a client of the public API like any other (``/v1/models``, ``/v1/chat/completions`` with
``stream: true``), so nothing here knows about generation. Every response carries a Content-Security-Policy
that allows the page's own files only: model output is untrusted text, and even if some of it ever reached
the DOM as markup, no inline script, no other host and no ``eval`` would run. The files are read once at
start-up (a handful of small text files), so a request never touches the disk.
"""

from __future__ import annotations

import mimetypes
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from qwen3.server.errors import APIError

ASSET_PREFIX = "/ui/"
# 'self' only: no CDN, no inline script or style attribute, no eval; fetches go to this server alone.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new qwen3 version must not run an old page's scripts
}


def _assets() -> dict[str, tuple[bytes, str]]:
    """Every file of ``static/`` by name, with its media type."""
    mimetypes.add_type("text/javascript", ".js")  # some systems' tables map .js elsewhere
    folder = resources.files("qwen3.server") / "static"
    assets = {}
    for entry in folder.iterdir():
        if entry.is_file():
            media_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if media_type.startswith("text/") or media_type.endswith(("javascript", "json", "svg+xml")):
                media_type += "; charset=utf-8"
            assets[entry.name] = (entry.read_bytes(), media_type)
    return assets


def install_web_ui(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/ui/``."""
    assets = _assets()

    def asset(name: str) -> Response:
        if name not in assets:
            raise APIError(404, f"no such file: {ASSET_PREFIX}{name}", code="not_found")
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        """The chat page."""
        return asset("index.html")

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    async def favicon() -> Response:
        """Browsers ask for it on any page of the server (/health, /docs), whatever the page says."""
        return asset("icon.svg")

    @app.api_route(ASSET_PREFIX + "{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def ui_file(name: str) -> Response:
        """The page's scripts, styles and icon."""
        return asset(name)


def page_url(host: str, port: int) -> str:
    """The address to open in a browser: a wildcard bind is reachable on loopback."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"
