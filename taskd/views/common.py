"""What every handler shares: body parsing, ids, entity tags, Idempotency-Key, absolute URLs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from yarl import URL

from taskd import keys
from taskd.errors import NON_FIELD, NotFound, ValidationFailed
from taskd.models import Answer, KeyedRequest
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


def _text_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a header or query may hold anything


def list_etag(request: web.Request, query: Mapping[str, str], position: int) -> str:
    """A weak tag for a page of the list: the user's stream position (every change moves
    it) and what else shapes the page (the user, the query, and the host that `next` and
    `previous` are built on)."""
    shape = " ".join(
        (str(request[keys.USER_ID]), request.scheme, request.host, urlencode(sorted(query.items())))
    )
    return f'W/"{position}-{hashlib.blake2b(_text_bytes(shape), digest_size=8).hexdigest()}"'


def none_match(request: web.Request, tag: str) -> bool:
    """Whether `If-None-Match` names this tag (weak comparison) or is `*`."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    opaque = tag.removeprefix("W/")
    return header.strip() == "*" or any(
        part.strip().removeprefix("W/") == opaque for part in header.split(",")
    )


IDEMPOTENCY_KEY = "Idempotency-Key"  # also the field a malformed key's 400 is reported on
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


def keyed_request(request: web.Request, body: object) -> KeyedRequest | None:
    """The write's Idempotency-Key and a digest of the request it names (method, path and
    the JSON body, key order aside); None without one; 400 when it is malformed."""
    sent = request.headers.getall(IDEMPOTENCY_KEY, [])
    if not sent:
        return None
    if len(sent) > 1:  # which one? A proxy that folds them would send `a, b`: refuse both ways
        raise ValidationFailed.one(IDEMPOTENCY_KEY, "Send one Idempotency-Key.")
    key = sent[0]
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ValidationFailed.one(IDEMPOTENCY_KEY, "Must be 1 to 255 visible ASCII characters.")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    what = _text_bytes("\n".join((request.method, request.path, canonical)))
    return KeyedRequest(request[keys.USER_ID], key, hashlib.sha256(what).digest())


def answer_response(answer: Answer, replayed: bool = False) -> web.Response:
    """A write's answer (as recorded for its Idempotency-Key)."""
    headers = {}
    if answer.etag is not None:
        headers["ETag"] = answer.etag
    if answer.location is not None:
        headers["Location"] = answer.location
    if replayed:
        headers["Idempotency-Replayed"] = "true"
    if answer.body is None:
        return web.Response(status=answer.status, headers=headers)
    return web.Response(
        text=answer.body, status=answer.status, headers=headers, content_type="application/json"
    )


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
