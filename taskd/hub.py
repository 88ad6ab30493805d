"""The per-process hub: tails the firehose on one connection and fans events out to bounded
subscriber queues; `Feed` turns a subscription into the exact, gapless sequence a client sees.

Ids are dense per user, so a subscriber at `last` expects `last + 1`: anything lower is a
repeat, anything higher means something is missing, which is filled from the user's stream,
or answered with a `reset` when Redis no longer has it (DESIGN.md, "Read path").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from taskd import db, keys, store
from taskd.config import RedisSettings, StreamSettings
from taskd.errors import Unavailable
from taskd.streams import (
    REDIS_DOWN,
    Event,
    Keys,
    event_from_entry,
    event_id,
    parse_event_id,
    stop_background,
    stop_requested,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reset:
    """The client must re-read the list; the stream continues after `position`."""

    reason: str  # "trimmed" | "malformed" | "ahead"
    position: int

    @property
    def data(self) -> str:
        body = {"type": "reset", "reason": self.reason, "position": event_id(self.position)}
        return json.dumps(body)


Item = Event | Reset


class Closed(Exception):
    """The hub ended this subscription (overflow, Redis lost, shutdown): the client resumes."""


class Subscription:
    """One live connection's inbox. Bounded: overflow closes it instead of growing."""

    def __init__(self, user_id: int, kind: str, limit: int) -> None:
        self.user_id = user_id
        self.kind = kind  # "sse" or "ws", for metrics
        self._limit = limit
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.closed: str | None = None

    def offer(self, event: Event) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self._limit:
            self.close("overflow")
        else:
            self._queue.put_nowait(event)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = reason
            self._queue.put_nowait(None)  # wakes the reader; the queue has no hard cap

    async def get(self) -> Event:
        event = await self._queue.get()
        if event is None:
            raise Closed(self.closed)
        return event


class Hub:
    """Tails `<ns>:firehose` with one blocking XREAD and hands each event to its user's queues."""

    def __init__(self, redis: RedisSettings, stream: StreamSettings, keyspace: Keys) -> None:
        self._redis_settings = redis
        self._settings = stream
        self._keys = keyspace
        self._subscribers: dict[int, set[Subscription]] = {}
        self.connected = False
        self.first_connect = asyncio.Event()
        self.delivered = 0

    def subscribe(self, user_id: int, kind: str) -> Subscription:
        if not self.connected:
            raise Unavailable("Live updates are unavailable right now.")
        sub = Subscription(user_id, kind, self._settings.queue_size)
        self._subscribers.setdefault(user_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.user_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.user_id]

    def subscriber_count_of(self, kind: str) -> int:
        return sum(s.kind == kind for subs in self._subscribers.values() for s in subs)

    def close_all(self, reason: str) -> None:
        for subs in self._subscribers.values():
            for sub in subs:
                sub.close(reason)

    def _client(self) -> Redis:
        # A dedicated connection with no socket timeout: one shorter than the BLOCK time raises
        # mid-wait (redis-py issues 3138 and 4091), and redis-py 8's own read timeout around a
        # blocking read can swallow a task's cancellation. `_tail` bounds each read itself.
        return Redis.from_url(
            self._redis_settings.url.get_secret_value(),
            protocol=3,
            socket_timeout=None,
            socket_connect_timeout=self._redis_settings.timeout,
            socket_keepalive=True,
            single_connection_client=True,
            client_name=f"taskd:{self._keys.namespace}:hub",
        )

    async def run(self) -> None:
        """Forever: tail the firehose; on losing Redis end every local stream and retry."""
        backoff = 0.1
        while True:
            client = self._client()
            try:
                await self._tail(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if stop_requested():
                    raise asyncio.CancelledError() from exc
                if not isinstance(exc, REDIS_DOWN):
                    log.exception("hub failed: ending local streams")
                elif self.connected:
                    log.warning("hub lost redis (%r): ending local streams", exc)
            finally:
                self.connected = False
                self.close_all("redis")
                with contextlib.suppress(*REDIS_DOWN):
                    await client.aclose()
            if stop_requested():
                raise asyncio.CancelledError()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _tail(self, client: Redis) -> None:
        key, batch = self._keys.firehose(), self._settings.hub_batch
        newest = _as_entries(await client.xrevrange(key, "+", "-", count=1))
        last: bytes | str = newest[0][0] if newest else "0-0"
        self.connected = True
        self.first_connect.set()
        log.info("hub: tailing %s", key)
        block = self._settings.hub_block_ms
        while not stop_requested():
            # A silent, half-open connection must not stall the hub: bound every read.
            async with asyncio.timeout(block / 1000 + self._redis_settings.timeout + 5):
                reply = await client.xread({key: last}, count=batch, block=block)
            entries = _entries(reply, key)
            before = last
            for entry_id, fields in entries:
                last = entry_id
                try:
                    event = event_from_entry(fields)
                except (KeyError, ValueError, UnicodeDecodeError):
                    log.error("hub: skipping a firehose entry it cannot read: %r", entry_id)
                    continue
                self._dispatch(event)
            if len(entries) == batch and await self._fell_behind(client, key, before):
                # The firehose was trimmed past us: these subscribers may have missed events
                # of users that will send nothing more. They resume from the per-user streams.
                log.warning("hub fell behind the firehose: ending local streams")
                self.close_all("behind")

    @staticmethod
    async def _fell_behind(client: Redis, key: str, before: bytes | str) -> bool:
        """Whether entries after `before` (the id this read started from) were trimmed away
        unread. Errs towards yes when only `before` itself is gone: that costs a resume."""
        oldest = _as_entries(await client.xrange(key, "-", "+", count=1))
        if not oldest:
            return False
        return _id_tuple(oldest[0][0]) > _id_tuple(before)

    def _dispatch(self, event: Event) -> None:
        for sub in self._subscribers.get(event.user_id, ()):
            sub.offer(event)
            self.delivered += 1


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


Entry = tuple[bytes, dict[bytes, bytes]]


def _as_entries(reply: Any) -> list[Entry]:
    """XRANGE/XREVRANGE replies, typed (redis-py's own types are too loose to use)."""
    return list(reply or [])


def _entries(reply: Any, key: str) -> list[Entry]:
    """XREAD's RESP3 reply `{key: [[(id, fields), ...]]}` as a list of entries."""
    if not reply:
        return []
    value = reply.get(key.encode()) or reply.get(key) or []
    return _as_entries(value[0] if value and isinstance(value[0], list) else value)


class Feed:
    """What one client receives: catch-up from the user's stream, then live, gapless."""

    def __init__(
        self,
        hub: Hub,
        sub: Subscription,
        pg_pool: Any,
        redis: Redis,
        keyspace: Keys,
        settings: StreamSettings,
        last: int,
    ) -> None:
        self._hub = hub
        self._sub = sub
        self._pool = pg_pool
        self._redis = redis
        self._keys = keyspace
        self._settings = settings
        self.last = last
        self._ready: deque[Item] = deque()
        self._ahead: dict[int, Event] = {}
        self._need_fill = False
        self._more = False  # the last read of the user's stream was a full batch

    async def open(self, resume: str | None) -> None:
        """Fix the start position (before the response headers are sent): after the newest
        committed event, or after `resume`; a bad or future `resume` queues a reset."""
        async with db.cursor(self._pool) as cur:
            state = await store.stream_state(cur, self._sub.user_id)
        self.last = state.committed
        if resume is None:
            return
        wanted = parse_event_id(resume)
        if wanted is None:
            self._ready.append(Reset("malformed", state.committed))
        elif wanted > state.committed:
            self._ready.append(Reset("ahead", state.committed))
        elif wanted < state.committed:
            self.last = wanted
            self._need_fill = True

    def close(self) -> None:
        self._hub.unsubscribe(self._sub)

    async def next(self, wait: float) -> Item | None:
        """The next item for the client; None when nothing was ready within `wait` seconds
        (one deadline: repeats and out-of-order events do not extend it)."""
        deadline = asyncio.get_running_loop().time() + wait
        while not self._ready:
            if self._need_fill:
                await self._fill()
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    event = await self._sub.get()
            except TimeoutError:
                return None
            self._accept(event)
        return self._ready.popleft()

    def _accept(self, event: Event) -> None:
        if event.seq <= self.last:
            return  # a repeat: the firehose after a relay retry, or a catch-up overlap
        self._ahead[event.seq] = event
        if len(self._ahead) > self._settings.queue_size:
            self._sub.close("overflow")
        self._advance()
        if self._ahead or self._more:
            self._need_fill = True  # something is missing before this event, or still unread

    def _advance(self) -> None:
        while (event := self._ahead.pop(self.last + 1, None)) is not None:
            self.last = event.seq
            self._ready.append(event)

    async def _fill(self) -> None:
        """Read what follows `last` from the user's stream; decide about anything missing.

        Postgres is asked first, Redis second: an event still in the outbox is pending and
        will arrive live; one that is neither in the outbox nor in Redis is gone. (The other
        order races with the relay and sends false resets.)
        """
        self._need_fill = False
        user = self._sub.user_id
        async with db.cursor(self._pool) as cur:
            state = await store.stream_state(cur, user)
        batch = self._settings.catch_up_batch
        entries = _as_entries(
            await self._redis.xrange(
                self._keys.events(user), min=event_id(self.last + 1), max="+", count=batch
            )
        )
        before = self.last
        for _, fields in entries:
            event = event_from_entry(fields)
            if event.seq > self.last:
                self._ahead[event.seq] = event
        self._advance()
        for seq in [s for s in self._ahead if s <= self.last]:
            del self._ahead[seq]
        self._more = len(entries) == batch
        if self._more and self.last > before:
            self._need_fill = True  # more to read before going live
            return
        # No progress: `last + 1` is not in Redis (whether or not more follows it).
        missing = self.last + 1
        if missing > state.committed or (
            state.pending_from is not None and state.pending_from <= missing
        ):
            return  # nothing missing yet, or it is pending and will arrive live
        self._ready.append(Reset("trimmed", state.committed))
        self.last = state.committed
        for seq in [s for s in self._ahead if s <= self.last]:
            del self._ahead[seq]
        self._advance()
        self._need_fill = bool(self._ahead) or self._more


async def open_feed(app: web.Application, user_id: int, kind: str, resume: str | None) -> Feed:
    """Register a subscriber for the user and fix its start; 503 when live updates are down."""
    hub = app[keys.HUB]
    settings = app[keys.SETTINGS]
    sub = hub.subscribe(user_id, kind)
    feed = Feed(
        hub,
        sub,
        app[keys.PG_POOL],
        app[keys.REDIS],
        app[keys.KEYSPACE],
        settings.stream,
        0,
    )
    try:
        await feed.open(resume)
    except BaseException:
        feed.close()
        raise
    return feed


async def end_streams(app: web.Application) -> None:
    """On shutdown: every live client is told to reconnect (elsewhere) and resume."""
    if keys.HUB in app:
        app[keys.HUB].close_all("shutdown")


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    hub = Hub(settings.redis, settings.stream, app[keys.KEYSPACE])
    app[keys.HUB] = hub
    task = asyncio.create_task(hub.run(), name="taskd-hub")
    # Serve streams from the first request when Redis answers; start anyway when it does not.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(settings.redis.timeout * 2):
            await hub.first_connect.wait()
    try:
        yield
    finally:
        hub.close_all("shutdown")
        await stop_background([task])
