"""What every handler shares: body parsing, ids, If-Match, and the client as a proxy sees it."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from typing import Any

from aiohttp import web
from yarl import URL

from taskd import keys
from taskd.errors import NON_FIELD, NotFound, ValidationFailed
from taskd.schemas import canonical_id

# Bodies above this are parsed or serialised in a thread: a 1 MiB body, or a page of 1,000
# long tasks, is milliseconds of CPU that every other client of the loop would wait for.
OFF_LOOP_BYTES = 64 * 1024
# Exactly what `etag` writes: any other spelling (leading zeros, non-ASCII digits, 5000 digits)
# names no version.
ETAG_RE = re.compile(r'"([1-9][0-9]{0,9})"')


async def read_json(request: web.Request) -> Any:
    """The parsed body; aiohttp raises 413 past `[http] max_body_bytes`."""
    raw = await request.read()
    try:
        if len(raw) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(json.loads, raw)
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid JSON"
        raise ValidationFailed.one(NON_FIELD, f"JSON parse error - {reason}") from None


async def json_response(
    body: Any, size_hint: int, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response, serialised off the event loop when it is big."""
    if size_hint > OFF_LOOP_BYTES:
        text = await asyncio.to_thread(json.dumps, body)
        return web.Response(text=text, content_type="application/json", headers=headers)
    return web.json_response(body, headers=headers)


def path_id(request: web.Request, name: str = "id") -> int:
    """An id from the path: anything but a canonical positive bigint is simply not found."""
    task_id = canonical_id(request.match_info[name])
    if task_id is None:
        raise NotFound()
    return task_id


def _tag_versions(header: str, weak: bool) -> set[int]:
    """The versions a list of entity tags names; `weak` also takes `W/"<n>"`."""
    versions = set()
    for tag in header.split(","):
        tag = tag.strip()
        if weak:
            tag = tag.removeprefix("W/")
        if found := ETAG_RE.fullmatch(tag):
            versions.add(int(found[1]))
    return versions


def if_match(request: web.Request) -> set[int] | None:
    """Versions acceptable to `If-Match` (strong comparison); None when absent or `*`."""
    header = request.headers.get("If-Match")
    if header is None or header.strip() == "*":
        return None
    return _tag_versions(header, weak=False)  # empty when nothing parsed: no version, so 412


def if_none_match(request: web.Request, version: int) -> bool:
    """Whether `If-None-Match` names this version or `*` (weak comparison, RFC 9110 13.1.2)."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    return header.strip() == "*" or version in _tag_versions(header, weak=True)


def etag(version: int) -> str:
    return f'"{version}"'


def _trusted(address: str | None, request: web.Request) -> bool:
    proxies = request.app[keys.SETTINGS].http.trusted_proxies
    if not proxies or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(request: web.Request) -> str:
    """The client's address: `X-Forwarded-For` is believed only from a trusted proxy."""
    peer = request.remote or "unknown"
    if not _trusted(peer, request):
        return peer
    # Each proxy appends the address it saw: the nearest untrusted hop is the client.
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, request):
            return hop
    return hops[0] if hops else peer


def _scheme_and_host(request: web.Request) -> tuple[str, str]:
    """Where clients reach the service: `[http] public_url` when set, else what the request
    (behind a trusted proxy: its forwarded headers) says."""
    if pinned := request.app[keys.SETTINGS].http.public_url:
        return pinned.scheme, pinned.authority
    scheme, host = request.scheme, request.host
    if _trusted(request.remote, request):
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
    return scheme, host


def public_origin(request: web.Request) -> str:
    """The service's own origin as the browser sees it, e.g. `https://tasks.example.com`."""
    scheme, host = _scheme_and_host(request)
    return f"{scheme.lower()}://{host.lower()}"


def public_url(request: web.Request, path: str, query: dict[str, str] | None = None) -> str:
    """An absolute URL as the client sees the service (behind a trusted proxy: its headers)."""
    scheme, host = _scheme_and_host(request)
    try:
        return str(URL.build(scheme=scheme, authority=host, path=path, query=query or None))
    except ValueError:  # a Host header no URL can hold
        return str(URL.build(path=path, query=query or None))
