"""Live updates: Server-Sent Events and WebSocket, both fed by the hub's `Feed`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web
from aiohttp_sse import EventSourceResponse

from taskd import keys
from taskd.errors import ApiError, Forbidden, LoginEnded
from taskd.feed import Feed, Item, ResetNotice, payload
from taskd.hub import LOGIN_ENDED
from taskd.keepalive import Kept
from taskd.shards import REDIS_DOWN
from taskd.streams import event_id
from taskd.subscription import Closed
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
# Why the keepalive sweep ended a stream: its ping could not be written (the client left).
PING_FAILED = "ping failed"
# aiohttp-sse starts a ping task per response in `prepare` (`is_connected` and
# `stop_streaming` rely on it; it cannot be left out): with this period it only sleeps, and
# the keepalive sweep writes the pings, the ones aiohttp-sse writes.
SSE_OWN_PING_INTERVAL = 10 * 365 * 24 * 3600.0
SSE_PING = f": ping{EventSourceResponse.DEFAULT_SEPARATOR * 2}".encode()


class _SseKept(Kept):
    __slots__ = ("_feed", "_resp")

    def __init__(self, request: web.Request, resp: EventSourceResponse, feed: Feed) -> None:
        super().__init__(request.transport)
        self._resp = resp
        self._feed = feed

    async def ping(self) -> None:
        # Each write reaches the transport whole before any await, and an event is one write
        # (`send`): a ping lands between two events, never inside one. No lock needed.
        await self._resp.write(SSE_PING)

    def lost(self) -> None:
        self._feed.end(PING_FAILED)  # the handler waits for the feed: wake it


class _WsKept(Kept):
    __slots__ = ("_socket",)
    answers = True

    def __init__(self, request: web.Request, socket: web.WebSocketResponse) -> None:
        super().__init__(request.transport)
        self._socket = socket

    async def ping(self) -> None:
        await self._socket.ping()  # a control frame, written whole (events are frames too)


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
    connected: Callable[[], bool],
    send: Callable[[Item], Awaitable[None]],
) -> bool:
    """Send items until the token expires (True) or the client goes away (False). Between
    items it sleeps until the token expires: the keepalive sweep pings, and ends the feed of
    a client it finds gone."""
    while connected():
        remaining = expires_at - time.time()
        if remaining <= 0:
            return True
        item = await feed.next(wait=remaining)
        if item is not None:
            await send(item)
    return False


async def sse(request: web.Request) -> web.StreamResponse:
    settings = request.app[keys.SETTINGS].stream
    feed = await _open_feed(request, "sse", _resume_id(request, header=True))
    resp = EventSourceResponse(
        ping_interval=SSE_OWN_PING_INTERVAL, send_timeout=settings.send_timeout
    )
    if request.transport is None:  # the client left while its feed opened
        feed.close()
        return web.Response(status=CLIENT_GONE)
    keepalive = request.app[keys.KEEPALIVE]
    kept = _SseKept(request, resp, feed)
    try:
        await resp.prepare(request)
        await resp.write(f"retry: {settings.retry_ms}\n\n".encode())
        keepalive.add(kept)

        async def send(item: Item) -> None:
            if isinstance(item, ResetNotice):
                await resp.send(payload(item), id=event_id(item.position), event="reset")
            else:
                await resp.send(payload(item), id=event_id(item.seq), event=item.type)

        expired = await _pump(feed, request[keys.TOKEN_EXPIRES], resp.is_connected, send)
        if expired:
            await resp.send(REAUTH, event="reauth")
    except Closed as closed:
        log.debug("sse stream closed: %s", closed)
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
        keepalive.discard(kept)
        feed.close()
        if resp.prepared:
            # Its own ping task, which would sleep on for years; none when `prepare` failed
            # half-way (the client left as the headers went out): aiohttp-sse then raises.
            with contextlib.suppress(RuntimeError):
                resp.stop_streaming()
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
    # No heartbeat: the keepalive sweep pings. No autoping: aiohttp would answer pings and
    # swallow pongs itself, with no public record of them; here every frame the client sends,
    # a pong too, reaches the reader, which tells the sweep the client is alive (and answers
    # its pings as aiohttp would).
    socket = web.WebSocketResponse(heartbeat=None, autoping=False, max_msg_size=64 * 1024)
    keepalive = request.app[keys.KEEPALIVE]
    kept = _WsKept(request, socket)
    lock = asyncio.Lock()  # the reader answers JSON pings while the writer sends events

    async def send_text(text: str) -> None:
        async with lock, asyncio.timeout(settings.send_timeout):
            await socket.send_str(text)

    async def write() -> None:
        code = WS_TRY_AGAIN
        try:
            expired = await _pump(
                feed,
                request[keys.TOKEN_EXPIRES],
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
        keepalive.add(kept)
        writer = asyncio.create_task(write())
        async for message in socket:
            kept.heard()
            if message.type == WSMsgType.PING:
                async with asyncio.timeout(settings.send_timeout):
                    await socket.pong(message.data)
            elif message.type == WSMsgType.PONG:
                continue  # heard: all a pong says
            elif message.type == WSMsgType.TEXT and _is_ping(message.data):
                await send_text(PONG)
            else:
                await send_text(json.dumps({"type": "error", "detail": "Unsupported message."}))
    except (ConnectionResetError, TimeoutError) as exc:
        log.debug("websocket reader ended: %r", exc)
    finally:
        keepalive.discard(kept)
        # Before the wait below, which a cancelled handler (a client gone, a shutdown) never
        # finishes: the hub must not keep a subscription (a slot of the user's 32) for it.
        feed.close()
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    if not socket.prepared:  # the client left during the handshake
        return web.Response(status=CLIENT_GONE)
    return socket


def _is_ping(text: str) -> bool:
    try:
        message = json.loads(text)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("type") == "ping"
