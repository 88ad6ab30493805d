"""Redis: the client's lifecycle, every key name, and events as they travel through Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from taskd import keys
from taskd.config import RedisSettings
from taskd.schemas import task_body, timestamp
from taskd.store import OutboxEvent

log = logging.getLogger(__name__)

# Errors that mean "Redis is not answering" on a request path.
REDIS_DOWN = (RedisError, OSError, TimeoutError)


def stop_requested() -> bool:
    """True once the current task has been asked to cancel.

    redis-py's reads nest their own timeouts, and on Python 3.11 a cancellation that meets an
    expiring timeout can surface as a timeout (or a None reply) instead of CancelledError.
    Long-running loops check this so that shutdown never hangs on such a swallowed cancel.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop_background(tasks: list[asyncio.Task[None]], patience: float = 5.0) -> None:
    """Cancel background tasks and wait for them, cancelling again if a cancel was swallowed
    (see stop_requested); give up after `patience` seconds rather than hang a shutdown."""
    deadline = asyncio.get_running_loop().time() + patience
    pending = {task for task in tasks if not task.done()}
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in pending:
        log.error("background task %s did not stop", task.get_name())


class Keys:
    """Redis key names, all under the configured namespace, spelled out only here."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def throttle(self, scope: str, ident: str, window: int) -> str:
        return f"{self.namespace}:throttle:{scope}:{window}:{ident}"

    def events(self, user_id: int) -> str:
        """The user's stream: entry ids are the dense event ids `<n>-0`."""
        return f"{self.namespace}:events:{user_id}"

    def firehose(self) -> str:
        """Every user's events, for the hubs to tail with one read per process."""
        return f"{self.namespace}:firehose"

    def doorbell(self) -> str:
        """Pub/Sub channel that wakes the relay after a commit."""
        return f"{self.namespace}:doorbell"

    def pattern(self) -> str:
        """Every key of this namespace (for tests and tooling)."""
        return f"{self.namespace}:*"


def make_redis(settings: RedisSettings) -> Redis:
    """A pooled client: bounded connections, short timeouts and at most one retry.

    RESP3 is pinned because reply shapes differ between protocols; the pool blocks (briefly)
    rather than raising when every connection is busy (redis-py issue 2517).
    """
    pool = BlockingConnectionPool.from_url(
        settings.url.get_secret_value(),
        max_connections=settings.max_connections,
        timeout=settings.timeout,
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.timeout,
        protocol=3,
        retry=Retry(NoBackoff(), 1),
        client_name=f"taskd:{settings.namespace}",  # CLIENT LIST shows whose connections
    )
    return Redis(connection_pool=pool)


async def forget_namespace(settings: RedisSettings) -> int:
    """Delete every key of the namespace; return how many. For a brand-new schema: events
    left by another database under the same namespace would be taken for this one's."""
    client = make_redis(settings)
    try:
        doomed = [key async for key in client.scan_iter(match=Keys(settings.namespace).pattern())]
        for start in range(0, len(doomed), 500):
            await client.delete(*doomed[start : start + 500])
        return len(doomed)
    finally:
        await client.aclose()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """One client per process; a Redis that is down at start-up is not fatal."""
    client = make_redis(app[keys.SETTINGS].redis)
    app[keys.REDIS] = client
    try:
        await client.ping()
    except REDIS_DOWN as exc:
        log.warning("redis not reachable at start-up (%s); carrying on without it", exc)
    try:
        yield
    finally:
        await client.aclose()
        await client.connection_pool.disconnect()


# --- events --------------------------------------------------------------------------------

EVENT_ID = re.compile(r"^(0|[1-9][0-9]{0,18})-0$")


def event_id(seq: int) -> str:
    return f"{seq}-0"


def parse_event_id(raw: str) -> int | None:
    """The n of a resume id `<n>-0`; None when malformed."""
    match = EVENT_ID.match(raw)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class Event:
    """One event of one user: `data` is the JSON sent to clients, serialised once."""

    user_id: int
    seq: int
    type: str
    data: str


def encode_event(row: OutboxEvent) -> Event:
    """The API.md event for an outbox row."""
    task = {"id": row.task_id, "version": row.version} if row.task is None else task_body(row.task)
    body = {"id": event_id(row.seq), "type": row.kind, "task": task, "at": timestamp(row.at)}
    return Event(row.user_id, row.seq, row.kind, json.dumps(body, ensure_ascii=False))


def entry_fields(event: Event) -> dict[FieldT, EncodableT]:
    """What an event carries in a Redis Stream entry (the per-user stream and the firehose)."""
    return {"user": event.user_id, "seq": event.seq, "type": event.type, "data": event.data}


def event_from_entry(fields: Mapping[bytes, bytes]) -> Event:
    return Event(
        int(fields[b"user"]),
        int(fields[b"seq"]),
        fields[b"type"].decode(),
        fields[b"data"].decode(),
    )
