"""Redis: the client's lifecycle, every key name, and events as they travel through Redis."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, FieldT

from taskd import keys
from taskd.config import RedisSettings
from taskd.models import OutboxEvent, Task
from taskd.responses import task_body, timestamp
from taskd.schemas import BIGINT_MAX, DESCRIPTION_MAX, TITLE_MAX
from taskd.shards import REDIS_DOWN, RedisClient, Shards, make_redis

log = logging.getLogger(__name__)


class RedisKeys:
    """Redis key names, all under the configured namespace, spelled out only here.

    A user's keys share the hash tag `{<ns>:u<id>}`: on a Redis Cluster they sit in one slot,
    so the stream entry and the live message of an event go to one master in one pipeline.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def throttle(self, scope: str, ident: str, window: int) -> str:
        return f"{self.namespace}:throttle:{scope}:{window}:{ident}"

    def events(self, user_id: int) -> str:
        """The user's stream: entry ids are the dense event ids `<n>-0`."""
        return f"{{{self.namespace}:u{user_id}}}:events"

    def live(self, user_id: int) -> str:
        """The user's shard channel (SPUBLISH): their events as they are published."""
        return f"{{{self.namespace}:u{user_id}}}:live"

    def user_of_live(self, channel: bytes) -> int | None:
        """The user whose `live` channel this is; None for any other channel."""
        head = f"{{{self.namespace}:u".encode()
        if not (channel.startswith(head) and channel.endswith(b"}:live")):
            return None
        digits = channel[len(head) : -len(b"}:live")]
        return int(digits) if digits.isdigit() else None

    def doorbell(self) -> str:
        """Pub/Sub channel that wakes the relay after a commit."""
        return f"{self.namespace}:doorbell"

    def cutoffs(self) -> str:
        """Pub/Sub channel announcing `<user>:<generation>`: that user's older logins ended."""
        return f"{self.namespace}:cutoffs"

    def patterns(self) -> tuple[str, str]:
        """Every key of this namespace (for tests and tooling): the shared ones and the
        users' tagged ones. (Earlier versions' `<ns>:events:<id>` and `<ns>:firehose` too.)"""
        return f"{self.namespace}:*", f"{{{self.namespace}:u*"

    def retired(self) -> tuple[str, str]:
        """Patterns of keys earlier versions wrote and this one never reads: the firehose and
        the untagged user streams."""
        return f"{self.namespace}:firehose", f"{self.namespace}:events:*"


async def forget_namespace(settings: RedisSettings, retired_only: bool = False) -> int:
    """Delete every key of the namespace (or only the retired ones); return how many. For a
    brand-new schema: events left by another database under the same namespace would be
    taken for this one's."""
    client = make_redis(settings)
    keyspace = RedisKeys(settings.namespace)
    try:
        doomed = []
        for pattern in keyspace.retired() if retired_only else keyspace.patterns():
            doomed += [key async for key in client.scan_iter(match=pattern)]
        for start in range(0, len(doomed), 500):
            await client.delete(*doomed[start : start + 500])  # split by slot on a cluster
        return len(doomed)
    finally:
        await client.aclose()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """One client per process; a Redis that is down at start-up is not fatal."""
    settings = app[keys.SETTINGS].redis
    client = make_redis(settings)
    app[keys.REDIS] = client
    app[keys.SHARDS] = Shards(settings, client)
    try:
        await app[keys.SHARDS].ready()
        await client.ping()
    except REDIS_DOWN as exc:
        log.warning("redis not reachable at start-up (%s); carrying on without it", exc)
    try:
        yield
    finally:
        await client.aclose()
        if isinstance(client, Redis):
            await client.connection_pool.disconnect()


Entry = tuple[bytes, dict[bytes, bytes]]


def as_entries(reply: Any) -> list[Entry]:
    """XRANGE/XREVRANGE replies, typed (redis-py's own types are too loose to use)."""
    return list(reply or [])


def xread_entries(reply: Any, key: str) -> list[Entry]:
    """XREAD's RESP3 reply `{key: [[(id, fields), ...]]}` as a list of entries."""
    if not reply:
        return []
    value = reply.get(key.encode()) or reply.get(key) or []
    return as_entries(value[0] if value and isinstance(value[0], list) else value)


# --- events --------------------------------------------------------------------------------

EVENT_ID = re.compile(r"^(0|[1-9][0-9]{0,18})-0$")


def event_id(seq: int) -> str:
    return f"{seq}-0"


def parse_event_id(raw: str) -> int | None:
    """The n of a resume id `<n>-0`; None when malformed."""
    match = EVENT_ID.match(raw)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of one user: `data` is the JSON sent to clients, serialised once.

    `data` is None for a live message's reference to an event too big to copy there: the reader
    takes it from the user's stream (`StreamReader`).
    """

    user_id: int
    seq: int
    type: str
    data: str | None

    @property
    def size(self) -> int:
        """Bytes it holds in a queue, roughly (the object overhead included)."""
        return EVENT_OVERHEAD_BYTES + (len(self.data) if self.data is not None else 0)


EVENT_OVERHEAD_BYTES = 200


def encode_event(row: OutboxEvent) -> StreamEvent:
    """The API.md event for an outbox row."""
    task = {"id": row.task_id, "version": row.version} if row.task is None else task_body(row.task)
    body = {"id": event_id(row.seq), "type": row.kind, "task": task, "at": timestamp(row.at)}
    return StreamEvent(row.user_id, row.seq, row.kind, json.dumps(body, ensure_ascii=False))


def entry_fields(event: StreamEvent) -> dict[FieldT, EncodableT]:
    """What an event carries in its user's stream: everything."""
    assert event.data is not None, "only whole events are published"
    return {"user": event.user_id, "seq": event.seq, "type": event.type, "data": event.data}


def live_message(event: StreamEvent, inline_bytes: int) -> bytes:
    """What it carries on its user's live channel: `<user> <seq> <type>` and a newline, then
    the event, or for a big one nothing (a reference: the hub reads it from the stream), so
    that a burst of big events cannot fill the Pub/Sub buffers (README, "Memory bounds")."""
    head = f"{event.user_id} {event.seq} {event.type}\n".encode()
    data = event.data.encode() if event.data is not None else b""
    return head + data if len(data) <= inline_bytes else head


def event_from_message(message: bytes) -> StreamEvent:
    """The event of a live message (ValueError when it is not one)."""
    head, sep, data = message.partition(b"\n")
    user, seq, kind = head.decode().split(" ")
    if not sep:
        raise ValueError("no header")
    return StreamEvent(int(user), int(seq), kind, data.decode() if data else None)


def event_from_entry(fields: Mapping[bytes, bytes]) -> StreamEvent:
    data = fields.get(b"data")
    return StreamEvent(
        int(fields[b"user"]),
        int(fields[b"seq"]),
        fields[b"type"].decode(),
        None if data is None else data.decode(),
    )


def max_event_bytes() -> int:
    """The largest event the API allows, in bytes of `data`: every character of a longest
    title and description a control character, which JSON writes as six (`\\u0001`)."""
    biggest = datetime.max.replace(tzinfo=UTC)
    task = Task(
        BIGINT_MAX,
        BIGINT_MAX,
        "\x01" * TITLE_MAX,
        "\x01" * DESCRIPTION_MAX,
        False,
        biggest,
        biggest,
        2**31 - 1,
    )
    row = OutboxEvent(BIGINT_MAX, BIGINT_MAX, "task.created", BIGINT_MAX, 2**31 - 1, task, biggest)
    data = encode_event(row).data
    assert data is not None
    return len(data.encode())


# One slice of a user's stream, cut by bytes as well as by count, so that a client catching up
# on big events never makes its replica hold more than about `budget` bytes for it. XRANGE
# alone cannot: it knows counts only. Returns {entries, 1 if more may follow else 0}.
READ_SLICE = """
local start, budget, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, used = {}, 0
while true do
  local chunk = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 16)
  if #chunk == 0 then return {out, 0} end
  for _, entry in ipairs(chunk) do
    local size = 0
    for i = 2, #entry[2], 2 do size = size + #entry[2][i] end
    if #out >= limit or (#out > 0 and used + size > budget) then return {out, 1} end
    out[#out + 1] = entry
    used = used + size
    start = '(' .. entry[1]
  end
end
"""


class Script:
    """A Lua script run by its hash, sent whole to the one node that does not know it yet.

    redis-py's own Script loads a missing script with SCRIPT LOAD on every primary of a
    cluster, which fails while one of them is down (and a promoted replica knows no scripts):
    EVAL on the node the key lives on caches it there instead.
    """

    def __init__(self, redis: RedisClient, source: str) -> None:
        self._redis = redis
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await self._redis.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._redis.eval(self._source, len(keys), *keys, *args)


class StreamReader:
    """Reads one user's stream after a position, in slices bounded by bytes and count."""

    def __init__(self, redis: RedisClient, keyspace: RedisKeys, budget: int, limit: int) -> None:
        self._script = Script(redis, READ_SLICE)
        self._keys = keyspace
        self._budget = budget
        self._limit = limit

    async def after(self, user_id: int, seq: int) -> tuple[list[StreamEvent], bool]:
        """The events after `seq` (one slice), and whether more may follow them."""
        args: list[str | int] = [event_id(seq + 1), self._budget, self._limit]
        entries, more = await self._script(keys=[self._keys.events(user_id)], args=args)
        events = []
        for _, flat in entries:
            events.append(event_from_entry(dict(zip(flat[::2], flat[1::2], strict=True))))
        return events, bool(more)
