"""What every handler shares: body parsing, ids, If-Match, absolute URLs."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web
from yarl import URL

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
    try:
        raw = await request.read()
    except (web.RequestPayloadError, ConnectionResetError) as exc:
        # A body that does not decode (a broken gzip stream) or a client that went away
        # mid-body: the client's doing, answered 400 (if anyone still listens), not a 500.
        raise ValidationFailed.one(NON_FIELD, "The request body could not be read.") from exc
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


def client_address(request: web.Request) -> str:
    """The client's address (behind a trusted proxy, `forwarded` has made it `remote`)."""
    return request.remote or "unknown"


def public_origin(request: web.Request) -> str:
    """The service's own origin as the browser sees it, e.g. `https://tasks.example.com`."""
    return f"{request.scheme.lower()}://{request.host.lower()}"


def public_url(request: web.Request, path: str, query: dict[str, str] | None = None) -> str:
    """An absolute URL as the client sees the service (see `forwarded`)."""
    try:
        return str(
            URL.build(scheme=request.scheme, authority=request.host, path=path, query=query or None)
        )
    except ValueError:  # a Host header no URL can hold
        return str(URL.build(path=path, query=query or None))
