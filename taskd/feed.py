"""One client's stream: catch-up from the user's Redis Stream, then live from the hub,
gapless and without repeats.

Ids are dense per user, so a feed at `last` expects `last + 1`: anything lower is a repeat,
anything higher means something is missing, which is filled from the user's stream, or
answered with a `reset` when Redis no longer has it (DESIGN.md, "Read path").
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from taskd import db, keys, store
from taskd.config import StreamSettings
from taskd.hub import Hub
from taskd.models import StreamState
from taskd.streams import StreamEvent, StreamReader, event_id, parse_event_id
from taskd.subscription import Closed, Subscription


@dataclass(frozen=True, slots=True)
class ResetNotice:
    """The client must re-read the list; the stream continues after `position`."""

    reason: str  # "trimmed" | "malformed" | "ahead"
    position: int

    @property
    def data(self) -> str:
        body = {"type": "reset", "reason": self.reason, "position": event_id(self.position)}
        return json.dumps(body)


Item = StreamEvent | ResetNotice


def payload(item: Item) -> str:
    """The JSON a client is sent for an item (a feed yields only whole events)."""
    if item.data is None:
        raise AssertionError(f"a reference reached a client: {item}")
    return item.data


class Feed:
    """What one client receives. It holds at most one catch-up slice (`catch_up_bytes`) and
    what its subscription queued (`queue_bytes`): a client that never reads costs its
    replica a bounded amount, however big the events it is behind on."""

    __slots__ = (
        "_ahead",
        "_ahead_bytes",
        "_hub",
        "_need_fill",
        "_pool",
        "_reader",
        "_ready",
        "_settings",
        "_sub",
        "last",
    )

    def __init__(
        self,
        hub: Hub,
        sub: Subscription,
        pg_pool: Any,
        reader: StreamReader,
        settings: StreamSettings,
    ) -> None:
        self._hub = hub
        self._sub = sub
        self._pool = pg_pool
        self._reader = reader
        self._settings = settings
        self.last = 0
        self._ready: list[Item] = []  # short (a slice at most); a deque weighs 600 bytes empty
        self._ahead: dict[int, StreamEvent] = {}  # live events past a gap, by seq
        self._ahead_bytes = 0
        self._need_fill = False

    @classmethod
    async def open(cls, app: web.Application, user_id: int, kind: str, resume: str | None) -> Feed:
        """Register a subscriber, then fix the start position (before the response headers
        are sent): after the newest committed event, or after `resume`; a malformed or
        future `resume` queues a reset. 429/503 when the hub cannot take it."""
        settings = app[keys.SETTINGS].stream
        hub = app[keys.HUB]
        sub = await hub.subscribe(user_id, kind)
        feed = cls(hub, sub, app[keys.PG_POOL], app[keys.STREAM_READER], settings)
        try:
            await feed._start(resume)
        except BaseException:
            feed.close()
            raise
        return feed

    async def _start(self, resume: str | None) -> None:
        state = await self._state()
        self.last = state.committed
        if resume is None:
            return
        wanted = parse_event_id(resume)
        if wanted is None:
            self._ready.append(ResetNotice("malformed", state.committed))
        elif wanted > state.committed:
            self._ready.append(ResetNotice("ahead", state.committed))
        elif wanted < state.committed:
            self.last = wanted
            self._need_fill = True

    def close(self) -> None:
        self._hub.unsubscribe(self._sub)

    def end(self, reason: str) -> None:
        """End the feed from outside the task reading it (its client is gone): a `next`
        waiting or to come raises `Closed(reason)`."""
        self._sub.close(reason)

    @property
    def buffered_bytes(self) -> int:
        """What this feed holds for its client beyond the subscription's queue."""
        return (
            sum(item.size for item in self._ready if isinstance(item, StreamEvent))
            + self._ahead_bytes
        )

    async def next(self, wait: float) -> Item | None:
        """The next item for the client; None when nothing was ready within `wait` seconds
        (one deadline: repeats and out-of-order events do not extend it)."""
        if self._sub.closed:  # ended (its logins, say): not after the rest of a catch-up
            raise Closed(self._sub.closed)
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
            if event is None:  # the channel was away: what it missed is in the stream
                self._need_fill = True
                continue
            self._accept(event)
        return self._ready.pop(0)

    def _accept(self, event: StreamEvent) -> None:
        if event.seq <= self.last:
            return  # a repeat: a relay retry, or a catch-up overlap
        if event.data is None:
            self._need_fill = True  # a big event's reference: read it from the user's stream
            return
        if event.seq not in self._ahead:
            self._ahead[event.seq] = event
            self._ahead_bytes += event.size
        if self._ahead_bytes > self._settings.queue_bytes:
            self._sub.close("overflow")
        self._advance()
        if self._ahead:
            self._need_fill = True  # something is missing before these events

    def _advance(self) -> None:
        while (event := self._ahead.pop(self.last + 1, None)) is not None:
            self._ahead_bytes -= event.size
            self.last = event.seq
            self._ready.append(event)

    def _forget_through(self, seq: int) -> None:
        for stale in [s for s in self._ahead if s <= seq]:
            self._ahead_bytes -= self._ahead.pop(stale).size

    async def _state(self) -> StreamState:
        async with db.cursor(self._pool) as cur:
            return await store.stream_state(cur, self._sub.user_id)

    async def _read(self) -> bool:
        """Queue one slice of what follows `last` in the user's stream; whether more may
        follow, or something is missing after what was queued (the next read decides)."""
        events, more = await self._reader.after(self._sub.user_id, self.last)
        beyond = False  # a hole inside the stream: a failover lost a master's last writes
        for event in events:
            if event.seq == self.last + 1:
                self.last = event.seq
                self._ready.append(event)
            elif event.seq > self.last + 1:
                beyond = True
                break
        self._forget_through(self.last)
        self._advance()
        return more or beyond

    async def _fill(self) -> None:
        """Read what follows `last` from the user's stream; decide about anything missing.

        Postgres is asked first, Redis second: an event still in the outbox is pending and
        will arrive live; one that is neither in the outbox nor in Redis is gone. (The other
        order races with the relay and sends false resets.)
        """
        self._need_fill = False
        before = self.last
        more = await self._read()
        if self.last > before:
            self._need_fill = more or bool(self._ahead)  # one slice at a time, as it drains
            return
        state = await self._state()
        more = await self._read()
        if self.last > before:
            self._need_fill = more or bool(self._ahead)
            return
        missing = self.last + 1
        if missing > state.committed or (
            state.pending_from is not None and state.pending_from <= missing
        ):
            return  # nothing missing yet, or it is pending and will arrive live
        self._ready.append(ResetNotice("trimmed", state.committed))
        self.last = state.committed
        self._forget_through(self.last)
        self._advance()
        self._need_fill = bool(self._ahead)
