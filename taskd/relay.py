"""The relay: one leader cluster-wide publishes outbox rows to the users' Redis Streams and
live channels.

Election is a Postgres advisory lock held on a dedicated session. The server drops that
session (and so the lock) when it goes quiet for `lease_seconds` (idle_session_timeout, TCP
keepalives and user timeout), so a dead, hung or partitioned leader is replaced in seconds.
Publication is at-least-once and harmless to repeat: per-user entry ids are the dense event
ids, and Redis refuses an id at or below a stream's top. On a Redis Cluster a batch goes out
as one pipeline per master (a user's keys share a slot), on a plain connection to it.
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
from redis.exceptions import RedisClusterException, ResponseError

from taskd import db, keys, store
from taskd.background import (
    Backoff,
    ServerCancelled,
    stop_background,
    stop_requested,
    supervise,
)
from taskd.config import PostgresSettings, RedisSettings, RelaySettings, StreamSettings
from taskd.shards import REDIS_DOWN, Node, RedisClient, Shards, retryable
from taskd.streams import (
    RedisKeys,
    StreamEvent,
    as_entries,
    encode_event,
    entry_fields,
    event_id,
    live_message,
)

log = logging.getLogger(__name__)

HOLD_BACK_SECONDS = 30.0  # a user whose events Redis refuses is retried after this
RETRY_HOLD_SWEEPS = 2  # ... and one whose master is away, after this many sweep intervals


class NotReplicated(ConnectionError):
    """WAIT saw fewer replicas hold a batch than `[redis] wait_replicas` asks for."""


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

    def __init__(self, redis: RedisClient, channel: str) -> None:
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
        redis_settings: RedisSettings,
        redis: RedisClient,
        shards: Shards,
        keyspace: RedisKeys,
    ) -> None:
        self._postgres = postgres
        self._settings = relay
        self._stream = stream
        self._redis_settings = redis_settings
        self._redis = redis
        self._shards = shards
        self._keys = keyspace
        self._nodes: dict[Node, Redis] = {}  # a cluster master's own connection, for pipelines
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
            await self._close_nodes()

    async def _close_nodes(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for client in nodes.values():
            with contextlib.suppress(*REDIS_DOWN):
                await client.aclose()

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
        # Its own connection (to any node of a cluster: PUBLISH reaches every node).
        bell = self._shards.direct(self._shards.any_node(), "doorbell", read_timeout=None)
        pubsub = bell.pubsub(ignore_subscribe_messages=True)
        try:
            subscribed = False
            while not stop_requested():
                if not subscribed:
                    with contextlib.suppress(*REDIS_DOWN):
                        async with asyncio.timeout(self._redis_settings.timeout):
                            await pubsub.subscribe(self._keys.doorbell())
                        subscribed = True
                if await self.publish_batch(cur) < self._settings.batch_size:
                    subscribed = await self._wait_for_work(pubsub, subscribed)
        finally:
            with contextlib.suppress(*REDIS_DOWN):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await bell.aclose()

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
        retry: set[int] = set()
        why: Exception | None = None  # what the first of them met
        try:
            for event, result in zip(events, await self._publish(events), strict=True):
                if not isinstance(result, Exception):
                    continue
                if isinstance(result, ResponseError) and "equal or smaller" in str(result):
                    refused.append(event)
                elif retryable(result):
                    retry.add(event.user_id)
                    why = result
                else:
                    # A WRONGTYPE key, say: hold that user's events back, without
                    # blocking everyone else's.
                    failed.add(event.user_id)
                    log.error("relay: cannot publish events of user %d: %s", event.user_id, result)
            diverged = await self._diverged(refused)
            for user_id in diverged:
                await self._move_above_redis(cur, user_id)
        except REDIS_DOWN as exc:
            log.warning(
                "relay: redis unavailable, %d event(s) wait in the outbox: %s", len(rows), exc
            )
            return 0  # the caller waits a sweep interval before trying again
        if retry:
            log.warning(
                "relay: %d user(s)' events wait in the outbox for redis: %r", len(retry), why
            )
            with contextlib.suppress(*REDIS_DOWN):
                await self._shards.refresh()
        now = asyncio.get_running_loop().time()
        for user_id in failed:
            self._held_back[user_id] = now + HOLD_BACK_SECONDS
        for user_id in retry:
            # Skipped by the next batch (which comes after a sweep interval when this one
            # published nothing): the oldest rows, a down master's, must not fill every
            # batch and stop the other masters' users.
            self._held_back[user_id] = now + RETRY_HOLD_SWEEPS * self._settings.sweep_interval
        # A renumbered user's rows stay: they go out under their new numbers next sweep.
        skip = failed | diverged | retry
        done = [(row.user_id, row.seq) for row in rows if row.user_id not in skip]
        gone = await store.delete_outbox(cur, done)
        self.published += len(done)
        if gone:
            await self._forget_streams(gone)
        return len(rows) if done else 0  # nothing went out: wait for the next sweep

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
        """Publish the events, one pipeline per master; each one's XADD reply, or the
        exception that stopped its master's pipeline."""
        by_node: dict[Node, list[int]] = {}
        replies: list[Any] = [None] * len(events)
        for i, event in enumerate(events):
            try:
                node = self._shards.node_of(self._keys.events(event.user_id))
            except RedisClusterException as exc:  # its slot has no master right now
                replies[i] = exc
                continue
            by_node.setdefault(node, []).append(i)
        outcomes = await asyncio.gather(
            *(self._publish_to(node, [events[i] for i in at]) for node, at in by_node.items()),
            return_exceptions=True,
        )
        for (node, wanted), outcome in zip(by_node.items(), outcomes, strict=True):
            if isinstance(outcome, BaseException) and node in self._nodes:
                with contextlib.suppress(*REDIS_DOWN):  # a fresh connection next time
                    await self._nodes.pop(node).aclose()
            for n, i in enumerate(wanted):
                replies[i] = outcome if isinstance(outcome, BaseException) else outcome[n]
        return replies

    async def _publish_to(self, node: Node, events: list[StreamEvent]) -> list[Any]:
        """On one master, in one round trip: XADD each event to its user's stream and
        SPUBLISH it on their live channel; then WAIT for replicas when configured."""
        wait = self._redis_settings.wait_replicas
        async with self._client_of(node).pipeline(transaction=False) as pipe:
            for event in events:
                # Trimmed exactly: `maxlen` then bounds a user's stream in bytes too.
                pipe.xadd(
                    self._keys.events(event.user_id),
                    entry_fields(event),
                    id=event_id(event.seq),
                    maxlen=self._stream.maxlen,
                    approximate=False,
                )
                # Sent even when the entry exists already: a relay that died between the two
                # must not leave live subscribers waiting.
                pipe.spublish(
                    self._keys.live(event.user_id),
                    live_message(event, self._stream.live_inline_bytes),
                )
            if wait:
                pipe.execute_command("WAIT", wait, self._redis_settings.wait_timeout_ms)
            replies = list(await pipe.execute(raise_on_error=False))
        if wait and not (isinstance(replies[-1], int) and replies[-1] >= wait):
            raise NotReplicated(f"WAIT {wait}: {replies[-1]!r} replica(s) hold the batch")
        return replies[: 2 * len(events) : 2]

    def _client_of(self, node: Node) -> Redis:
        """The pooled client of a single instance; a master's own connection on a cluster
        (a cluster pipeline cannot WAIT on the connection it wrote on, nor stay one trip)."""
        if isinstance(self._redis, Redis):
            return self._redis
        if node not in self._nodes:
            timeout = self._redis_settings.timeout + self._redis_settings.wait_timeout_ms / 1000
            self._nodes[node] = self._shards.direct(node, "relay", read_timeout=timeout)
        return self._nodes[node]

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
    relay = Relay(
        settings.postgres,
        settings.relay,
        settings.stream,
        settings.redis,
        redis,
        app[keys.SHARDS],
        keyspace,
    )
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
