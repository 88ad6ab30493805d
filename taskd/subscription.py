"""One live connection's inbox (`Subscription`), filled by the hub and drained by its feed."""

from __future__ import annotations

import asyncio
from collections import deque

from taskd.streams import StreamEvent


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
        "_stale",
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
        self._stale = False
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

    def resync(self) -> None:
        """Events may have been missed (the channel was away): the feed reads the stream."""
        if not self.closed:
            self._stale = True
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> StreamEvent | None:
        """The next event; None once after a `resync`."""
        while not self._queue:
            if self.closed:
                raise Closed(self.closed)
            if self._stale:
                self._stale = False
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.closed:
            raise Closed(self.closed)
        if self._stale:
            self._stale = False
            return None
        event = self._queue.popleft()
        self._bytes -= event.size
        return event
