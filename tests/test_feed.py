"""What one live connection may cost: catch-up in byte-bounded slices, byte-bounded queues,
a cap on connections per user, and big events carried by reference through the live channel."""

from __future__ import annotations

import asyncio
import contextlib

from pydantic import SecretStr

import devtools
from taskd import keys
from taskd.app import create_app
from taskd.config import StreamSettings
from taskd.feed import Feed
from taskd.streams import RedisKeys, StreamEvent, max_event_bytes
from taskd.subscription import Subscription
from tests.conftest import ClientFactory, SettingsFactory, User, register_and_login
from tests.live import WAIT, raw_redis

# What JSON writes as six bytes a character: the biggest events the API allows.
CONTROL = "\x01"
MiB = 1024 * 1024
READS = ("xrange", "evalsha")  # the hub's read of one entry; a feed's catch-up script


async def make_big_tasks(user: User, count: int) -> None:
    for i in range(count):
        await user.create_task(f"big{i}", description=CONTROL * 10_000)


async def test_a_client_that_never_reads_holds_one_slice_of_its_catch_up(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    budget = 200_000
    settings = make_settings(stream={"catch_up_bytes": budget})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "hoarder")
    await make_big_tasks(user, 30)  # about 1.8 MB of events to catch up on
    feed = await Feed.open(client.app, user.id, "sse", "0-0")
    try:
        first = await feed.next(wait=WAIT)
        assert first is not None
        assert first.data is not None
        # One slice is read; nothing more until the client drains it.
        held = feed.buffered_bytes + len(first.data)
        assert held <= budget + max_event_bytes() + 1000
        assert feed.buffered_bytes > 0
    finally:
        feed.close()


async def test_catch_up_in_small_slices_still_delivers_everything_in_order(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(stream={"catch_up_bytes": 1024, "catch_up_batch": 3})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "patient")
    await make_big_tasks(user, 3)
    for i in range(20):
        await user.create_task(f"small{i}")
    events = await user.events(after="0-0", count=23)
    assert [e.seq for e in events] == list(range(1, 24))
    assert events[0].json["task"]["description"] == CONTROL * 10_000


def test_a_subscription_queue_is_bounded_in_bytes() -> None:
    sub = Subscription(user_id=1, kind="sse", max_events=1000, max_bytes=64 * 1024)
    for seq in range(1, 100):
        sub.offer(StreamEvent(1, seq, "task.created", "x" * 10_000))
        if sub.closed:
            break
    assert sub.closed == "overflow"
    assert seq <= 7  # 64 KiB hold six events of 10 kB, not a thousand


async def test_connections_per_user_are_capped_per_replica(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(stream={"max_per_user": 2})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "tabs")
    other = await register_and_login(client, "other")
    headers = {"Authorization": f"Bearer {user.access}"}
    first = await client.get("/api/stream/", headers=headers)
    second = await client.ws_connect("/api/ws/", headers=headers)
    try:
        assert first.status == 200
        async with client.get("/api/stream/", headers=headers) as third:
            assert third.status == 429
            assert (await third.json())["code"] == "throttled"
            assert int(third.headers["Retry-After"]) >= 1
        async with client.get("/api/ws/", headers=headers) as refused:
            assert refused.status == 429
        # Another user is not affected.
        async with other.sse():
            pass
    finally:
        first.close()
        await second.close()
    # Once one has gone, there is room again.
    async with asyncio.timeout(WAIT):
        while client.app[keys.HUB].subscribers_of(user.id) >= 2:  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.01)
    async with user.sse():
        pass


async def test_a_big_event_travels_the_live_channel_as_a_reference(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "bulky")
    description = "y" * (settings.stream.live_inline_bytes + 1)
    async with raw_redis(settings) as redis, redis.pubsub() as channel:
        await channel.ssubscribe(RedisKeys(settings.redis.namespace).live(user.id))
        async with user.sse() as stream:
            await user.create_task("big", description=description)
            await user.create_task("small")
            big, small = await stream.take(2)
        messages = []
        async with asyncio.timeout(WAIT):
            while len(messages) < 2:
                message = await channel.get_message(timeout=1)
                if message is not None and message["type"] == "smessage":
                    messages.append(message["data"])
    assert big.json["task"]["description"] == description
    assert small.json["task"]["title"] == "small"
    # The big one's message is its header alone; the small one's carries the event.
    assert [m.partition(b"\n")[2] != b"" for m in messages] == [False, True]


def test_defaults_bound_one_users_stream_to_64_mib() -> None:
    """The README's formula, with the defaults: maxlen x the biggest event."""
    stream = StreamSettings()
    # Redis' overhead per entry, measured with MEMORY USAGE: allocator size classes round a
    # big entry's node up by about 4.2 kB.
    assert stream.maxlen * (max_event_bytes() + 4_300) <= 64 * MiB


async def test_a_users_stream_is_trimmed_exactly_and_its_memory_follows(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    maxlen = 8
    settings = make_settings(stream={"maxlen": maxlen})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "trimmed")
    await make_big_tasks(user, maxlen + 4)
    await user.events(after=f"{maxlen + 3}-0", count=1)  # the last one is published
    async with raw_redis(settings) as redis:
        key = RedisKeys(settings.redis.namespace).events(user.id)
        assert await redis.xlen(key) == maxlen
        used = await redis.memory_usage(key, samples=0)
    assert used <= maxlen * (max_event_bytes() + 4_300) + 64 * 1024


async def test_the_hub_reads_a_big_event_once_for_all_its_subscribers(
    aiohttp_client: ClientFactory,
    make_settings: SettingsFactory,
    private_redis: devtools.RedisServer,
) -> None:
    """Five streams of one user on one replica: the big event, a reference on the live
    channel, is read from the user's stream once (by the hub), not once per stream."""
    settings = make_settings(redis={"url": SecretStr(private_redis.url)})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "fanout")
    description = "z" * (settings.stream.live_inline_bytes + 1)
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(user.sse()) for _ in range(5)]
        await user.create_task("small")
        for stream in streams:
            await stream.take(1)
        async with raw_redis(settings) as redis:
            await redis.config_resetstat()
            await user.create_task("big", description=description)
            for stream in streams:
                (big,) = await stream.take(1)
                assert big.json["task"]["description"] == description
            stats = await redis.info("commandstats")
    reads = {
        name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("xrange", "evalsha")
    }
    assert reads == {"xrange": 1, "evalsha": 0}
