"""Live updates: Server-Sent Events and WebSocket, both fed by the hub's `Feed`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web
from aiohttp_sse import EventSourceResponse

from taskd import keys
from taskd.config import StreamSettings
from taskd.errors import ApiError, Forbidden, LoginEnded
from taskd.feed import Feed, Item, ResetNotice, payload
from taskd.hub import LOGIN_ENDED, Closed
from taskd.streams import REDIS_DOWN, event_id
from taskd.views.common import public_origin

log = logging.getLogger(__name__)

REAUTH = json.dumps({"type": "reauth"})
PONG = json.dumps({"type": "pong"})
# Close codes: the client should reconnect (and resume) in every case but a protocol error.
WS_TRY_AGAIN = 1013
WS_REAUTH = 4001
SHUTDOWN_RETRY_MS = 250
# The status counted for a stream whose client left before it started (nginx's "client closed
# request"); nobody receives it, and a 500 would blame the service.
CLIENT_GONE = 499


def _ping_interval(settings: StreamSettings) -> float:
    """This connection's ping period: at most the configured one, spread over its last
    quarter, so that the pings and timers of thousands of connections opened together do not
    all fire at once (that stalled a replica for most of a second at 10,000)."""
    return settings.ping_interval * random.uniform(0.75, 1.0)


async def _open_feed(request: web.Request, kind: str, resume: str | None) -> Feed:
    """The client's feed, registered with the hub. A change that ended the token's login
    while the feed was opening (its announcement ended the user's streams before this one was
    registered) is seen now, in the cache it updated: 401, as for a reconnect."""
    user_id = request[keys.USER_ID]
    feed = await Feed.open(request.app, user_id, kind, resume)
    if request.app[keys.CUTOFFS].refuses(user_id, request[keys.TOKEN_GENERATION]):
        feed.close()
        raise LoginEnded()
    return feed


def _resume_id(request: web.Request, header: bool) -> str | None:
    """Last-Event-ID (SSE reconnects) wins over `?last_event_id=`; empty counts as absent."""
    value = request.headers.get("Last-Event-ID") if header else None
    return value or request.query.get("last_event_id") or None


async def _pump(
    feed: Feed,
    expires_at: int,
    ping_interval: float,
    connected: Callable[[], bool],
    send: Callable[[Item], Awaitable[None]],
) -> bool:
    """Send items until the token expires (True) or the client goes away (False)."""
    while connected():
        remaining = expires_at - time.time()
        if remaining <= 0:
            return True
        item = await feed.next(wait=min(remaining, ping_interval))
        if item is not None:
            await send(item)
    return False


async def sse(request: web.Request) -> web.StreamResponse:
    settings = request.app[keys.SETTINGS].stream
    feed = await _open_feed(request, "sse", _resume_id(request, header=True))
    ping_interval = _ping_interval(settings)
    resp = EventSourceResponse(ping_interval=ping_interval, send_timeout=settings.send_timeout)
    if request.transport is None:  # the client left while its feed opened
        feed.close()
        return web.Response(status=CLIENT_GONE)
    try:
        await resp.prepare(request)
        await resp.write(f"retry: {settings.retry_ms}\n\n".encode())

        async def send(item: Item) -> None:
            if isinstance(item, ResetNotice):
                await resp.send(payload(item), id=event_id(item.position), event="reset")
            else:
                await resp.send(payload(item), id=event_id(item.seq), event=item.type)

        expired = await _pump(
            feed, request[keys.TOKEN_EXPIRES], ping_interval, resp.is_connected, send
        )
        if expired:
            await resp.send(REAUTH, event="reauth")
    except Closed as closed:
        log.debug("sse stream closed by the hub: %s", closed)
        if closed.args and closed.args[0] == LOGIN_ENDED:
            with contextlib.suppress(ConnectionResetError):
                await resp.send(REAUTH, event="reauth")
        elif closed.args and closed.args[0] == "shutdown":
            # Reconnect soon (to another replica); the next stream's own `retry:` resets it.
            with contextlib.suppress(ConnectionResetError):
                await resp.write(f"retry: {SHUTDOWN_RETRY_MS}\n\n".encode())
    except (ApiError, *REDIS_DOWN, ConnectionResetError) as exc:
        # Headers are out: end the stream; the client resumes with its Last-Event-ID.
        log.info("sse stream ended: %r", exc)
    finally:
        feed.close()
    return resp


def _check_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser
    allowed = {public_origin(request), *request.app[keys.SETTINGS].http.allowed_origins}
    if origin.rstrip("/").lower() not in {o.lower() for o in allowed}:
        raise Forbidden("Cross-origin WebSocket connections are not allowed.")


async def ws(request: web.Request) -> web.StreamResponse:
    _check_origin(request)
    settings = request.app[keys.SETTINGS].stream
    feed = await _open_feed(request, "ws", _resume_id(request, header=False))
    ping_interval = _ping_interval(settings)
    socket = web.WebSocketResponse(heartbeat=ping_interval, max_msg_size=64 * 1024)
    lock = asyncio.Lock()  # the reader answers pings while the writer sends events

    async def send_text(text: str) -> None:
        async with lock, asyncio.timeout(settings.send_timeout):
            await socket.send_str(text)

    async def write() -> None:
        code = WS_TRY_AGAIN
        try:
            expired = await _pump(
                feed,
                request[keys.TOKEN_EXPIRES],
                ping_interval,
                lambda: not socket.closed,
                lambda item: send_text(payload(item)),
            )
            if expired:
                await send_text(REAUTH)
                code = WS_REAUTH
        except Closed as closed:
            reason = closed.args[0] if closed.args else None
            if reason == LOGIN_ENDED:
                code = WS_REAUTH
                with contextlib.suppress(ConnectionResetError, TimeoutError):
                    await send_text(REAUTH)
            else:
                code = 1012 if reason == "shutdown" else WS_TRY_AGAIN
        except (ApiError, *REDIS_DOWN, ConnectionResetError, TimeoutError) as exc:
            log.info("websocket stream ended: %r", exc)
        except Exception:
            log.exception("websocket writer failed")
        finally:
            # Whatever ended the writer, the client must learn it and reconnect.
            await socket.close(code=code)

    writer = None
    try:
        await socket.prepare(request)
        writer = asyncio.create_task(write())
        async for message in socket:
            if message.type == WSMsgType.TEXT and _is_ping(message.data):
                await send_text(PONG)
            else:
                await send_text(json.dumps({"type": "error", "detail": "Unsupported message."}))
    except (ConnectionResetError, TimeoutError) as exc:
        log.debug("websocket reader ended: %r", exc)
    finally:
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        feed.close()
    if not socket.prepared:  # the client left during the handshake
        return web.Response(status=CLIENT_GONE)
    return socket


def _is_ping(text: str) -> bool:
    try:
        message = json.loads(text)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("type") == "ping"
