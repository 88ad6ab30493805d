"""Subscriber processes: each holds many SSE or WebSocket connections, records when every
event arrives (time.monotonic(), which is CLOCK_MONOTONIC and so comparable between
processes on one machine), and reports its own CPU use and event-loop lag.

The parent drives one process through a pipe: the process opens its connections and answers
("opened", ...); then ("go",) starts the measured window, ("expect", {account: seq}, wait)
waits until every connection has seen its user's event `seq` (or `wait` seconds) and
answers ("results", ...), and ("close",) ends it. A connection that ends is reopened with
its last event id, as a browser's EventSource does, so a lost or repeated event shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from bench.stats import LagMonitor, own_cpu_seconds

WS_RETRY = 0.25  # seconds before a closed WebSocket reconnects (SSE follows `retry:`)
TIMEOUT = aiohttp.ClientTimeout(total=None, connect=30, sock_read=None)


@dataclass(frozen=True)
class Subscription:
    sub: int  # index among all subscriptions of the case
    account: int  # Account.index of its user
    token: str
    # The position the client knows (API.md: the list's X-Stream-Position). Without it, a
    # client that received nothing yet would resume from "now" and miss what came meanwhile.
    start: str


@dataclass(frozen=True)
class Spec:
    url: str
    transport: str  # "sse" or "ws"
    subscriptions: list[Subscription]
    open_concurrency: int = 64  # handshakes in flight per process while opening


@dataclass
class Client:
    """One subscription: a connection, reopened with its last event id whenever it ends."""

    subscription: Subscription
    received: list[tuple[int, float]] = field(default_factory=list)  # (event number, when)
    opens: list[float] = field(default_factory=list)  # when each stream was established
    ends: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)  # refused, status 503, ...
    resets: int = 0
    reauths: int = 0
    last_id: str | None = None
    top: int = 0  # highest event number received
    retry: float = 2.0  # the SSE `retry:` hint, in seconds
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event | None = None  # shared: wakes whoever waits for events

    def __post_init__(self) -> None:
        self.last_id = self.subscription.start

    def got(self, event_id: str, kind: str, at: float) -> None:
        self.last_id = event_id
        seq = int(event_id.split("-", 1)[0])
        if kind == "reset":
            self.resets += 1  # never expected in a benchmark: it means history was lost
        else:
            self.received.append((seq, at))
        self.top = max(self.top, seq)
        if self.progress is not None:
            self.progress.set()

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def report(self) -> dict[str, Any]:
        return {
            "sub": self.subscription.sub,
            "account": self.subscription.account,
            "received": self.received,
            "opens": self.opens,
            "ends": self.ends,
            "failures": self.failures,
            "resets": self.resets,
            "reauths": self.reauths,
        }


async def run_sse(http: aiohttp.ClientSession, url: str, client: Client) -> None:
    headers = {"Authorization": f"Bearer {client.subscription.token}"}
    if client.last_id:
        headers["Last-Event-ID"] = client.last_id
    async with http.get(f"{url}/api/stream/", headers=headers) as resp:
        if resp.status != 200:
            client.failed(f"status {resp.status}")
            return
        client.opens.append(time.monotonic())
        client.opened.set()
        event_id = kind = None
        at = 0.0
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("id:"):
                at = time.monotonic()  # the event's lines arrive in one write
                event_id = line[3:].strip()
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("retry:"):
                client.retry = int(line[6:].strip()) / 1000
            elif not line:
                if kind == "reauth":
                    client.reauths += 1
                elif event_id is not None:
                    client.got(event_id, kind or "message", at)
                event_id = kind = None
    client.ends.append(time.monotonic())


async def run_ws(http: aiohttp.ClientSession, url: str, client: Client) -> None:
    query = f"?last_event_id={client.last_id}" if client.last_id else ""
    headers = {"Authorization": f"Bearer {client.subscription.token}"}
    try:
        socket = await http.ws_connect(f"{url}/api/ws/{query}", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        client.failed(f"status {exc.status}")
        return
    async with socket:
        client.opens.append(time.monotonic())
        client.opened.set()
        async for message in socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            at = time.monotonic()
            event = json.loads(message.data)
            if event.get("type") == "reauth":
                client.reauths += 1
            elif "id" in event:
                client.got(event["id"], str(event.get("type")), at)
    client.ends.append(time.monotonic())
    client.retry = WS_RETRY


async def keep_open(http: aiohttp.ClientSession, spec: Spec, client: Client) -> None:
    run = run_sse if spec.transport == "sse" else run_ws
    if spec.transport == "ws":
        client.retry = WS_RETRY  # no `retry:` hint on a WebSocket
    while True:
        try:
            await run(http, spec.url, client)
        except aiohttp.ClientConnectorError:
            client.failed("refused")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            client.failed(type(exc).__name__)
        await asyncio.sleep(client.retry)


async def _open_all(
    http: aiohttp.ClientSession, spec: Spec, progress: asyncio.Event
) -> tuple[list[Client], list[asyncio.Task[None]]]:
    clients = [Client(s, progress=progress) for s in spec.subscriptions]
    gate = asyncio.Semaphore(spec.open_concurrency)
    tasks: list[asyncio.Task[None]] = []

    async def open_one(client: Client) -> None:
        async with gate:  # bounded handshakes in flight: the server's accept backlog is finite
            tasks.append(asyncio.create_task(keep_open(http, spec, client)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.opened.wait(), 60)

    await asyncio.gather(*(open_one(c) for c in clients))
    return clients, tasks


async def _until_seen(
    clients: list[Client], expected: dict[int, int], wait: float, progress: asyncio.Event
) -> None:
    """Until every client has its user's event `expected[account]`, or `wait` seconds."""
    deadline = time.monotonic() + wait
    while any(c.top < expected.get(c.subscription.account, 0) for c in clients):
        progress.clear()
        try:
            await asyncio.wait_for(progress.wait(), deadline - time.monotonic())
        except TimeoutError:
            return


async def serve(conn: Connection, spec: Spec) -> None:
    loop = asyncio.get_running_loop()
    lag = LagMonitor()
    lag.start()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as http:
        started = time.monotonic()
        progress = asyncio.Event()  # set on every event received
        clients, tasks = await _open_all(http, spec, progress)
        opened = sum(bool(c.opens) for c in clients)
        conn.send(("opened", {"opened": opened, "seconds": time.monotonic() - started}))
        cpu = own_cpu_seconds()
        window = time.monotonic()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "go":
                await lag.stop()
                lag = LagMonitor()
                lag.start()
                cpu, window = own_cpu_seconds(), time.monotonic()
            elif command[0] == "expect":
                await _until_seen(clients, command[1], command[2], progress)
                wall = max(1e-9, time.monotonic() - window)
                stats = {
                    **(await lag.stop()),
                    "cpu_pct": round(100 * (own_cpu_seconds() - cpu) / wall, 1),
                    "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    "connections": len(clients),
                }
                conn.send(("results", {"clients": [c.report() for c in clients], "stats": stats}))
            elif command[0] == "close":
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                break


def main(conn: Connection, spec: Spec) -> None:
    """Process entry point (multiprocessing, spawn)."""
    # The parent stops this process; a Ctrl-C in the terminal reaches the parent only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # 2,500 sockets per process are over the usual soft limit of 1,024.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(serve(conn, spec))
    finally:
        conn.close()
