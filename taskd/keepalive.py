"""One ping sweep per process for every live connection, instead of a task or timer per
connection: each connection is pinged once every `stream.ping_interval`, a slice of them per
tick, so that no turn of the event loop pings thousands at once (per-connection pings and
the wake-ups around them were most of the live tail at 10,000 connections)."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from taskd import keys
from taskd.background import stop_background

log = logging.getLogger(__name__)

# Seconds between two slices of the sweep; a round (one ping interval) is a whole number of
# them, and at most MAX_SLICES (a long interval gets longer ticks, not thousands of slices).
TICK = 0.1
MAX_SLICES = 600


class Kept(abc.ABC):
    """A live connection as the sweep sees it: `views.live` says how to ping one and how its
    handler learns that it is over. Small (slots, no task): a process holds ten thousand."""

    __slots__ = ("_sending", "_slice", "_transport", "_unanswered")

    # Whether the peer answers each ping (a WebSocket pong): one that stays silent from one
    # ping to the next is dropped. An SSE client never answers; a failed write drops it.
    answers = False

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self._transport = transport
        self._slice = -1  # not swept
        self._sending = False  # a ping is being written
        self._unanswered = False  # pinged, and nothing heard since

    def heard(self) -> None:
        """Something arrived from the peer: it is alive, whatever the last ping was."""
        self._unanswered = False

    @abc.abstractmethod
    async def ping(self) -> None:
        """Write one ping; raises what a failed write raises."""

    def lost(self) -> None:  # noqa: B027 - a hook; a WebSocket's reader sees its end itself
        """The connection is over (closing, or aborted by the sweep): end its handler."""


class Keepalive:
    """Pings every kept connection once a round, a slice per tick; ends those whose ping
    cannot be written within `send_timeout` and (WebSocket) those that stopped answering."""

    def __init__(self, interval: float, send_timeout: float) -> None:
        slices = min(MAX_SLICES, max(1, round(interval / TICK)))
        self._interval = interval
        self._tick = interval / slices
        self._send_timeout = send_timeout
        self._slices: list[set[Kept]] = [set() for _ in range(slices)]
        self._turn = 0  # the slice pinged next
        self._next_slice = 0  # where the next connection goes
        # Pings being written, with their connection and deadline: a ping's write mostly
        # finishes in its task's first step; one that waits on a full buffer is timed here,
        # by the sweep, not with a timer of its own.
        self._pings: dict[asyncio.Task[None], tuple[Kept, float]] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return sum(map(len, self._slices))

    def add(self, kept: Kept) -> None:
        """Sweep `kept` from now on. Slices are filled in turn, not by time: connections that
        open together (a replica's clients reconnecting at once) are spread over the round,
        and each is first pinged within an interval."""
        kept._slice = self._next_slice
        self._slices[kept._slice].add(kept)
        self._next_slice = (self._next_slice + 1) % len(self._slices)

    def discard(self, kept: Kept) -> None:
        """Sweep `kept` no more (its handler is ending); a ping being written may finish."""
        if kept._slice >= 0:
            self._slices[kept._slice].discard(kept)
            kept._slice = -1

    def in_flight(self) -> list[asyncio.Task[None]]:
        return list(self._pings)

    async def run(self) -> None:
        """Forever: a slice every tick, on a fixed schedule so that a round lasts one interval
        (a slow turn is caught up on, a stall longer than a round is not)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self._tick
            now = loop.time()
            if due < now - self._interval:
                due = now
            await asyncio.sleep(due - now)
            now = loop.time()
            self._expire(now)
            self._sweep(self._slices[self._turn], now + self._send_timeout)
            self._turn = (self._turn + 1) % len(self._slices)

    def _expire(self, now: float) -> None:
        for task, (kept, deadline) in list(self._pings.items()):
            if deadline <= now:
                self._drop(kept, "ping not written within send_timeout", stalled=True)
                task.cancel()

    def _sweep(self, kept_slice: set[Kept], deadline: float) -> None:
        for kept in tuple(kept_slice):
            if kept._sending:
                continue  # the last ping is still being written: its deadline decides
            if kept.answers and kept._unanswered:
                self._drop(kept, "no answer to the last ping", stalled=True)
                continue
            kept._unanswered = True
            kept._sending = True
            # A task per ping, not per connection: done in one step unless the write waits.
            task = asyncio.create_task(self._ping(kept))
            self._pings[task] = (kept, deadline)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._pings.pop(task, None)

    async def _ping(self, kept: Kept) -> None:
        try:
            await kept.ping()
        except (ConnectionResetError, RuntimeError):  # RuntimeError: written after its EOF
            self._drop(kept, "ping not written: the connection is closing", stalled=False)
        except Exception:
            log.exception("keepalive: ping failed unexpectedly")
            self._drop(kept, "ping failed unexpectedly", stalled=True)
        finally:
            kept._sending = False

    def _drop(self, kept: Kept, reason: str, *, stalled: bool) -> None:
        """End a connection. A silent or stalled one is aborted: a peer that answers no ping
        would not answer a close handshake either, and a graceful close waits for a send
        buffer that does not drain. One that failed a write is closing already: its handler
        is only told."""
        if kept._slice < 0:
            return  # its handler ended meanwhile (the connection may serve another request)
        self.discard(kept)
        self.dropped += 1
        log.log(logging.INFO if stalled else logging.DEBUG, "keepalive: dropped (%s)", reason)
        if stalled and kept._transport is not None:
            kept._transport.abort()
        kept.lost()


async def keepalive_ctx(app: web.Application) -> AsyncIterator[None]:
    stream = app[keys.SETTINGS].stream
    keepalive = Keepalive(stream.ping_interval, stream.send_timeout)
    app[keys.KEEPALIVE] = keepalive
    task = asyncio.create_task(keepalive.run(), name="taskd-keepalive")
    try:
        yield
    finally:
        await stop_background([task, *keepalive.in_flight()])
