"""The relay: one leader cluster-wide publishes outbox rows to the users' Redis Streams.

Election is a Postgres advisory lock held on a dedicated session. The server drops that
session (and so the lock) when it goes quiet for `lease_seconds` (idle_session_timeout, TCP
keepalives and user timeout), so a dead, hung or partitioned leader is replaced in seconds.
Publication is at-least-once and harmless to repeat: per-user entry ids are the dense event
ids, and Redis refuses an id at or below a stream's top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiopg
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskd import db, keys, store
from taskd.background import (
    Backoff,
    ServerCancelled,
    stop_background,
    stop_requested,
    supervise,
)
from taskd.config import PostgresSettings, RelaySettings, StreamSettings
from taskd.streams import (
    REDIS_DOWN,
    RedisKeys,
    StreamEvent,
    as_entries,
    encode_event,
    entry_fields,
    event_id,
    firehose_fields,
)

log = logging.getLogger(__name__)

HOLD_BACK_SECONDS = 30.0  # a user whose events Redis refuses is retried after this


def _session_options(postgres: PostgresSettings, relay: RelaySettings) -> dict[str, Any]:
    kwargs = db.connect_kwargs(postgres)
    lease_ms = relay.lease_seconds * 1000
    kwargs["options"] += (
        f" -c idle_session_timeout={lease_ms} -c tcp_user_timeout={lease_ms}"
        " -c tcp_keepalives_idle=1 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3"
    )
    return kwargs


class Doorbell:
    """Wakes the leader after a commit: coalesced, fire-and-forget, one PUBLISH in flight."""

    def __init__(self, redis: Redis, channel: str) -> None:
        self._redis = redis
        self._channel = channel
        self._rung = asyncio.Event()

    def ring(self) -> None:
        self._rung.set()

    async def run(self) -> None:
        while not stop_requested():
            await self._rung.wait()
            self._rung.clear()
            # The leader's timed sweep is the guarantee; the bell is only speed.
            with contextlib.suppress(*REDIS_DOWN):
                await self._redis.publish(self._channel, b"1")


class Relay:
    """Elect, then publish outbox rows in commit order and delete what Redis has."""

    def __init__(
        self,
        postgres: PostgresSettings,
        relay: RelaySettings,
        stream: StreamSettings,
        redis: Redis,
        keyspace: RedisKeys,
    ) -> None:
        self._postgres = postgres
        self._settings = relay
        self._stream = stream
        self._redis = redis
        self._keys = keyspace
        self.is_leader = False
        self.published = 0  # events published by this process (a counter for /metrics)
        self._held_back: dict[int, float] = {}  # user id -> loop time to retry their events
        self._failures = 0  # in a row, for the log
        self._stepped_down = False  # the last failure ended this process's leadership

    async def run(self) -> None:
        """Forever: connect, try to lead, publish while leading; back off on any failure."""
        backoff = Backoff(0.1, self._settings.max_backoff)
        await supervise(lambda: self._take_part(backoff), backoff, self._failed)

    async def _take_part(self, backoff: Backoff) -> None:
        """One session: try for the lock every sweep interval, lead while holding it."""
        try:
            async with (
                aiopg.connect(**_session_options(self._postgres, self._settings)) as conn,
                conn.cursor() as cur,
            ):
                while not stop_requested():
                    if await store.try_lead(cur):
                        await self._lead(cur)
                    backoff.reset()
                    self._failures = 0
                    await asyncio.sleep(self._settings.sweep_interval)
        finally:
            self._stepped_down = self.is_leader
            self.is_leader = False

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        if isinstance(exc, ServerCancelled):
            log.warning("relay: a statement was cancelled by the server; retrying")
        elif self._stepped_down:
            log.warning("relay leader stepping down: %r", exc)
        elif self._failures >= 3:  # once is a blip; repeatedly, events are piling up
            log.warning(
                "relay cannot take part in the election (%d tries): %r", self._failures, exc
            )
        else:
            log.debug("relay election failed: %r", exc)

    async def _lead(self, cur: Any) -> None:
        """Publish until something fails; every sweep's queries also keep the lease alive."""
        log.info("relay: this process is the leader")
        self.is_leader = True
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            subscribed = False
            while not stop_requested():
                if not subscribed:
                    with contextlib.suppress(*REDIS_DOWN):
                        await pubsub.subscribe(self._keys.doorbell())
                        subscribed = True
                if await self.publish_batch(cur) < self._settings.batch_size:
                    subscribed = await self._wait_for_work(pubsub, subscribed)
        finally:
            with contextlib.suppress(*REDIS_DOWN):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _wait_for_work(self, pubsub: Any, subscribed: bool) -> bool:
        """Until a doorbell or the sweep interval; False when the subscription broke."""
        interval = self._settings.sweep_interval
        if not subscribed:
            await asyncio.sleep(interval)
            return False
        try:
            # get_message bounds its own wait: no outer timeout (see stop_requested).
            if await pubsub.get_message(timeout=interval):
                while await pubsub.get_message(timeout=0):
                    pass  # coalesce a burst of rings into one sweep
        except REDIS_DOWN:
            await pubsub.reset()
            return False
        return True

    async def publish_batch(self, cur: Any) -> int:
        """Publish one batch of outbox rows; return how many rows were handled."""
        now = asyncio.get_running_loop().time()
        self._held_back = {u: t for u, t in self._held_back.items() if t > now}
        rows = await store.fetch_outbox(cur, self._settings.batch_size, list(self._held_back))
        if not rows:
            return 0
        events = [encode_event(row) for row in rows]
        refused: list[StreamEvent] = []
        failed: set[int] = set()
        try:
            results = await self._publish(events)
            for event, result in zip(events, results[::2], strict=True):
                if isinstance(result, ResponseError):
                    if "equal or smaller" in str(result):
                        refused.append(event)
                    else:
                        # A WRONGTYPE key, say: hold that user's events back, without
                        # blocking everyone else's.
                        failed.add(event.user_id)
                        log.error(
                            "relay: cannot publish events of user %d: %s", event.user_id, result
                        )
            diverged = await self._diverged(refused)
            for user_id in diverged:
                await self._move_above_redis(cur, user_id)
        except REDIS_DOWN as exc:
            log.warning(
                "relay: redis unavailable, %d event(s) wait in the outbox: %s", len(rows), exc
            )
            return 0  # the caller waits a sweep interval before trying again
        now = asyncio.get_running_loop().time()
        for user_id in failed:
            self._held_back[user_id] = now + HOLD_BACK_SECONDS
        # A renumbered user's rows stay: they go out under their new numbers next sweep.
        skip = failed | diverged
        done = [(row.user_id, row.seq) for row in rows if row.user_id not in skip]
        gone = await store.delete_outbox(cur, done)
        self.published += len(done)
        if gone:
            await self._forget_streams(gone)
        return len(rows)

    async def _forget_streams(self, user_ids: list[int]) -> None:
        """Delete the streams of deleted accounts that this batch wrote to after the deletion
        had removed them (an id is never reused: this is about memory, not correctness)."""
        try:
            await self._redis.delete(*(self._keys.events(user_id) for user_id in user_ids))
        except REDIS_DOWN as exc:
            log.warning(
                "relay: could not delete the streams of deleted users %s: %s", user_ids, exc
            )

    async def _publish(self, events: list[StreamEvent]) -> list[Any]:
        """XADD each event to its user's stream and to the firehose, in one MULTI/EXEC;
        the replies, two per event."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for event in events:
                # Trimmed exactly: `maxlen` then bounds a user's stream in bytes too.
                pipe.xadd(
                    self._keys.events(event.user_id),
                    entry_fields(event),
                    id=event_id(event.seq),
                    maxlen=self._stream.maxlen,
                    approximate=False,
                )
                # Sent even when the per-user entry exists already: a relay that died
                # between the two must not leave live subscribers waiting.
                pipe.xadd(
                    self._keys.firehose(),
                    firehose_fields(event, self._stream.firehose_inline_bytes),
                    maxlen=self._stream.firehose_maxlen,
                    approximate=True,
                )
            return list(await pipe.execute(raise_on_error=False))

    async def _diverged(self, refused: list[StreamEvent]) -> set[int]:
        """Users for whom Redis refused an event id it holds *another* event under.

        A refused id normally means "published already" (a relay that died before deleting
        its rows). But after a database restore, or a failover to a lagging standby, the
        sequence falls behind what Redis holds, and the new event would vanish under an old
        one's id. Redis' entry at that id tells the two apart.
        """
        if not refused:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in refused:
                seq_id = event_id(event.seq)
                pipe.xrange(self._keys.events(event.user_id), min=seq_id, max=seq_id)
            held = await pipe.execute()
        diverged = set()
        for event, entries in zip(refused, held, strict=True):
            data = entries[0][1].get(b"data") if entries else None
            if data is None or data.decode() != event.data:
                diverged.add(event.user_id)
        return diverged

    async def _move_above_redis(self, cur: Any, user_id: int) -> None:
        """Renumber the user's pending events above Redis' newest, leaving one id unused:
        a subscriber of the old history then meets a gap that nothing can fill, and is
        sent `reset`; no id ever names two events."""
        newest = as_entries(await self._redis.xrevrange(self._keys.events(user_id), count=1))
        top = int(newest[0][0].partition(b"-")[0]) if newest else 0
        shift = await store.renumber_pending(cur, user_id, top + 2)
        if shift:
            log.warning(
                "relay: user %d's event sequence was behind redis (a restored database?):"
                " pending events renumbered from %d-0, clients will reset",
                user_id,
                top + 2,
            )


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """The doorbell and the relay loop run in every replica; only the leader publishes."""
    settings = app[keys.SETTINGS]
    keyspace = app[keys.KEYSPACE]
    redis = app[keys.REDIS]
    doorbell = Doorbell(redis, keyspace.doorbell())
    relay = Relay(settings.postgres, settings.relay, settings.stream, redis, keyspace)
    app[keys.DOORBELL] = doorbell
    app[keys.RELAY] = relay
    tasks = [
        asyncio.create_task(doorbell.run(), name="taskd-doorbell"),
        asyncio.create_task(relay.run(), name="taskd-relay"),
    ]
    try:
        yield
    finally:
        await stop_background(tasks)
