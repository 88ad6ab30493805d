"""The per-process hub: tails the firehose on one connection and fans events out to bounded
subscriber queues (one per live connection). What a client sees is built by `feed.Feed`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis

from taskd import keys
from taskd.background import Backoff, stop_background, stop_requested, supervise
from taskd.config import RedisSettings, StreamSettings
from taskd.errors import Throttled, Unavailable
from taskd.streams import (
    REDIS_DOWN,
    RedisKeys,
    StreamEvent,
    StreamReader,
    as_entries,
    event_from_entry,
    event_id,
    xread_entries,
)

log = logging.getLogger(__name__)

# Seconds a client over `stream.max_per_user` is asked to wait: connections of a user that
# went away (a closed tab) are noticed by their next ping (`keepalive`), within an interval.
BUSY_RETRY_AFTER = 5
# Why a subscription was ended when its user's logins ended (`cutoffs`): the client is told
# `reauth` (WebSocket: close 4001), and its reconnect with the old token is refused.
LOGIN_ENDED = "reauth"
# The hub retries a lost Redis at least this often: a stream opened meanwhile waits for it
# (`stream.reconnect_wait`), so the retry must come sooner than that wait runs out.
HUB_MAX_BACKOFF = 0.5


class Closed(Exception):
    """The hub ended this subscription (overflow, Redis lost, shutdown): the client resumes."""


class Subscription:
    """One live connection's inbox. Bounded in events and in bytes: overflow closes it
    instead of growing; the client resumes from Redis. Small when idle (slots, no queue or
    waiter until one is needed): a replica holds ten thousand of them."""

    __slots__ = (
        "_bytes",
        "_max_bytes",
        "_max_events",
        "_queue",
        "_waiter",
        "closed",
        "kind",
        "user_id",
    )

    def __init__(self, user_id: int, kind: str, max_events: int, max_bytes: int) -> None:
        self.user_id = user_id
        self.kind = kind  # "sse" or "ws", for metrics
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._queue: deque[StreamEvent] | None = None
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.closed: str | None = None

    def offer(self, event: StreamEvent) -> None:
        if self.closed:
            return
        if self._queue is None:
            self._queue = deque()
        size = event.size
        if len(self._queue) >= self._max_events or self._bytes + size > self._max_bytes:
            self.close("overflow")
            return
        self._queue.append(event)
        self._bytes += size
        self._wake()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = reason
            self._queue = None
            self._bytes = 0
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> StreamEvent:
        while not self._queue:
            if self.closed:
                raise Closed(self.closed)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.closed:
            raise Closed(self.closed)
        event = self._queue.popleft()
        self._bytes -= event.size
        return event


class Hub:
    """Tails `<ns>:firehose` with one blocking XREAD and hands each event to its user's queues."""

    def __init__(self, redis: RedisSettings, stream: StreamSettings, keyspace: RedisKeys) -> None:
        self._redis_settings = redis
        self._settings = stream
        self._keys = keyspace
        self._subscribers: dict[int, set[Subscription]] = {}
        self._up = asyncio.Event()  # set while the firehose is tailed
        self._lost = False  # the last failure broke a connection that was tailing
        self.delivered = 0

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self, patience: float) -> bool:
        """Whether the hub tails the firehose, waiting up to `patience` seconds for it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self._up.wait()
        return self.connected

    async def subscribe(self, user_id: int, kind: str) -> Subscription:
        """A new subscriber; 429 past the per-user cap, 503 when the hub is not tailing (after
        waiting a moment for a reconnect: a browser's EventSource gives up on any non-200)."""
        self._check_room(user_id)
        if not await self.wait_connected(self._settings.reconnect_wait):
            raise Unavailable("Live updates are unavailable right now.")
        self._check_room(user_id)  # others may have joined meanwhile
        sub = Subscription(user_id, kind, self._settings.queue_size, self._settings.queue_bytes)
        self._subscribers.setdefault(user_id, set()).add(sub)
        return sub

    def subscribers_of(self, user_id: int) -> int:
        return len(self._subscribers.get(user_id, ()))

    def _check_room(self, user_id: int) -> None:
        if self.subscribers_of(user_id) >= self._settings.max_per_user:
            raise Throttled(BUSY_RETRY_AFTER)

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

    def end_logins_of(self, user_id: int) -> None:
        """End the user's live connections here: their logins ended (`LOGIN_ENDED`)."""
        for sub in self._subscribers.get(user_id, ()):
            sub.close(LOGIN_ENDED)

    def streaming_users(self) -> list[int]:
        """The users with a live connection on this replica."""
        return list(self._subscribers)

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
        backoff = Backoff(0.1, HUB_MAX_BACKOFF)
        await supervise(lambda: self._connect_and_tail(backoff), backoff, self._failed)

    async def _connect_and_tail(self, backoff: Backoff) -> None:
        client = self._client()
        try:
            await self._tail(client, backoff)
        finally:
            self._lost = self.connected
            self._up.clear()
            self.close_all("redis")
            with contextlib.suppress(*REDIS_DOWN):
                await client.aclose()

    def _failed(self, exc: Exception) -> None:
        if not isinstance(exc, REDIS_DOWN):
            log.error("hub failed (%r): ending local streams", exc, exc_info=exc)
        elif self._lost:
            log.warning("hub lost redis (%r): ending local streams", exc)

    async def _tail(self, client: Redis, backoff: Backoff) -> None:
        key, batch = self._keys.firehose(), self._settings.hub_batch
        newest = as_entries(await client.xrevrange(key, "+", "-", count=1))
        last: bytes | str = newest[0][0] if newest else "0-0"
        self._up.set()
        backoff.reset()  # this connection held: the next blip starts from the first delay
        log.info("hub: tailing %s", key)
        block = self._settings.hub_block_ms
        while not stop_requested():
            # A silent, half-open connection must not stall the hub: bound every read.
            async with asyncio.timeout(block / 1000 + self._redis_settings.timeout + 5):
                reply = await client.xread({key: last}, count=batch, block=block)
            entries = xread_entries(reply, key)
            before = last
            events = []
            for entry_id, fields in entries:
                last = entry_id
                try:
                    events.append(event_from_entry(fields))
                except (KeyError, ValueError, UnicodeDecodeError):
                    log.error("hub: skipping a firehose entry it cannot read: %r", entry_id)
            async with asyncio.timeout(self._redis_settings.timeout + 5):
                events = await self._resolve(client, events)
            for event in events:
                self._dispatch(event)
            if len(entries) == batch and await self._fell_behind(client, key, before):
                # The firehose was trimmed past us: these subscribers may have missed events
                # of users that will send nothing more. They resume from the per-user streams.
                log.warning("hub fell behind the firehose: ending local streams")
                self.close_all("behind")

    async def _resolve(self, client: Redis, events: list[StreamEvent]) -> list[StreamEvent]:
        """The events, with each big one that travelled the firehose as a reference read
        whole from its user's stream, once for this replica (not once per connection), if
        this replica has subscribers of that user. One not found stays a reference: its
        feeds look for it themselves (and reset if it is gone)."""
        wanted = [
            i for i, e in enumerate(events) if e.data is None and e.user_id in self._subscribers
        ]
        if not wanted:
            return events
        async with client.pipeline(transaction=False) as pipe:
            for i in wanted:
                seq_id = event_id(events[i].seq)
                pipe.xrange(self._keys.events(events[i].user_id), min=seq_id, max=seq_id)
            found = await pipe.execute()
        for i, entries in zip(wanted, found, strict=True):
            if entries:
                events[i] = event_from_entry(entries[0][1])
        return events

    @staticmethod
    async def _fell_behind(client: Redis, key: str, before: bytes | str) -> bool:
        """Whether entries after `before` (the id this read started from) were trimmed away
        unread. Errs towards yes when only `before` itself is gone: that costs a resume."""
        oldest = as_entries(await client.xrange(key, "-", "+", count=1))
        if not oldest:
            return False
        return _id_tuple(oldest[0][0]) > _id_tuple(before)

    def _dispatch(self, event: StreamEvent) -> None:
        for sub in self._subscribers.get(event.user_id, ()):
            sub.offer(event)
            self.delivered += 1


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def end_streams(app: web.Application) -> None:
    """On shutdown: every live client is told to reconnect (elsewhere) and resume."""
    if keys.HUB in app:
        app[keys.HUB].close_all("shutdown")


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    hub = Hub(settings.redis, settings.stream, app[keys.KEYSPACE])
    app[keys.HUB] = hub
    app[keys.STREAM_READER] = StreamReader(
        app[keys.REDIS],
        app[keys.KEYSPACE],
        settings.stream.catch_up_bytes,
        settings.stream.catch_up_batch,
    )
    task = asyncio.create_task(hub.run(), name="taskd-hub")
    # Serve streams from the first request when Redis answers; start anyway when it does not.
    await hub.wait_connected(settings.redis.timeout * 2)
    try:
        yield
    finally:
        hub.close_all("shutdown")
        await stop_background([task])
