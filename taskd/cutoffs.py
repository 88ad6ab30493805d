"""Each user's login cut-off, checked on every request without a database query.

A password change and "log out everywhere" end every login of a user at once: the user's
`users.token_generation` rises, and an access token carries the generation it was issued
under (`gen`), so one issued before the change is older than its user's generation and is
refused. A deleted account has no generation left (`GONE`). The order of the commits in
Postgres decides "before", not clocks: a token issued in the same second as the change, or on
a replica whose clock is behind, is judged right.

Every process caches the generations it has read (Postgres is the truth) and hears of each
change through Redis Pub/Sub (`RedisKeys.cutoffs`, `<user>:<generation>`), on a connection of
its own; hearing of one also ends the user's live streams here. Generations only grow, so a
refusal is always right and only an acceptance needs a fresh entry:
- while subscribed, an entry read after the subscription began is trusted for
  `auth.cutoff_max_age` seconds (a safety net for an announcement lost on its way);
- while not (Redis down or reconnecting), an entry is trusted for `auth.cutoff_recheck`
  seconds, and the generations of the users streaming here are read that often, so that their
  streams still end; entries read before the subscription came back are read again.
A change that cannot be announced (Redis down) is announced again every `cutoff_recheck`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from taskd import db, keys, store
from taskd.background import Backoff, stop_background, stop_requested, supervise
from taskd.config import AuthSettings
from taskd.errors import ApiError, LoginEnded
from taskd.shards import REDIS_DOWN, RedisClient, Shards
from taskd.streams import RedisKeys

log = logging.getLogger(__name__)

GONE = 2**62  # the generation of a deleted account: above any token's
PING_EVERY = 1.0  # seconds between pings on the subscription...
SILENCE = 3 * PING_EVERY  # ... and how long it may go unanswered before it counts as lost
MAX_BACKOFF = 0.5  # the subscription is retried at least this often while Redis is away


class Cutoffs:
    """Per-process cache of token generations, kept true by Redis Pub/Sub."""

    def __init__(
        self,
        pg_pool: Any,
        redis: RedisClient,
        shards: Shards,
        keyspace: RedisKeys,
        settings: AuthSettings,
        end_streams: Callable[[int], None],
        streaming_users: Callable[[], list[int]],
    ) -> None:
        self._pool = pg_pool
        self._redis = redis
        self._shards = shards
        self._timeout = shards.timeout
        self._keys = keyspace
        self._size = settings.cutoff_cache_size
        self._max_age = settings.cutoff_max_age
        self._recheck = settings.cutoff_recheck
        self._end_streams = end_streams
        self._streaming_users = streaming_users
        # user -> (generation, when it was read: time.monotonic()); least recently read first
        self._entries: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self._reads: dict[int, asyncio.Task[int]] = {}  # one query per user at a time
        self._unannounced: dict[int, int] = {}
        self._since: float | None = None  # when the subscription began; None while there is none
        self._streams_checked = False  # since it began (`_check_streams_quietly`)
        self._subscribed = asyncio.Event()

    # --- checking a token ----------------------------------------------------------------

    def check(self, user_id: int, generation: int) -> Awaitable[None] | None:
        """None when the cache vouches for a token of this generation; `LoginEnded` when it
        is too old; else an awaitable that asks Postgres (and raises `LoginEnded`)."""
        entry = self._entries.get(user_id)
        if entry is not None:
            current, read_at = entry
            if generation < current:
                raise LoginEnded()
            if generation == current and self._fresh(read_at):
                return None
        return self._confirm(user_id, generation)

    def refuses(self, user_id: int, generation: int) -> bool:
        """Whether the cache already knows that tokens of this generation are refused."""
        entry = self._entries.get(user_id)
        return entry is not None and generation < entry[0]

    def _fresh(self, read_at: float) -> bool:
        since = self._since
        age = time.monotonic() - read_at
        if since is None:
            return age < self._recheck
        return read_at >= since and age < self._max_age

    async def _confirm(self, user_id: int, generation: int) -> None:
        if generation < await self._read(user_id):
            raise LoginEnded()

    async def _read(self, user_id: int) -> int:
        """The user's generation from Postgres: one query, however many requests wait for it."""
        pending = self._reads.get(user_id)
        if pending is None:
            pending = asyncio.create_task(self._fetch(user_id))
            self._reads[user_id] = pending
            pending.add_done_callback(lambda done: self._read_done(user_id, done))
        # Shielded: a request that goes away does not cancel the others' answer.
        return await asyncio.shield(pending)

    def _read_done(self, user_id: int, done: asyncio.Task[int]) -> None:
        if self._reads.get(user_id) is done:
            del self._reads[user_id]
        if not done.cancelled():
            done.exception()  # its waiters have it; it must not be logged as never retrieved

    async def _fetch(self, user_id: int) -> int:
        started = time.monotonic()
        async with db.cursor(self._pool) as cur:
            found = await store.token_generation(cur, user_id)
        return self._learn(user_id, GONE if found is None else found, started, cut_unknown=False)

    def _learn(self, user_id: int, generation: int, read_at: float, *, cut_unknown: bool) -> int:
        """Record a generation read (or announced) at `read_at`; return the one now known.

        An older value than the entry's (a read that raced a change) never lowers it. A rise
        ends the user's live streams here; so does news of a user the cache does not hold,
        when `cut_unknown` (that user may be streaming here).
        """
        entry = self._entries.get(user_id)
        if entry is None:
            self._entries[user_id] = (generation, read_at)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
            if cut_unknown:
                self._end_streams(user_id)
            return generation
        current, seen = entry
        if generation < current:
            return current
        self._entries[user_id] = (generation, max(read_at, seen))
        self._entries.move_to_end(user_id)
        if generation > current:
            self._end_streams(user_id)
        return generation

    # --- announcing a change -------------------------------------------------------------

    async def logins_ended(self, user_id: int, generation: int) -> None:
        """Every login of the user before `generation` has ended (committed in Postgres):
        refuse its tokens and end its streams here at once, and tell every other process."""
        self._learn(user_id, generation, time.monotonic(), cut_unknown=True)
        await self._announce(user_id, generation)

    async def account_deleted(self, user_id: int) -> None:
        """The account is gone: the same for all its logins, and its Redis stream goes too."""
        await self.logins_ended(user_id, GONE)

    async def _announce(self, user_id: int, generation: int) -> bool:
        """Publish the change (deleting a gone account's stream); keep it to retry if Redis
        does not answer. Whether it went out."""
        try:
            if generation == GONE:
                await self._redis.delete(self._keys.events(user_id))
            await self._redis.publish(self._keys.cutoffs(), f"{user_id}:{generation}")
        except REDIS_DOWN as exc:
            log.warning("cannot announce that user %d's logins ended yet: %r", user_id, exc)
            self._unannounced[user_id] = max(generation, self._unannounced.get(user_id, 0))
            if len(self._unannounced) > self._size:  # the oldest: `cutoff_max_age` covers it
                del self._unannounced[next(iter(self._unannounced))]
            return False
        if self._unannounced.get(user_id, generation) <= generation:
            self._unannounced.pop(user_id, None)
        return True

    # --- listening -----------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """Whether announcements are being received (on a connection of its own)."""
        return self._subscribed.is_set()

    async def wait_subscribed(self, patience: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self._subscribed.wait()

    def _client(self) -> Redis:
        # Retries off: redis-py would otherwise reconnect and resubscribe by itself, and the
        # announcements missed meanwhile would go unnoticed. The loop below reconnects, to
        # another node of a cluster each time (any node hears a cluster's PUBLISH).
        return self._shards.direct(self._shards.any_node(), "cutoffs", read_timeout=self._timeout)

    async def listen(self) -> None:
        """Forever: hold the subscription; on losing it, fall back to re-reading (above)."""
        backoff = Backoff(0.1, MAX_BACKOFF)
        await supervise(lambda: self._listen(backoff), backoff, self._failed)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, REDIS_DOWN):
            log.warning("cut-off subscription lost (%r): re-reading from postgres", exc)
        else:
            log.error("cut-off subscription failed (%r)", exc, exc_info=exc)

    async def _listen(self, backoff: Backoff) -> None:
        client = self._client()
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self._keys.cutoffs())
            async with asyncio.timeout(self._timeout + PING_EVERY):
                while (confirmed := await pubsub.get_message(timeout=PING_EVERY)) is None or (
                    confirmed["type"] != "subscribe"
                ):
                    pass
            # From here every change is heard: entries read since can be trusted longer.
            self._since = time.monotonic()
            self._subscribed.set()
            backoff.reset()
            await self._check_streams_quietly()  # what changed while this process was deaf
            await self._receive(pubsub)
        finally:
            self._since = None
            self._streams_checked = False
            self._subscribed.clear()
            with contextlib.suppress(*REDIS_DOWN):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    async def _receive(self, pubsub: Any) -> None:
        """Apply announcements; ping, and count the subscription lost when nothing answers."""
        heard = pinged = time.monotonic()
        while not stop_requested():
            # get_message bounds its own wait: no outer timeout (see stop_requested).
            message = await pubsub.get_message(timeout=PING_EVERY)
            now = time.monotonic()
            if message is not None:
                heard = now
                if message["type"] == "message":
                    self._on_message(message["data"])
            if now - pinged >= PING_EVERY:
                if now - heard > SILENCE:
                    raise ConnectionError("redis stopped answering on the cut-off subscription")
                await pubsub.ping()
                pinged = now

    def _on_message(self, data: bytes) -> None:
        try:
            user, _, generation = data.decode().partition(":")
            user_id, announced = int(user), int(generation)
        except (UnicodeDecodeError, ValueError):
            log.error("ignoring an unreadable cut-off announcement: %r", data)
            return
        self._learn(user_id, announced, time.monotonic(), cut_unknown=True)

    async def _check_streams_quietly(self) -> None:
        """Read the generations of the users streaming here; a rise ends their streams. Once
        done after the subscription began, announcements take over."""
        started, since = time.monotonic(), self._since
        users = self._streaming_users()
        try:
            if users:
                async with db.cursor(self._pool) as cur:
                    found = await store.token_generations(cur, users)
                for user_id in users:
                    self._learn(user_id, found.get(user_id, GONE), started, cut_unknown=True)
        except ApiError as exc:  # Postgres is away: the upkeep tries again
            log.warning("cannot check the cut-offs of live streams: %s", exc.detail)
            return
        if since is not None and since == self._since:
            self._streams_checked = True

    async def maintain(self) -> None:
        """Every `cutoff_recheck` seconds: announce again what could not be announced and,
        while there is no subscription, check the users streaming here."""
        while not stop_requested():
            await asyncio.sleep(self._recheck)
            for user_id, generation in list(self._unannounced.items()):
                if not await self._announce(user_id, generation):
                    break  # Redis is still away: try the rest next round
            if not self._streams_checked:
                await self._check_streams_quietly()


async def cutoffs_ctx(app: web.Application) -> AsyncIterator[None]:
    """The cache, its subscription and its upkeep (after the hub: it ends streams there)."""
    settings = app[keys.SETTINGS]
    hub = app[keys.HUB]
    cutoffs = Cutoffs(
        app[keys.PG_POOL],
        app[keys.REDIS],
        app[keys.SHARDS],
        app[keys.KEYSPACE],
        settings.auth,
        hub.end_logins_of,
        hub.streaming_users,
    )
    app[keys.CUTOFFS] = cutoffs
    tasks = [
        asyncio.create_task(cutoffs.listen(), name="taskd-cutoffs"),
        asyncio.create_task(cutoffs.maintain(), name="taskd-cutoffs-upkeep"),
    ]
    # Requests are served correctly either way (by re-reading); subscribed, with fewer reads.
    await cutoffs.wait_subscribed(settings.redis.timeout)
    try:
        yield
    finally:
        await stop_background(tasks)
