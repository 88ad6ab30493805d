"""Ending every login of a user: a password change and "log out everywhere" refuse the old
tokens and end the live streams on every replica, without a database query per request."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import jwt
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

import taskd.store
from taskd import db, keys, store
from taskd.app import create_app
from taskd.config import Settings
from tests.conftest import (
    PASSWORD,
    ClientFactory,
    SettingsFactory,
    User,
    register_and_login,
)
from tests.live import WAIT, raw_redis
from tests.replicas import eventually

Client = TestClient[web.Request, web.Application]
NEW_PASSWORD = "another horse battery"
CUT_OFF = 5.0  # the contract: every replica refuses the old tokens within this


async def login(client: Client, username: str, password: str = PASSWORD) -> User:
    async with client.post(
        "/api/login/", json={"username": username, "password": password}
    ) as resp:
        assert resp.status == 200, await resp.text()
        tokens = await resp.json()
    async with client.get("/api/me/", headers={"Authorization": f"Bearer {tokens['access']}"}) as r:
        user_id = (await r.json())["id"]
    return User(client, user_id, username, tokens["access"], tokens["refresh"])


async def refresh_status(user: User) -> int:
    async with user.client.post("/api/token/refresh/", json={"refresh": user.refresh}) as resp:
        return resp.status


async def me(user: User) -> tuple[int, Any]:
    status, body, _ = await user.call("GET", "/api/me/")
    return status, body


async def change_password(user: User, old: str = PASSWORD, new: str = NEW_PASSWORD) -> Any:
    status, body, headers = await user.call(
        "POST", "/api/password/", {"old_password": old, "new_password": new}
    )
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    return body


def iat(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["iat"])


async def test_a_password_change_ends_every_other_login_and_starts_a_new_one(
    alice: User,
) -> None:
    other = await login(alice.client, "alice")
    for user in (alice, other):
        assert (await me(user))[0] == 200  # verified, and now remembered by the process
    tokens = await change_password(alice)
    for user in (alice, other):
        status, body = await me(user)
        assert (status, body["code"]) == (401, "token_not_valid")
        assert await refresh_status(user) == 401
    fresh = dataclasses.replace(alice, access=tokens["access"], refresh=tokens["refresh"])
    assert await me(fresh) == (200, {"id": alice.id, "username": "alice", "email": ""})
    assert await refresh_status(fresh) == 200  # the new login's refresh token is live
    async with alice.client.post(
        "/api/login/", json={"username": "alice", "password": PASSWORD}
    ) as resp:
        assert resp.status == 401
    await login(alice.client, "alice", NEW_PASSWORD)


async def test_a_token_of_the_same_second_dies_and_the_new_pair_works(alice: User) -> None:
    """`iat` has whole seconds: the cut-off is the generation, not the time."""
    same_second = 0
    password = PASSWORD
    for attempt in range(5):
        old = await login(alice.client, "alice", password)
        new_password = f"{NEW_PASSWORD} {attempt}"
        tokens = await change_password(old, password, new_password)
        password = new_password
        same_second += iat(old.access) == iat(tokens["access"])
        assert (await me(old))[0] == 401
        assert (await me(dataclasses.replace(old, access=tokens["access"])))[0] == 200
    assert same_second  # the case this test is about did come up


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"old_password": "wrong horse battery", "new_password": NEW_PASSWORD}, "old_password"),
        ({"old_password": PASSWORD, "new_password": "short"}, "new_password"),
        ({"old_password": PASSWORD, "new_password": "12345678901"}, "new_password"),
        ({"old_password": PASSWORD, "new_password": "ALICE"}, "new_password"),
        ({"old_password": PASSWORD, "new_password": "x" * 73}, "new_password"),
        ({"old_password": PASSWORD}, "new_password"),
        ({"new_password": NEW_PASSWORD}, "old_password"),
        ({"old_password": PASSWORD, "new_password": NEW_PASSWORD, "x": 1}, "x"),
    ],
)
async def test_a_refused_password_change_changes_nothing(
    alice: User, body: dict[str, Any], field: str
) -> None:
    status, errors, _ = await alice.call("POST", "/api/password/", body)
    assert status == 400
    assert list(errors) == [field]
    assert (await me(alice))[0] == 200
    assert await refresh_status(alice) == 200


async def test_password_checks_are_throttled_per_user(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client = await aiohttp_client(create_app(make_settings(throttle={"password_per_user": 3})))
    user = await register_and_login(client, "guessed")
    wrong = {"old_password": "guess guess guess", "new_password": NEW_PASSWORD}
    statuses = [(await user.call("POST", "/api/password/", wrong))[0] for _ in range(4)]
    assert statuses == [400, 400, 400, 429]
    status, _, _ = await user.call("DELETE", "/api/me/", {"password": PASSWORD})
    assert status == 429  # the same count: deleting the account checks the password too


async def test_logout_all_ends_every_login(alice: User) -> None:
    other = await login(alice.client, "alice")
    for user in (alice, other):
        assert (await me(user))[0] == 200
    status, body, headers = await alice.call("POST", "/api/logout/all/")
    assert (status, body, headers["Cache-Control"]) == (204, None, "no-store")
    for user in (alice, other):
        assert (await me(user))[0] == 401
        assert await refresh_status(user) == 401
    again = await login(alice.client, "alice")  # the password still works
    assert (await me(again))[0] == 200


async def test_a_login_that_read_the_old_generation_makes_no_family(
    alice: User, client: Client
) -> None:
    """A login that checked the password before a "log out everywhere" committed cannot
    create its refresh family after it (the store refuses a stale generation)."""
    async with db.cursor(client.app[keys.PG_POOL]) as cur:
        credentials = await store.get_credentials(cur, "alice")
        assert credentials is not None
        assert await store.end_logins(cur, alice.id) == credentials.token_generation + 1
        stale = credentials.token_generation
        assert not await store.insert_refresh(cur, uuid.uuid4(), alice.id, 60, stale)
        assert await store.insert_refresh(cur, uuid.uuid4(), alice.id, 60, stale + 1)


async def test_checking_the_cut_off_costs_no_query_per_request(
    alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real = taskd.store.token_generation

    async def counted(cur: Any, user_id: int) -> int | None:
        reads.append(user_id)
        return await real(cur, user_id)

    monkeypatch.setattr(taskd.store, "token_generation", counted)
    other = await login(alice.client, "alice")
    for _ in range(20):
        assert (await me(alice))[0] == 200
        assert (await me(other))[0] == 200
    assert len(reads) <= 1  # the fixture's requests may have cached it already
    await alice.call("POST", "/api/logout/all/")
    for _ in range(10):
        assert (await me(other))[0] == 401
    assert len(reads) <= 1  # refusing needs no query either


async def test_the_cache_holds_at_most_its_size(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await aiohttp_client(create_app(make_settings(auth={"cutoff_cache_size": 1})))
    one, two = [await register_and_login(client, name) for name in ("first", "second")]
    reads: list[int] = []
    real = taskd.store.token_generation

    async def counted(cur: Any, user_id: int) -> int | None:
        reads.append(user_id)
        return await real(cur, user_id)

    monkeypatch.setattr(taskd.store, "token_generation", counted)
    for user in (one, one, two, two, one):
        assert (await me(user))[0] == 200
    assert reads == [one.id, two.id, one.id]  # one entry: each user evicts the other


async def test_a_change_missed_while_unsubscribed_is_caught_on_resubscribing(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    """A change whose announcement never arrived (here: made behind the service's back) is
    found when the subscription comes back: the users streaming here are checked, and the
    entries read before are read again."""
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "unheard")
    assert (await me(user))[0] == 200
    async with user.sse() as stream:
        async with db.cursor(client.app[keys.PG_POOL]) as cur:
            await store.end_logins(cur, user.id)  # committed, never announced
        assert (await me(user))[0] == 200  # the cache, trusted while subscribed, has not heard
        async with raw_redis(settings) as redis:
            name = f"taskd:{settings.redis.namespace}:cutoffs"
            (subscription,) = [c for c in await redis.client_list() if c.get("name") == name]
            await redis.client_kill_filter(_id=subscription["id"])
        assert [e.event for e in await stream.ends(CUT_OFF)] == ["reauth"]
    assert (await me(user))[0] == 401


async def test_logins_ended_end_the_streams_and_old_tokens_cannot_reconnect(
    alice: User,
) -> None:
    other = await login(alice.client, "alice")
    async with (
        alice.sse() as stream,
        other.client.ws_connect(
            "/api/ws/", headers={"Authorization": f"Bearer {other.access}"}
        ) as socket,
    ):
        await alice.create_task("seen")
        assert (await stream.take(1))[0].id == "1-0"
        assert (await socket.receive_json(timeout=WAIT))["id"] == "1-0"
        await alice.call("POST", "/api/logout/all/")
        assert [(e.event, e.json) for e in await stream.ends(CUT_OFF)] == [
            ("reauth", {"type": "reauth"})
        ]
        assert await socket.receive_json(timeout=CUT_OFF) == {"type": "reauth"}
        closing = await socket.receive(timeout=CUT_OFF)
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4001)
    for path in ("/api/stream/", "/api/ws/"):
        async with alice.client.get(path, params={"token": alice.access}) as resp:
            assert resp.status == 401
            assert (await resp.json())["code"] == "token_not_valid"


async def test_a_password_change_on_one_replica_cuts_a_stream_and_a_token_on_the_other(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    user = await register_and_login(one, "roamer")
    there = dataclasses.replace(user, client=two)
    assert (await me(there))[0] == 200  # replica two has this generation cached
    async with (
        there.sse() as stream,
        two.ws_connect("/api/ws/", params={"token": user.access}) as socket,
    ):
        await user.create_task("before")
        assert (await stream.take(1))[0].id == "1-0"
        assert (await socket.receive_json(timeout=WAIT))["id"] == "1-0"
        tokens = await change_password(user)
        assert [e.event for e in await stream.ends(CUT_OFF)] == ["reauth"]
        assert await socket.receive_json(timeout=CUT_OFF) == {"type": "reauth"}
        closing = await socket.receive(timeout=CUT_OFF)
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4001)
    # The stream ended because replica two learned of the change: its token check knows too.
    status, body = await me(there)
    assert (status, body["code"]) == (401, "token_not_valid")
    renewed = dataclasses.replace(there, access=tokens["access"])
    assert (await me(renewed))[0] == 200
    async with renewed.sse(last_event_id="1-0") as stream:
        await dataclasses.replace(user, access=tokens["access"]).create_task("after")
        assert (await stream.take(1))[0].id == "2-0"


async def test_while_redis_is_down_replicas_read_the_cut_off_again_within_seconds(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, private_redis: Any
) -> None:
    """No announcement can travel: the other replica's cached generation is trusted only
    `auth.cutoff_recheck` seconds (not `cutoff_max_age`) once its subscription is gone."""
    settings = make_settings(redis={"url": SecretStr(private_redis.url), "timeout": 0.5})
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    user = await register_and_login(one, "islander")
    there = dataclasses.replace(user, client=two)
    assert (await me(there))[0] == 200
    private_redis.stop()
    tokens = await change_password(user)  # committed; its announcement cannot go out

    async def refused_on_two() -> bool:
        return (await me(there))[0] == 401

    await eventually(refused_on_two, limit=CUT_OFF)
    assert (await me(dataclasses.replace(there, access=tokens["access"])))[0] == 200


async def test_a_token_without_a_generation_is_of_generation_zero(
    alice: User, settings: Settings
) -> None:
    """Tokens issued before generations existed keep working until the first cut-off."""
    claims = jwt.decode(alice.access, options={"verify_signature": False})
    del claims["gen"]
    legacy = jwt.encode(claims, settings.auth.secret.get_secret_value(), algorithm="HS256")
    as_legacy = dataclasses.replace(alice, access=legacy)
    assert (await me(as_legacy))[0] == 200
    await alice.call("POST", "/api/logout/all/")
    assert (await me(as_legacy))[0] == 401


@pytest.mark.parametrize("gen", [-1, "1", 1.5, True, None])
async def test_a_malformed_generation_is_refused(alice: User, settings: Settings, gen: Any) -> None:
    claims = {**jwt.decode(alice.access, options={"verify_signature": False}), "gen": gen}
    token = jwt.encode(claims, settings.auth.secret.get_secret_value(), algorithm="HS256")
    status, body = await me(dataclasses.replace(alice, access=token))
    assert (status, body["code"]) == (401, "token_not_valid")


async def test_a_login_racing_log_out_everywhere_still_logs_in(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    """Log out everywhere ends the logins that exist; a login whose password check it
    overlapped is a new one with the right password, so it is not told its credentials are
    wrong. (A password change in its place would refuse it: that password is stale.)"""
    settings = make_settings(throttle={"login_per_username": 10_000})
    client = await aiohttp_client(create_app(settings))
    await register_and_login(client, "alice")
    credentials = {"username": "alice", "password": PASSWORD}
    refused = []
    for round_ in range(30):
        async with client.post("/api/login/", json=credentials) as resp:
            access = (await resp.json())["access"]
        everywhere = {"Authorization": f"Bearer {access}"}
        racing, ended = await asyncio.gather(
            client.post("/api/login/", json=credentials),
            client.post("/api/logout/all/", headers=everywhere),
        )
        assert ended.status == 204
        if racing.status != 200:
            refused.append((round_, racing.status, await racing.json()))
        racing.release()
        ended.release()
    assert refused == []
