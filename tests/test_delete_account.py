"""DELETE /api/me/: the account and everything of it go, on every replica; the name is free."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import psycopg2
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskd.app import create_app
from taskd.config import Settings
from taskd.store.events import LEADER_LOCK
from taskd.streams import RedisKeys
from tests.conftest import PASSWORD, ClientFactory, User, register_and_login
from tests.live import raw_redis
from tests.replicas import eventually

Client = TestClient[web.Request, web.Application]
CUT_OFF = 5.0
# Every table that holds something of a user, and the column naming the user.
USER_TABLES = {
    "users": "id",
    "tasks": "user_id",
    "refresh_tokens": "user_id",
    "refresh_families": "user_id",
    "outbox": "user_id",
    "idempotency_keys": "user_id",
}


def rows_of(settings: Settings, user_id: int) -> dict[str, int]:
    """How many rows of each table belong to the user."""
    conn = psycopg2.connect(settings.postgres.dsn.get_secret_value())
    try:
        with conn, conn.cursor() as cur:
            counts = {}
            for table, column in USER_TABLES.items():
                cur.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (user_id,))
                counts[table] = cur.fetchone()[0]
            return counts
    finally:
        conn.close()


@contextlib.contextmanager
def no_relay(settings: Settings) -> Iterator[None]:
    """Hold the relay leader's lock: while it is held, events wait in the outbox."""
    conn = psycopg2.connect(settings.postgres.dsn.get_secret_value())
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LEADER_LOCK,))
        yield
    finally:
        conn.close()


async def delete_me(user: User, password: str = PASSWORD) -> tuple[int, Any]:
    status, body, _ = await user.call("DELETE", "/api/me/", {"password": password})
    return status, body


async def test_the_password_is_required(alice: User) -> None:
    for body, field in (({"password": "wrong horse battery"}, "password"), ({}, "password")):
        status, errors, _ = await alice.call("DELETE", "/api/me/", body)
        assert (status, list(errors)) == (400, [field])
    status, _, _ = await alice.call("GET", "/api/me/")
    assert status == 200


async def test_everything_of_the_account_goes_and_a_new_one_of_its_name_starts_afresh(
    alice: User, client: Client, settings: Settings
) -> None:
    task = await alice.create_task("mine")
    await alice.call("PATCH", f"/api/tasks/{task['id']}/", {"done": True})
    assert [e.id for e in await alice.events(after="0-0", count=2)] == ["1-0", "2-0"]
    stream = RedisKeys(settings.redis.namespace).events(alice.id)
    async with raw_redis(settings) as redis:
        assert await redis.exists(stream)
    await alice.call("POST", "/api/tasks/", {"title": "keyed"}, headers={"Idempotency-Key": "k"})
    assert await delete_me(alice) == (204, None)

    assert rows_of(settings, alice.id) == dict.fromkeys(USER_TABLES, 0)
    async with raw_redis(settings) as redis:
        assert not await redis.exists(stream)
    for path in ("/api/me/", "/api/tasks/"):
        status, body, _ = await alice.call("GET", path)
        assert (status, body["code"]) == (401, "token_not_valid")
    async with client.post("/api/token/refresh/", json={"refresh": alice.refresh}) as resp:
        assert resp.status == 401

    again = await register_and_login(client, "alice")
    assert again.id != alice.id
    status, page, headers = await again.call("GET", "/api/tasks/")
    assert (status, page["count"], headers["X-Stream-Position"]) == (200, 0, "0-0")
    async with again.sse() as live:
        await again.create_task("a new life")
        (event,) = await live.take(1)
    assert (event.id, event.json["task"]["user"]) == ("1-0", again.id)
    status, _, _ = await again.call(
        "POST", "/api/tasks/", {"title": "keyed"}, headers={"Idempotency-Key": "k"}
    )
    assert status == 201  # the old account's key is gone with it: a new write
    assert [e.id for e in await again.events(after="0-0", count=2)] == ["1-0", "2-0"]


async def test_unpublished_events_go_with_the_account(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    with no_relay(settings):
        client = await aiohttp_client(create_app(settings))
        user = await register_and_login(client, "hasty")
        for n in range(3):
            await user.create_task(f"t{n}")
        assert rows_of(settings, user.id)["outbox"] == 3
        assert await delete_me(user) == (204, None)
        assert rows_of(settings, user.id) == dict.fromkeys(USER_TABLES, 0)


async def test_a_deleted_accounts_events_in_flight_leave_no_stream_behind(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    """The relay read the account's events before the deletion and publishes them after it
    (which creates the stream again): it then deletes the stream."""
    ns = settings.redis.namespace
    async with raw_redis(settings) as redis, redis.pubsub() as channel:
        with no_relay(settings):
            client = await aiohttp_client(create_app(settings))
            user = await register_and_login(client, "racer")
            await channel.ssubscribe(RedisKeys(ns).live(user.id))
            for n in range(3):
                await user.create_task(f"t{n}")
            conn = psycopg2.connect(settings.postgres.dsn.get_secret_value())
            try:
                with conn, conn.cursor() as cur:  # the account goes; the rows the relay read stay
                    cur.execute("DELETE FROM users WHERE id = %s", (user.id,))
            finally:
                conn.close()
        published = 0

        async def published_and_forgotten() -> bool:
            nonlocal published
            while message := await channel.get_message(timeout=0.01):
                published += message["type"] == "smessage"
            stream_left = await redis.exists(RedisKeys(ns).events(user.id))
            return published == 3 and rows_of(settings, user.id)["outbox"] == 0 and not stream_left

        await eventually(published_and_forgotten)


async def test_deleting_on_one_replica_ends_the_streams_and_tokens_on_the_other(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    user = await register_and_login(one, "leaver")
    there = dataclasses.replace(user, client=two)
    assert (await there.call("GET", "/api/me/"))[0] == 200
    async with there.sse() as live:
        assert await delete_me(user) == (204, None)
        assert [e.event for e in await live.ends(CUT_OFF)] == ["reauth"]
    status, body, _ = await there.call("GET", "/api/me/")
    assert (status, body["code"]) == (401, "token_not_valid")
    async with two.get("/api/stream/", params={"token": user.access}) as resp:
        assert resp.status == 401
