"""The web client: its page at `/` and its files at `/static/<name>`, sent with headers that
keep anything a user typed from ever running as script."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from taskd.errors import NotFound

STATIC = Path(__file__).resolve().parent.parent / "static"
PAGE = STATIC / "index.html"
TYPES = {
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The files a request may name, fixed at import: no path is ever built from what a client sent.
ASSETS: dict[str, Path] = {
    path.name: path
    for path in sorted(STATIC.iterdir())
    if path.suffix in TYPES and path != PAGE and path.is_file()
}
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",  # modules from /static/ only: no inline script, no eval
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",  # fetch and EventSource: this origin only
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
    # No build step, hence no content-hashed names: revalidate every time (304 when unchanged).
    "Cache-Control": "no-cache",
}


def _file(path: Path) -> web.FileResponse:
    """The file with its type and the headers above; aiohttp adds ETag and Last-Modified."""
    return web.FileResponse(path, headers={**HEADERS, "Content-Type": TYPES[path.suffix]})


async def page(request: web.Request) -> web.FileResponse:
    """The web client's only page."""
    return _file(PAGE)


async def asset(request: web.Request) -> web.FileResponse:
    """One of the client's files by name; anything else is a JSON 404."""
    path = ASSETS.get(request.match_info["asset"])
    if path is None:
        raise NotFound()
    return _file(path)
