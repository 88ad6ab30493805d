"""The request as the client sees it, settled once, before anything else reads it: behind a
trusted proxy its `X-Forwarded-For/-Proto/-Host`, or the pinned `[http] public_url`, become
the request's own `remote`, `scheme` and `host`."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from aiohttp import web

from taskd.config import HttpSettings, IPNetwork


def _trusted(address: str | None, proxies: tuple[IPNetwork, ...]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def _first(value: str) -> str:
    return value.split(",")[0].strip()


def client_view(settings: HttpSettings) -> Callable[[web.Request], web.Request] | None:
    """What turns a request into the client's view of it; None when there is nothing to
    rewrite (no trusted proxy, no pinned URL), so that a direct deployment pays nothing."""
    proxies, pinned = settings.trusted_proxies, settings.public_url
    if not proxies and pinned is None:
        return None

    def as_the_client_sees_it(request: web.Request) -> web.Request:
        remote, scheme, host = request.remote, request.scheme, request.host
        if _trusted(remote, proxies):
            # Each proxy appends the address it saw: the nearest untrusted hop is the client.
            forwarded = request.headers.get("X-Forwarded-For", "")
            hops = [h.strip() for h in forwarded.split(",") if h.strip()]
            untrusted = [hop for hop in hops if not _trusted(hop, proxies)]
            remote = untrusted[-1] if untrusted else (hops[0] if hops else remote)
            scheme = _first(request.headers.get("X-Forwarded-Proto", scheme))
            host = _first(request.headers.get("X-Forwarded-Host", host))
        if pinned is not None:
            scheme, host = pinned.scheme, pinned.authority
        return request.clone(remote=remote or "unknown", scheme=scheme, host=host)

    return as_the_client_sees_it
