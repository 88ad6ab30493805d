"""Faults: Redis and Postgres going away and coming back, relay leaders dying or hanging.
Every server stopped here is a private one the test started; replicas are real processes."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time

import aiohttp
import psycopg2
from pydantic import SecretStr

import devtools
from taskd import keys
from taskd.app import create_app
from taskd.config import Settings
from taskd.db import migrate_dsn
from taskd.streams import RedisKeys
from tests.conftest import ClientFactory, SettingsFactory, User, private_dir, register_and_login
from tests.live import WAIT, raw_redis
from tests.replicas import RECOVERY, Replica, eventually


async def stream_ids(user: User, after: str, count: int) -> list[str]:
    return [e.id or "" for e in await user.events(after=after, count=count)]


async def test_writes_survive_redis_outage_and_backlog_drains_in_order(
    aiohttp_client: ClientFactory,
    make_settings: SettingsFactory,
    private_redis: devtools.RedisServer,
) -> None:
    settings = make_settings(redis={"url": SecretStr(private_redis.url), "timeout": 0.5})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "steadfast")
    async with user.sse() as stream:
        for i in range(3):
            await user.create_task(f"before{i}")
        assert [e.id for e in await stream.take(3)] == ["1-0", "2-0", "3-0"]

        private_redis.stop()
        # Open streams end so that their clients resume later.
        assert await stream.ends() == []

    for i in range(5):
        await user.create_task(f"during{i}")  # committed to Postgres and the outbox
    async with client.get(
        "/api/stream/", headers={"Authorization": f"Bearer {user.access}"}
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["code"] == "unavailable"
        assert int(resp.headers["Retry-After"]) >= 1
    async with client.get("/readyz") as resp:
        assert resp.status == 503

    private_redis.start()  # same port, same append-only file

    async def stream_opens() -> bool:
        async with client.get(
            "/api/stream/", headers={"Authorization": f"Bearer {user.access}"}
        ) as resp:
            return resp.status == 200

    await eventually(stream_opens)
    await user.create_task("after")
    ids = await stream_ids(user, after="3-0", count=6)
    assert ids == [f"{n}-0" for n in range(4, 10)]


async def test_relay_and_hub_recover_from_a_postgres_restart(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    server = devtools.PostgresServer(private_dir("pg"))
    server.start()
    try:
        devtools.ensure_database(server.dsn("taskd"))
        settings = make_settings(postgres={"dsn": SecretStr(server.dsn("taskd")), "timeout": 2.0})
        await migrate_dsn(settings.postgres)
        client = await aiohttp_client(create_app(settings))
        user = await register_and_login(client, "patient")
        await user.create_task("one")
        assert await stream_ids(user, after="0-0", count=1) == ["1-0"]

        server.kill()
        server.start()

        async def writes_work() -> bool:
            status, _, _ = await user.call("POST", "/api/tasks/", {"title": "two"})
            return status == 201

        await eventually(writes_work)
        # The relay reconnected by itself and published the write.
        assert await stream_ids(user, after="1-0", count=1) == ["2-0"]
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(server.base_dir, ignore_errors=True)


async def test_leader_death_hands_over_with_nothing_lost_or_repeated(
    aiohttp_client: ClientFactory, settings: Settings, replicas: list[Replica]
) -> None:
    leader = Replica(settings)
    replicas.append(leader)
    await leader.start()
    await leader.wait_for("relay: this process is the leader")
    client = await aiohttp_client(create_app(settings))  # the follower, in this process
    user = await register_and_login(client, "survivor")
    async with user.sse() as stream:
        for i in range(3):
            await user.create_task(f"t{i}")
        assert [e.seq for e in await stream.take(3)] == [1, 2, 3]  # published by the leader

        leader.signal(signal.SIGKILL)
        for i in range(3, 6):
            await user.create_task(f"t{i}")
        # The follower takes the lock within seconds and publishes the rest.
        assert [e.seq for e in await stream.take(3, wait=RECOVERY)] == [4, 5, 6]
    assert await stream_ids(user, after="0-0", count=6) == [f"{n}-0" for n in range(1, 7)]


async def test_a_hung_leader_loses_the_lease(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, replicas: list[Replica]
) -> None:
    fast = {"TASKD_RELAY_LEASE_SECONDS": "2", "TASKD_RELAY_SWEEP_INTERVAL": "0.5"}
    settings = make_settings(
        relay={"lease_seconds": 2, "sweep_interval": 0.5}, redis={"timeout": 0.25}
    )
    leader = Replica(settings, TASKD_REDIS_TIMEOUT="0.25", **fast)
    replicas.append(leader)
    await leader.start()
    await leader.wait_for("relay: this process is the leader")
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "waiting")
    leader.signal(signal.SIGSTOP)  # alive but silent: its session goes idle
    try:
        async with user.sse() as stream:
            await user.create_task("while the leader hangs")
            (event,) = await stream.take(1, wait=RECOVERY)
        assert event.id == "1-0"
    finally:
        leader.signal(signal.SIGCONT)
    # The old leader wakes up, finds its session gone and does not publish twice.
    await user.create_task("after")
    assert await stream_ids(user, after="0-0", count=2) == ["1-0", "2-0"]


async def test_query_string_token_never_reaches_the_logs(
    settings: Settings, replicas: list[Replica]
) -> None:
    replica = Replica(settings)
    replicas.append(replica)
    await replica.start()
    async with aiohttp.ClientSession() as http:
        user = {"username": "logged", "password": "correct horse battery"}
        async with http.post(f"{replica.url}/api/register/", json=user) as resp:
            assert resp.status == 201
        async with http.post(f"{replica.url}/api/login/", json=user) as resp:
            tokens = await resp.json()
        async with http.get(
            f"{replica.url}/api/stream/", params={"token": tokens["access"]}
        ) as resp:
            assert resp.status == 200
        async with http.get(
            f"{replica.url}/api/stream/", params={"token": "forged.token.x"}
        ) as resp:
            assert resp.status == 401
    await replica.wait_for("/api/stream/?token=[redacted]", limit=WAIT)
    log = "".join(replica.output)
    assert tokens["access"] not in log
    assert "forged.token.x" not in log
    assert tokens["access"].split(".")[2] not in log


async def test_one_users_unpublishable_events_do_not_hold_up_others(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(relay={"batch_size": 1})
    client = await aiohttp_client(create_app(settings))
    stuck = await register_and_login(client, "stuck")
    other = await register_and_login(client, "other")
    async with raw_redis(settings) as redis:
        # A key of the wrong type where the user's stream should be: Redis refuses the XADD.
        await redis.set(RedisKeys(settings.redis.namespace).events(stuck.id), "not a stream")
        await stuck.create_task("cannot be published")
        async with other.sse() as stream:
            await other.create_task("published anyway")
            (event,) = await stream.take(1)
        assert event.json["task"]["title"] == "published anyway"


async def test_relay_survives_a_statement_cancelled_by_the_server(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, database_dsn: str
) -> None:
    # aiopg reports a server-side cancel (statement_timeout) as CancelledError.
    settings = make_settings(postgres={"statement_timeout_ms": 200})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "blocked")

    def hold_outbox_lock() -> None:
        conn = psycopg2.connect(database_dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
                # The fault itself: long enough for the relay's sweeps to hit the timeout.
                time.sleep(1.5)
        finally:
            conn.close()

    await asyncio.to_thread(hold_outbox_lock)
    async with user.sse() as stream:
        await user.create_task("after the lock")
        (event,) = await stream.take(1, wait=RECOVERY)
    assert event.id == "1-0"


async def test_short_redis_blips_do_not_grow_the_hubs_delay(
    aiohttp_client: ClientFactory,
    make_settings: SettingsFactory,
    private_redis: devtools.RedisServer,
) -> None:
    """After each of several blips a new stream opens as soon as Redis is back: the hub's
    retry delay starts over once a connection held, and a stream waits for the reconnect
    instead of answering 503 (which a browser's EventSource never retries)."""
    settings = make_settings(
        redis={"url": SecretStr(private_redis.url), "timeout": 0.5},
        stream={"reconnect_wait": 3.0},
    )
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "blipped")
    hub = client.app[keys.HUB]
    headers = {"Authorization": f"Bearer {user.access}"}
    for _ in range(7):
        private_redis.stop()

        async def hub_noticed() -> bool:
            return not hub.connected

        await eventually(hub_noticed)
        private_redis.start()
        async with client.get("/api/stream/", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
