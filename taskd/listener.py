"""One Redis node's live channels, heard on one connection: the hub keeps a `NodeListener`
per master and asks it to SSUBSCRIBE the channels of the users streaming on this replica.

The listener owns its connection. It sends what the hub wants (one SSUBSCRIBE or SUNSUBSCRIBE
per user: on a cluster a command may name channels of one slot only) and hands the hub what
the node says: events, confirmations, and a subscription the node ended by itself (its slot
moved). Each reconnect starts over from what is wanted; the users it carries are then
resynced by the hub, since Pub/Sub keeps nothing for a connection that was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from taskd.background import Backoff, stop_background, stop_requested, supervise
from taskd.shards import REDIS_DOWN, Node, Shards
from taskd.streams import RedisKeys

log = logging.getLogger(__name__)

PING_EVERY = 1.0  # seconds between pings on a quiet connection...
SILENCE = 3 * PING_EVERY  # ... and how long it may go unanswered before it counts as lost
MAX_BACKOFF = 0.5  # a new stream waits `stream.reconnect_wait` for this: retry sooner


class Owner(Protocol):
    """What a listener tells its hub."""

    async def on_message(self, user_id: int, data: bytes) -> None: ...
    def on_confirmed(self, user_id: int, resync: bool) -> None: ...
    def on_state(self, listener: NodeListener) -> None: ...
    def on_trouble(self, listener: NodeListener) -> None: ...


class NodeListener:
    """The live channels of the users homed on one node, on one Pub/Sub connection."""

    def __init__(self, node: Node, owner: Owner, shards: Shards, keyspace: RedisKeys) -> None:
        self.node = node
        self._owner = owner
        self._shards = shards
        self._keys = keyspace
        self.users: set[int] = set()  # users whose channel is wanted here
        self._sent: set[int] = set()  # ... subscribed (or asked for) on this connection
        self._confirmed: dict[int, asyncio.Future[None]] = {}  # ... and heard back about
        self._resync: set[int] = set()  # resync these once their subscription is confirmed
        self._dropping: dict[int, int] = {}  # SUNSUBSCRIBEs sent and not yet confirmed
        self._dirty = asyncio.Event()
        self.up = False
        self._had_session = False
        self._task = asyncio.create_task(self._run(), name=f"taskd-hub-{node[0]}:{node[1]}")

    def want(self, user_id: int, resync: bool = False) -> asyncio.Future[None]:
        """Carry the user's channel; the future is done once the node confirms it.
        `resync`: the user was homed elsewhere, and may have missed events in the move."""
        self.users.add(user_id)
        if resync:
            self._resync.add(user_id)
        future = self._confirmed.get(user_id)
        if future is None:
            future = self._confirmed[user_id] = asyncio.get_running_loop().create_future()
            # Asked for again (a drop and a want before the writer ran, or a move and back):
            # only a confirmation heard from now on resolves it, so SSUBSCRIBE once more.
            self._sent.discard(user_id)
        self._dirty.set()
        return future

    def drop(self, user_id: int) -> None:
        """Stop carrying the user's channel (their last stream here ended, or they moved)."""
        self.users.discard(user_id)
        self._resync.discard(user_id)
        future = self._confirmed.pop(user_id, None)
        if future is not None and not future.done():
            future.cancel()
        self._dirty.set()

    async def stop(self) -> None:
        await stop_background([self._task])

    # --- the connection ----------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(0.1, MAX_BACKOFF)
        await supervise(lambda: self._session(backoff), backoff, self._failed)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, REDIS_DOWN):
            log.warning("hub lost redis node %s:%d (%r)", *self.node, exc)
        else:
            log.error("hub listener of %s:%d failed (%r)", *self.node, exc, exc_info=exc)
        self._owner.on_trouble(self)

    async def _session(self, backoff: Backoff) -> None:
        client = self._shards.direct(self.node, "hub", read_timeout=None)
        pubsub = client.pubsub()
        # Whatever was subscribed on the last connection is gone, and what was published
        # meanwhile with it: everything wanted is asked for again, and resynced once heard.
        self._sent.clear()
        self._dropping.clear()
        for user_id, future in list(self._confirmed.items()):
            if future.done():
                self._confirmed[user_id] = asyncio.get_running_loop().create_future()
        if self._had_session:
            self._resync |= self.users
        writer: asyncio.Task[None] | None = None
        try:
            # The connect (HELLO, CLIENT SETNAME) too: a node that accepts and never answers
            # must fail this session, so that the hub re-reads where the slots went.
            async with asyncio.timeout(SILENCE):
                await pubsub.ping()
                while (reply := await pubsub.get_message(timeout=PING_EVERY)) is None:
                    pass
            if reply["type"] != "pong":
                raise ConnectionError(f"unexpected first reply {reply['type']!r}")
            self._had_session = True
            self.up = True
            self._owner.on_state(self)
            backoff.reset()
            self._dirty.set()
            writer = asyncio.create_task(self._send(pubsub), name="taskd-hub-send")
            await self._receive(pubsub, writer)
        finally:
            self.up = False
            self._owner.on_state(self)
            if writer is not None:
                await stop_background([writer])
            with contextlib.suppress(*REDIS_DOWN):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    async def _send(self, pubsub: Any) -> None:
        """Bring the connection's subscriptions in line with what is wanted, whenever that
        changes. One command per user (a cluster refuses channels of several slots)."""
        while not stop_requested():
            await self._dirty.wait()
            self._dirty.clear()
            for user_id in self.users - self._sent:
                self._sent.add(user_id)
                await pubsub.ssubscribe(self._keys.live(user_id))
            for user_id in self._sent - self.users:
                self._sent.discard(user_id)
                self._dropping[user_id] = self._dropping.get(user_id, 0) + 1
                await pubsub.sunsubscribe(self._keys.live(user_id))

    async def _receive(self, pubsub: Any, writer: asyncio.Task[None]) -> None:
        """Hand the hub what arrives; ping a quiet connection, and count it lost when the
        pings go unanswered (a half-open connection must not leave streams silent)."""
        heard = pinged = time.monotonic()
        while not stop_requested():
            if writer.done():
                writer.result()  # a failed send ends the session
            # get_message bounds its own wait: no outer timeout (see stop_requested).
            message = await pubsub.get_message(timeout=PING_EVERY)
            now = time.monotonic()
            if message is not None:
                heard = now
                await self._handle(message)
            if now - pinged >= PING_EVERY:
                if now - heard > SILENCE:
                    raise ConnectionError("redis stopped answering on the hub's connection")
                await pubsub.ping()
                pinged = now

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "pong":
            return
        user_id = self._keys.user_of_live(message["channel"])
        if user_id is None:
            log.error("hub: a message on a channel it never asked for: %r", message["channel"])
            return
        if kind == "smessage":
            await self._owner.on_message(user_id, message["data"])
        elif kind == "ssubscribe":
            self._confirm(user_id)
        elif kind == "sunsubscribe":
            if self._dropping.get(user_id, 0) > 0:
                self._dropping[user_id] -= 1
                if not self._dropping[user_id]:
                    del self._dropping[user_id]
            elif user_id in self._sent:
                # Not asked for: the node gave the slot away. Ask again (a MOVED reply ends
                # this connection) and let the hub re-read where the slot lives now.
                log.info("hub: redis %s:%d ended user %d's channel", *self.node, user_id)
                self._sent.discard(user_id)
                self._resync.add(user_id)
                if (future := self._confirmed.get(user_id)) is not None and future.done():
                    self._confirmed[user_id] = asyncio.get_running_loop().create_future()
                self._dirty.set()
                self._owner.on_trouble(self)

    def _confirm(self, user_id: int) -> None:
        if user_id not in self.users or user_id not in self._sent or user_id in self._dropping:
            return  # dropped meanwhile: a SUNSUBSCRIBE (and perhaps an SSUBSCRIBE) follows
        future = self._confirmed.get(user_id)
        if future is not None and not future.done():
            future.set_result(None)
        resync = user_id in self._resync
        self._resync.discard(user_id)
        self._owner.on_confirmed(user_id, resync)
