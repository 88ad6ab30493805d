"""Real live-update clients for tests: an SSE reader over aiohttp and WebSocket helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from taskd.config import Settings
from taskd.streams import RedisKeys

WAIT = 15.0  # upper bound for an awaited event; tests never sleep for a fixed time


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def seq(self) -> int:
        assert self.id is not None
        return int(self.id.split("-")[0])


@dataclass
class SseStream:
    """Parses `text/event-stream` as a browser's EventSource does."""

    response: aiohttp.ClientResponse
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    async def _line(self) -> str | None:
        try:
            raw = await self.response.content.readline()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            return None  # the server cut the connection (a browser would reconnect)
        if not raw:
            return None  # the server ended the stream
        return raw.decode().rstrip("\r\n")

    async def next(self, wait: float = WAIT) -> SseEvent | None:
        """The next event (None when the stream ends); comments and `retry:` are recorded."""
        async with asyncio.timeout(wait):
            fields: dict[str, str] = {}
            data: list[str] = []
            while True:
                line = await self._line()
                if line is None:
                    return None
                if line == "":
                    if data or fields:
                        return SseEvent(
                            fields.get("id"), fields.get("event", "message"), "\n".join(data)
                        )
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "retry":
                    self.retry = int(value)
                else:
                    fields[name] = value

    async def take(self, count: int, wait: float = WAIT) -> list[SseEvent]:
        events = []
        for _ in range(count):
            event = await self.next(wait)
            assert event is not None, f"stream ended after {events}"
            events.append(event)
        return events

    async def ends(self, wait: float = WAIT) -> list[SseEvent]:
        """Read until the server ends the stream; return what came before."""
        events = []
        while (event := await self.next(wait)) is not None:
            events.append(event)
        return events


@contextlib.asynccontextmanager
async def raw_redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's Redis, for inspecting or breaking things on purpose."""
    client = aioredis.Redis.from_url(settings.redis.url.get_secret_value(), protocol=3)
    try:
        yield client
    finally:
        await client.aclose()


async def trim_events(settings: Settings, user_id: int, keep: int) -> None:
    """What MAXLEN trimming or a Redis that lost its tail leaves: old entries gone."""
    async with raw_redis(settings) as redis:
        key = RedisKeys(settings.redis.namespace).events(user_id)
        await redis.xtrim(key, maxlen=keep, approximate=False)


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes no HTTP client library would send; parse the status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            raw = await reader.read()  # nginx closes the connection after an error
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body
