"""The per-process hub: hears the live channels of the users streaming here (one connection
per Redis master, `listener.NodeListener`) and fans events out to bounded subscriber queues
(one per live connection). What a client sees is built by `feed.Feed`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from taskd import keys
from taskd.background import Backoff, stop_background, stop_requested
from taskd.config import RedisSettings, StreamSettings
from taskd.errors import Throttled, Unavailable
from taskd.listener import NodeListener
from taskd.shards import REDIS_DOWN, Node, RedisClient, Shards
from taskd.streams import (
    RedisKeys,
    StreamEvent,
    StreamReader,
    as_entries,
    event_from_entry,
    event_from_message,
    event_id,
)
from taskd.subscription import Subscription

log = logging.getLogger(__name__)

# Seconds a client over `stream.max_per_user` is asked to wait: connections of a user that
# went away (a closed tab) are noticed by their next ping (`keepalive`), within an interval.
BUSY_RETRY_AFTER = 5
# Why a subscription was ended when its user's logins ended (`cutoffs`): the client is told
# `reauth` (WebSocket: close 4001), and its reconnect with the old token is refused.
LOGIN_ENDED = "reauth"
# The hub retries a lost Redis at least this often: a stream opened meanwhile waits for it
# (`stream.reconnect_wait`), so the retry must come sooner than that wait runs out.
HUB_MAX_BACKOFF = 0.5


class Hub:
    """Hands each event heard on a user's live channel to that user's local subscriptions.

    A user's channel is subscribed on their node while they have a stream here, on one
    connection per master (`NodeListener`). When a connection is lost or a slot moves, the
    slot map is read again, the channels go where their slots are, and each subscription
    of the users concerned is resynced from the stream (Pub/Sub delivers at most once).
    """

    def __init__(
        self,
        redis_settings: RedisSettings,
        stream: StreamSettings,
        keyspace: RedisKeys,
        redis: RedisClient,
        shards: Shards,
    ) -> None:
        self._redis_settings = redis_settings
        self._settings = stream
        self._keys = keyspace
        self._redis = redis
        self._shards = shards
        self._subscribers: dict[int, set[Subscription]] = {}
        self._listeners: dict[Node, NodeListener] = {}
        self._home: dict[int, Node] = {}  # the node whose listener carries a user's channel
        self._up = asyncio.Event()  # set while every listener is connected
        self._trouble = asyncio.Event()  # a listener failed or a slot moved: re-read the map
        self._ending: dict[Node, asyncio.TimerHandle] = {}  # streams on a node that is away
        self._stopping: set[asyncio.Task[None]] = set()  # listeners of former masters
        self.delivered = 0  # events handed to subscriptions
        self.received = 0  # events heard from Redis (only those of users streaming here)

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self, patience: float) -> bool:
        """Whether every node is listened to, waiting up to `patience` seconds for it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self._up.wait()
        return self.connected

    async def subscribe(self, user_id: int, kind: str) -> Subscription:
        """A new subscriber, once its user's channel is heard here (so that the catch-up
        read after this misses nothing); 429 past the per-user cap, 503 when the channel
        cannot be subscribed within `stream.reconnect_wait` (a node is down, say)."""
        self._check_room(user_id)
        sub = Subscription(user_id, kind, self._settings.queue_size, self._settings.queue_bytes)
        self._subscribers.setdefault(user_id, set()).add(sub)
        try:
            await self._listen(user_id)
        except BaseException:
            self.unsubscribe(sub)
            raise
        return sub

    async def _listen(self, user_id: int) -> None:
        deadline = asyncio.get_running_loop().time() + self._settings.reconnect_wait
        while True:
            try:
                heard = self._listener_of(user_id).want(user_id)
            except REDIS_DOWN as exc:  # no node serves the user's slot right now
                log.info("hub: no redis node for user %d yet: %r", user_id, exc)
                raise Unavailable("Live updates are unavailable right now.") from exc
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(heard)
                return
            except TimeoutError:
                raise Unavailable("Live updates are unavailable right now.") from None
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not heard.cancelled() or (current is not None and current.cancelling()):
                    raise
                # The user's slot moved to another node meanwhile: wait for it there.

    def _listener_of(self, user_id: int) -> NodeListener:
        node = self._home.get(user_id)
        if node is None:
            node = self._home[user_id] = self._shards.node_of(self._keys.live(user_id))
        return self._listener_at(node)

    def _listener_at(self, node: Node) -> NodeListener:
        listener = self._listeners.get(node)
        if listener is None:
            listener = self._listeners[node] = NodeListener(node, self, self._shards, self._keys)
            self.on_state(listener)
        return listener

    def subscribers_of(self, user_id: int) -> int:
        return len(self._subscribers.get(user_id, ()))

    def _check_room(self, user_id: int) -> None:
        if self.subscribers_of(user_id) >= self._settings.max_per_user:
            raise Throttled(BUSY_RETRY_AFTER)

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.user_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._subscribers[sub.user_id]
            node = self._home.pop(sub.user_id, None)
            if node is not None and node in self._listeners:
                self._listeners[node].drop(sub.user_id)

    def subscriber_count_of(self, kind: str) -> int:
        return sum(s.kind == kind for subs in self._subscribers.values() for s in subs)

    def close_all(self, reason: str) -> None:
        for subs in self._subscribers.values():
            for sub in subs:
                sub.close(reason)

    def end_logins_of(self, user_id: int) -> None:
        """End the user's live connections here: their logins ended (`LOGIN_ENDED`)."""
        for sub in self._subscribers.get(user_id, ()):
            sub.close(LOGIN_ENDED)

    def streaming_users(self) -> list[int]:
        """The users with a live connection on this replica."""
        return list(self._subscribers)

    def connections(self) -> int:
        """Redis connections the hub holds (one per master it hears)."""
        return sum(listener.up for listener in self._listeners.values())

    def channels_heard(self) -> int:
        """Live channels subscribed by this process (one per user streaming here)."""
        return len(self._home)

    # --- what the listeners report -----------------------------------------------------

    async def on_message(self, user_id: int, data: bytes) -> None:
        try:
            event = event_from_message(data)
        except (ValueError, UnicodeDecodeError):
            log.error("hub: skipping a live message it cannot read: %r", data[:100])
            return
        if event.user_id != user_id:
            log.error("hub: user %d's channel carried user %d's event", user_id, event.user_id)
            return
        subs = self._subscribers.get(user_id)
        if not subs:
            return  # the last stream ended while its SUNSUBSCRIBE was on its way
        self.received += 1
        if event.data is None:
            event = await self._resolve(event)
        for sub in subs:  # offer() never unsubscribes: a closed one leaves with its feed
            sub.offer(event)
            self.delivered += 1

    async def _resolve(self, event: StreamEvent) -> StreamEvent:
        """A big event, which its channel carries as a reference, read whole from the user's
        stream once for this replica (not once per connection); the next events of that
        node wait, which keeps them in order. Not found (or Redis slow): it stays a
        reference, and each feed reads the stream itself (and resets if it is gone)."""
        seq_id = event_id(event.seq)
        try:
            async with asyncio.timeout(self._redis_settings.timeout):
                found = as_entries(
                    await self._redis.xrange(
                        self._keys.events(event.user_id), min=seq_id, max=seq_id
                    )
                )
        except REDIS_DOWN as exc:
            log.info("hub: could not read big event %s of user %d: %r", seq_id, event.user_id, exc)
            return event
        return event_from_entry(found[0][1]) if found else event

    def on_confirmed(self, user_id: int, resync: bool) -> None:
        if resync:
            for sub in self._subscribers.get(user_id, ()):
                sub.resync()

    def _update_up(self) -> None:
        if self._listeners and all(each.up for each in self._listeners.values()):
            self._up.set()
        else:
            self._up.clear()

    def on_state(self, listener: NodeListener) -> None:
        self._update_up()
        if listener.up:
            if (ending := self._ending.pop(listener.node, None)) is not None:
                ending.cancel()
        elif listener.node not in self._ending:
            # A blip (a killed connection, a restart within the wait) is bridged: the users
            # are resynced once heard again. Longer, their streams end (API.md, "When Redis is
            # down") and the clients resume elsewhere or later.
            self._ending[listener.node] = asyncio.get_running_loop().call_later(
                self._settings.reconnect_wait, self._end_streams_on, listener
            )

    def _end_streams_on(self, listener: NodeListener) -> None:
        self._ending.pop(listener.node, None)
        if not listener.up:
            for user_id in list(listener.users):
                for sub in self._subscribers.get(user_id, ()):
                    sub.close("redis")

    def on_trouble(self, listener: NodeListener) -> None:
        self._trouble.set()

    # --- the map -----------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: keep a listener on every master and each user's channel on the node
        that holds its slot; re-read the slot map whenever a listener reports trouble."""
        backoff = Backoff(0.1, HUB_MAX_BACKOFF)
        while not stop_requested():
            try:
                await self._shards.refresh()
                self._place()
                backoff.reset()
            except REDIS_DOWN as exc:
                log.warning("hub cannot read the redis slot map yet: %r", exc)
                await backoff.sleep()
                continue
            except Exception:  # a bug here must not end live updates for good
                log.exception("hub: placing the live channels failed")
                await backoff.sleep()
                continue
            if self._trouble.is_set():  # reported while the map was read: once more, later
                self._trouble.clear()
                await backoff.sleep()
                continue
            await self._trouble.wait()
            self._trouble.clear()
            await backoff.sleep()  # a failover takes seconds: do not spin

    def _place(self) -> None:
        """Listeners for the masters; each user's channel moved to its slot's master."""
        masters = self._shards.masters()
        for node in masters:
            self._listener_at(node)
        for user_id, node in list(self._home.items()):
            try:
                where = self._shards.node_of(self._keys.live(user_id))
            except REDIS_DOWN:
                continue  # its slot has no master yet: try again on the next report
            if where != node:
                self._listeners[node].drop(user_id)
                self._home[user_id] = where
                self._listener_at(where).want(user_id, resync=True)
        for node, listener in list(self._listeners.items()):
            if node not in masters and not listener.users:
                del self._listeners[node]
                stopping = asyncio.get_running_loop().create_task(listener.stop())
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)
        self._update_up()

    async def stop(self) -> None:
        for listener in list(self._listeners.values()):
            await listener.stop()
        for ending in self._ending.values():
            ending.cancel()


async def end_streams(app: web.Application) -> None:
    """On shutdown: every live client is told to reconnect (elsewhere) and resume."""
    if keys.HUB in app:
        app[keys.HUB].close_all("shutdown")


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    hub = Hub(
        settings.redis, settings.stream, app[keys.KEYSPACE], app[keys.REDIS], app[keys.SHARDS]
    )
    app[keys.HUB] = hub
    app[keys.STREAM_READER] = StreamReader(
        app[keys.REDIS],
        app[keys.KEYSPACE],
        settings.stream.catch_up_bytes,
        settings.stream.catch_up_batch,
    )
    task = asyncio.create_task(hub.run(), name="taskd-hub")
    # Serve streams from the first request when Redis answers; start anyway when it does not.
    await hub.wait_connected(settings.redis.timeout * 2)
    try:
        yield
    finally:
        hub.close_all("shutdown")
        await stop_background([task])
        await hub.stop()
