"""The keepalive sweep: one per process pings every live connection about once an interval,
drops WebSocket clients that stop answering and notices SSE clients that left."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from taskd import keys
from taskd.app import create_app
from taskd.background import stop_background
from taskd.keepalive import Keepalive, Kept
from taskd.server import Runner
from tests.conftest import ClientFactory, SettingsFactory, User, register_and_login
from tests.live import WAIT

Client = TestClient[web.Request, web.Application]
ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


class ServedAsInProduction(TestServer):
    """The test server with `taskd serve`'s runner: a handler is not cancelled when its client
    leaves (aiohttp's test server cancels it), so a stream must notice that by itself."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        return Runner(self.app, **kwargs)


async def _quiet_client(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, interval: float, **stream: int
) -> tuple[Client, User]:
    settings = make_settings(stream={"ping_interval": interval, **stream})
    client = await aiohttp_client(ServedAsInProduction(create_app(settings)))
    return client, await register_and_login(client, "quiet")


def _ws(user: User) -> AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse]:
    headers = {"Authorization": f"Bearer {user.access}"}
    return user.client.ws_connect("/api/ws/", headers=headers, autoping=False)


@dataclass
class Peer:
    """A WebSocket client reading in the background, answering the server's pings or not."""

    ws: aiohttp.ClientWebSocketResponse
    answers: bool
    pings: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    texts: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    pinged: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        while (message := await self.ws.receive()).type not in ENDED:
            if message.type == WSMsgType.PING:
                self.pinged += 1
                if self.answers:
                    await self.ws.pong(message.data)
                self.pings.put_nowait(None)
            elif message.type == WSMsgType.TEXT:
                self.texts.put_nowait(message.data)
        self.ended.set()


async def test_an_idle_sse_stream_gets_a_ping_comment_about_every_interval(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    interval = 0.3
    _, user = await _quiet_client(aiohttp_client, make_settings, interval)
    loop = asyncio.get_running_loop()
    pinged_at: list[float] = []
    async with user.sse() as stream, asyncio.timeout(WAIT):
        assert (await stream.response.content.readline()).startswith(b"retry: ")
        assert await stream.response.content.readline() == b"\n"
        while len(pinged_at) < 4:
            # What aiohttp-sse itself sends: a comment line, then the blank line ending it.
            assert await stream.response.content.readline() == b": ping\r\n"
            assert await stream.response.content.readline() == b"\r\n"
            pinged_at.append(loop.time())
    # Once a round, not in a burst: three gaps take more than one interval.
    assert pinged_at[-1] - pinged_at[0] > interval


async def test_a_websocket_that_does_not_answer_pings_is_dropped_one_that_does_stays(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client, user = await _quiet_client(aiohttp_client, make_settings, 0.3)
    keepalive = client.app[keys.KEEPALIVE]
    async with _ws(user) as silent_ws, _ws(user) as answering_ws:
        silent, answering = Peer(silent_ws, answers=False), Peer(answering_ws, answers=True)
        async with asyncio.TaskGroup() as group, asyncio.timeout(WAIT):
            group.create_task(silent.read())
            reading = group.create_task(answering.read())
            await silent.ended.wait()
            # Dropped at its turn after the first ping it left unanswered.
            assert silent.pinged in (1, 2)
            assert (keepalive.dropped, len(keepalive)) == (1, 1)
            # The one that answers outlives it by several pings, and still gets events.
            while not answering.pings.empty():
                answering.pings.get_nowait()
            for _ in range(3):
                await answering.pings.get()
            assert not answering.ended.is_set()
            await user.create_task("still here")
            assert '"task.created"' in await answering.texts.get()
            assert not answering_ws.closed
            reading.cancel()
    assert silent_ws.closed


async def test_the_server_answers_a_websocket_ping(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    _, user = await _quiet_client(aiohttp_client, make_settings, 15.0)
    async with _ws(user) as ws:
        await ws.ping(b"are you there")
        message = await ws.receive(timeout=WAIT)
    assert (message.type, message.data) == (WSMsgType.PONG, b"are you there")


async def test_the_sweep_pings_every_connection_once_a_round(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client, user = await _quiet_client(aiohttp_client, make_settings, 0.5, max_per_user=50)
    opened: list[int] = []
    pinged: list[int] = []  # which connection was pinged, in order

    async def sse(n: int) -> None:
        async with user.sse() as stream:
            opened.append(n)
            while line := await stream.response.content.readline():
                if line == b": ping\r\n":
                    pinged.append(n)

    async def ws(n: int) -> None:
        async with _ws(user) as socket:
            opened.append(n)
            while (message := await socket.receive()).type not in ENDED:
                if message.type == WSMsgType.PING:
                    await socket.pong(message.data)
                    pinged.append(n)

    async with asyncio.TaskGroup() as group:
        readers = [group.create_task(ws(n) if n % 2 else sse(n)) for n in range(50)]
        async with asyncio.timeout(WAIT):
            while len(opened) < 50:  # noqa: ASYNC110 - fifty readers: polled
                await asyncio.sleep(0.01)
            start = len(pinged)
            while len(set(pinged[start:])) < 50:  # noqa: ASYNC110 - polled
                await asyncio.sleep(0.01)
        window = collections.Counter(pinged[start:])
        assert len(client.app[keys.KEEPALIVE]) == 50
        assert not any(reader.done() for reader in readers)
        for reader in readers:
            reader.cancel()
    # From the moment all were open, every one was pinged before any was pinged a third time.
    assert max(window.values()) <= 2


async def test_an_sse_client_that_left_is_noticed_at_its_next_ping(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client, user = await _quiet_client(aiohttp_client, make_settings, 0.3)
    hub, keepalive = client.app[keys.HUB], client.app[keys.KEEPALIVE]
    async with user.sse() as stream:
        await stream.response.content.readline()
        assert hub.subscribers_of(user.id) == 1
    # The handler was waiting for an event that does not come: the failed ping ends it, and
    # with it aiohttp-sse's own ping task.
    async with asyncio.timeout(WAIT):
        while hub.subscribers_of(user.id) or _sse_ping_tasks():  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.01)
    assert (keepalive.dropped, len(keepalive)) == (1, 0)


def _sse_ping_tasks() -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "EventSourceResponse._ping"
    ]


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class Recorded(Kept):
    """A connection whose pings are recorded, or never finish (a client that reads nothing)."""

    __slots__ = ("ended", "pinged_at", "stuck")

    def __init__(self, stuck: bool = False) -> None:
        super().__init__(cast(Any, FakeTransport()))
        self.stuck = stuck
        self.pinged_at: list[float] = []
        self.ended = asyncio.Event()

    async def ping(self) -> None:
        self.pinged_at.append(asyncio.get_running_loop().time())
        if self.stuck:
            await asyncio.Event().wait()

    def lost(self) -> None:
        self.ended.set()


@contextlib.asynccontextmanager
async def _sweeping(keepalive: Keepalive) -> AsyncIterator[None]:
    task = asyncio.create_task(keepalive.run())
    try:
        yield
    finally:
        await stop_background([task, *keepalive.in_flight()])


async def test_connections_added_together_are_pinged_once_each_over_the_round() -> None:
    interval = 1.0
    keepalive = Keepalive(interval, send_timeout=10.0)
    kept = [Recorded() for _ in range(50)]
    for one in kept:
        keepalive.add(one)
    async with _sweeping(keepalive), asyncio.timeout(WAIT):
        while not all(one.pinged_at for one in kept):  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.01)
        times = sorted(one.pinged_at[0] for one in kept)
    assert all(len(one.pinged_at) <= 2 for one in kept)
    # In slices over the round, not all in one turn of the loop.
    assert times[-1] - times[0] > interval / 3
    assert len(keepalive) == 50


async def test_a_ping_that_cannot_be_written_within_send_timeout_aborts_its_connection() -> None:
    keepalive = Keepalive(0.2, send_timeout=0.3)
    stuck, fine = Recorded(stuck=True), Recorded()
    keepalive.add(stuck)
    keepalive.add(fine)
    async with _sweeping(keepalive), asyncio.timeout(WAIT):
        await stuck.ended.wait()
    assert cast(FakeTransport, stuck._transport).aborted
    assert len(stuck.pinged_at) == 1  # not pinged again while its ping was being written
    assert not fine.ended.is_set()
    assert (keepalive.dropped, len(keepalive)) == (1, 1)
