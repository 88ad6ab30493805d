"""Live updates over real SSE and WebSocket clients: exact, ordered, resumable, isolated."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskd import keys
from taskd.app import create_app
from taskd.config import Settings
from taskd.streams import RedisKeys
from tests.conftest import ClientFactory, SettingsFactory, User, UserFactory, register_and_login
from tests.live import WAIT, SseStream, raw_redis, trim_events

Client = TestClient[web.Request, web.Application]


async def test_stream_headers_retry_and_first_live_event(alice: User) -> None:
    async with alice.sse() as stream:
        headers = stream.response.headers
        assert headers["Content-Type"].startswith("text/event-stream")
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-Accel-Buffering"] == "no"
        first = await stream.response.content.readline()
        assert first.startswith(b"retry: ")
        task = await alice.create_task("live")
        event = await stream.next()
    assert event is not None
    assert (event.id, event.event) == ("1-0", "task.created")
    body = event.json
    assert body["id"] == "1-0"
    assert body["type"] == "task.created"
    assert body["task"] == task
    assert body["at"] == task["updated_at"]


async def test_events_follow_commit_order_with_dense_ids(alice: User) -> None:
    async with alice.sse() as stream:
        task = await alice.create_task("t")
        url = f"/api/tasks/{task['id']}/"
        for i in range(5):
            await alice.call("PATCH", url, {"description": f"v{i}"})
        await alice.call("DELETE", url)
        events = await stream.take(7)
    assert [e.seq for e in events] == list(range(1, 8))
    assert [e.json["task"]["version"] for e in events] == list(range(1, 8))
    assert events[-1].json["task"] == {"id": task["id"], "version": 7}
    assert [e.json["task"].get("description") for e in events[1:6]] == [f"v{i}" for i in range(5)]


async def test_stream_starts_after_what_was_committed_before(alice: User) -> None:
    await alice.create_task("before")
    async with alice.sse() as stream:
        await alice.create_task("after")
        event = await stream.next()
    assert event is not None
    assert (event.id, event.json["task"]["title"]) == ("2-0", "after")


@pytest.mark.parametrize("via", ["header", "query"])
async def test_resume_replays_exactly_what_was_missed(alice: User, via: str) -> None:
    for i in range(4):
        await alice.create_task(f"t{i}")
    headers = {"Authorization": f"Bearer {alice.access}"}
    params = {}
    if via == "header":
        headers["Last-Event-ID"] = "2-0"
    else:
        params["last_event_id"] = "2-0"
    async with alice.client.get("/api/stream/", headers=headers, params=params) as resp:
        stream = SseStream(resp)
        replay = await stream.take(2)
        await alice.create_task("live")
        live = await stream.next()
    assert [e.id for e in replay] == ["3-0", "4-0"]
    assert live is not None
    assert live.id == "5-0"


async def test_header_wins_over_query_and_empty_counts_as_absent(alice: User) -> None:
    for i in range(3):
        await alice.create_task(f"t{i}")
    headers = {"Authorization": f"Bearer {alice.access}", "Last-Event-ID": "2-0"}
    async with alice.client.get(
        "/api/stream/", headers=headers, params={"last_event_id": "0-0"}
    ) as resp:
        assert [e.id for e in await SseStream(resp).take(1)] == ["3-0"]
    headers["Last-Event-ID"] = ""
    async with alice.client.get(
        "/api/stream/", headers=headers, params={"last_event_id": "1-0"}
    ) as resp:
        assert [e.id for e in await SseStream(resp).take(2)] == ["2-0", "3-0"]


async def test_resume_while_writes_happen_during_catch_up(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    # A tiny catch-up batch makes the catch-up many reads long, with writes between them.
    client = await aiohttp_client(create_app(make_settings(stream={"catch_up_batch": 2})))
    user = await register_and_login(client, "busy")
    for i in range(10):
        await user.create_task(f"old{i}")
    async with user.sse(last_event_id="0-0") as stream:

        async def write() -> None:
            for i in range(10):
                await user.create_task(f"new{i}")

        writer = asyncio.create_task(write())
        events = await stream.take(20)
        await writer
    assert [e.seq for e in events] == list(range(1, 21))


async def test_list_position_then_subscribe_is_gapless(alice: User) -> None:
    for i in range(3):
        await alice.create_task(f"t{i}")
    status, listing, headers = await alice.call("GET", "/api/tasks/")
    assert status == 200
    position = headers["X-Stream-Position"]
    assert position == "3-0"
    assert listing["count"] == 3
    await alice.create_task("after the list")
    async with alice.sse(last_event_id=position) as stream:
        await alice.create_task("after the subscribe")
        events = await stream.take(2)
    assert [(e.id, e.json["task"]["title"]) for e in events] == [
        ("4-0", "after the list"),
        ("5-0", "after the subscribe"),
    ]


@pytest.mark.parametrize(
    ("resume", "reason"),
    [("abc", "malformed"), ("1-1", "malformed"), ("01-0", "malformed"), ("99-0", "ahead")],
)
async def test_bad_resume_id_gets_one_reset_then_live(
    alice: User, resume: str, reason: str
) -> None:
    await alice.create_task("one")
    async with alice.sse(last_event_id=resume) as stream:
        reset = await stream.next()
        await alice.create_task("two")
        live = await stream.next()
    assert reset is not None
    assert (reset.event, reset.id) == ("reset", "1-0")
    assert reset.json == {"type": "reset", "reason": reason, "position": "1-0"}
    assert live is not None
    assert live.id == "2-0"


async def test_trimmed_history_gets_a_reset(alice: User, settings: Settings) -> None:
    for i in range(3):
        await alice.create_task(f"t{i}")
    await alice.events(after="2-0", count=1)  # all three are published
    await trim_events(settings, alice.id, keep=1)
    async with alice.sse(last_event_id="0-0") as stream:
        reset = await stream.next()
        await alice.create_task("after")
        live = await stream.next()
    assert reset is not None
    assert reset.json == {"type": "reset", "reason": "trimmed", "position": "3-0"}
    assert live is not None
    assert live.id == "4-0"


async def test_a_hole_inside_the_stream_is_a_reset_not_a_silent_skip(
    alice: User, settings: Settings
) -> None:
    """What a Redis failover to a lagging replica leaves: a stream with its newer entries
    but not some before them. The client gets what precedes the hole, then `reset`."""
    for i in range(5):
        await alice.create_task(f"t{i}")
    await alice.events(after="4-0", count=1)  # all five are published
    async with raw_redis(settings) as redis:
        await redis.xdel(RedisKeys(settings.redis.namespace).events(alice.id), "3-0", "4-0")
    async with alice.sse(last_event_id="0-0") as stream:
        one, two, reset = await stream.take(3)
        await alice.create_task("after")
        live = await stream.next()
    assert [one.id, two.id] == ["1-0", "2-0"]
    assert reset.json == {"type": "reset", "reason": "trimmed", "position": "5-0"}
    assert live is not None
    assert live.id == "6-0"


async def test_resume_into_a_gap_before_a_full_batch_resets_then_goes_live(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    # The resume point falls in trimmed history followed by more than one catch-up batch.
    settings = make_settings(stream={"catch_up_batch": 3})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "gappy")
    for i in range(12):
        await user.create_task(f"t{i}")
    await user.events(after="11-0", count=1)  # all published
    await trim_events(settings, user.id, keep=6)
    async with user.sse(last_event_id="2-0") as stream:
        reset = await stream.next()
        await user.create_task("live")
        live = await stream.next()
    assert reset is not None
    assert reset.json == {"type": "reset", "reason": "trimmed", "position": "12-0"}
    assert live is not None
    assert live.id == "13-0"


async def test_a_foreign_message_on_a_live_channel_does_not_stop_the_hub(
    alice: User, settings: Settings
) -> None:
    async with alice.sse() as stream:
        async with raw_redis(settings) as redis:
            channel = RedisKeys(settings.redis.namespace).live(alice.id)
            for junk in (b"junk", b"1 x y\n{}", b"\xff\xfe"):
                await redis.spublish(channel, junk)
        await alice.create_task("still flowing")
        (event,) = await stream.take(1)
    assert event.id == "1-0"


async def test_users_never_see_each_others_events(alice: User, bob: User) -> None:
    async with alice.sse() as alice_stream, bob.sse() as bob_stream:
        await alice.create_task("alice's")
        await bob.create_task("bob's")
        (alices,) = await alice_stream.take(1)
        (bobs,) = await bob_stream.take(1)
    assert alices.json["task"]["title"] == "alice's"
    assert bobs.json["task"]["title"] == "bob's"
    assert alices.id == bobs.id == "1-0"  # each user has a sequence of their own


@pytest.mark.parametrize("token", ["refresh", "garbage", None])
async def test_stream_refuses_bad_auth_with_401_json(alice: User, token: str | None) -> None:
    value = {"refresh": alice.refresh, "garbage": "x.y.z", None: None}[token]
    headers = {"Authorization": f"Bearer {value}"} if value else {}
    for path in ("/api/stream/", "/api/ws/"):
        async with alice.client.get(path, headers=headers) as resp:
            assert resp.status == 401, path
            assert (await resp.json())["code"] in ("token_not_valid", "not_authenticated")


async def test_token_in_query_string_works_for_eventsource(alice: User) -> None:
    async with alice.client.get("/api/stream/", params={"token": alice.access}) as resp:
        assert resp.status == 200
        await alice.create_task("x")
        assert [e.id for e in await SseStream(resp).take(1)] == ["1-0"]


async def test_heartbeat_comments(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client = await aiohttp_client(create_app(make_settings(stream={"ping_interval": 0.2})))
    user = await register_and_login(client, "quiet")
    async with user.sse() as stream:
        async with asyncio.timeout(WAIT):
            while "ping" not in stream.comments:
                line = await stream.response.content.readline()
                if line.startswith(b":"):
                    stream.comments.append(line[1:].strip().decode())
    assert "ping" in stream.comments


async def test_expired_access_token_ends_stream_with_reauth_and_resume_loses_nothing(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client = await aiohttp_client(create_app(make_settings(auth={"access_ttl": 2})))
    user = await register_and_login(client, "brief")
    async with user.sse() as stream:
        await user.create_task("first")
        events = await stream.ends()
    assert [e.event for e in events] == ["task.created", "reauth"]
    assert events[-1].json == {"type": "reauth"}
    last_id = events[0].id
    async with client.post("/api/token/refresh/", json={"refresh": user.refresh}) as resp:
        user.access = (await resp.json())["access"]
    await user.create_task("while away")
    async with user.sse(last_event_id=last_id) as stream:
        (missed,) = await stream.take(1)
    assert (missed.id, missed.json["task"]["title"]) == ("2-0", "while away")


async def test_slow_consumer_is_disconnected_and_resumes_without_loss(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(stream={"queue_size": 4, "send_timeout": 2.0})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "slow")
    big = "x" * 10_000
    async with user.sse() as stream:
        # The client reads nothing while the server has ~5 MB to send it: socket buffers
        # fill, the server's bounded queue overflows, and the server ends the stream.
        for i in range(500):
            await user.create_task(f"t{i}", description=big)
        events = await stream.ends()
    assert len(events) < 500
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    last_id = events[-1].id if events else "0-0"
    async with user.sse(last_event_id=last_id) as stream:
        rest = await stream.take(500 - len(events))
    assert [e.seq for e in rest] == list(range(len(events) + 1, 501))


async def test_sse_and_websocket_deliver_the_same_events(alice: User) -> None:
    async with (
        alice.client.ws_connect(
            "/api/ws/", headers={"Authorization": f"Bearer {alice.access}"}
        ) as ws,
        alice.sse() as stream,
    ):
        task = await alice.create_task("both")
        await alice.call("PATCH", f"/api/tasks/{task['id']}/", {"done": True})
        frames = [await ws.receive_json(timeout=WAIT) for _ in range(2)]
        events = await stream.take(2)
    assert frames == [e.json for e in events]
    assert [f["id"] for f in frames] == ["1-0", "2-0"]


async def test_websocket_resume_ping_and_errors(alice: User) -> None:
    for i in range(3):
        await alice.create_task(f"t{i}")
    async with alice.client.ws_connect(
        "/api/ws/", params={"token": alice.access, "last_event_id": "1-0"}
    ) as ws:
        replay = [await ws.receive_json(timeout=WAIT) for _ in range(2)]
        await ws.send_str(json.dumps({"type": "ping"}))
        assert await ws.receive_json(timeout=WAIT) == {"type": "pong"}
        for junk in ("not json", json.dumps({"type": "subscribe"}), json.dumps([1])):
            await ws.send_str(junk)
            reply = await ws.receive_json(timeout=WAIT)
            assert reply["type"] == "error"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_json(timeout=WAIT))["type"] == "error"
        await alice.create_task("live")
        live = await ws.receive_json(timeout=WAIT)
    assert [f["id"] for f in replay] == ["2-0", "3-0"]
    assert live["id"] == "4-0"


async def test_websocket_reset_frame(alice: User) -> None:
    async with alice.client.ws_connect(
        "/api/ws/", params={"token": alice.access, "last_event_id": "7-0"}
    ) as ws:
        frame = await ws.receive_json(timeout=WAIT)
    assert frame == {"type": "reset", "reason": "ahead", "position": "0-0"}


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("same", True),
        ("https://evil.example", False),
        ("null", False),
        ("https://app.example", True),  # in the configured allowlist
    ],
)
async def test_websocket_origin_check(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, origin: str | None, allowed: bool
) -> None:
    settings = make_settings(http={"allowed_origins": ("https://app.example",)})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "origin")
    headers: dict[str, Any] = {"Authorization": f"Bearer {user.access}"}
    if origin == "same":
        headers["Origin"] = f"http://{client.host}:{client.port}"
    elif origin is not None:
        headers["Origin"] = origin
    async with client.get(
        "/api/ws/",
        headers={
            **headers,
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as resp:
        if allowed:
            assert resp.status == 101
        else:
            assert resp.status == 403
            assert (await resp.json())["code"] == "forbidden"


async def test_subscribe_on_one_replica_write_on_another(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    one: Client = await aiohttp_client(create_app(settings))
    two: Client = await aiohttp_client(create_app(settings))
    user = await register_and_login(one, "roamer")
    writer = dataclasses.replace(user, client=two)  # the same login, through replica two
    async with user.sse() as stream:
        await writer.create_task("written on two")
        (event,) = await stream.take(1)
    assert event.json["task"]["title"] == "written on two"


async def test_redis_connections_do_not_grow_with_clients(
    client: Client, make_user: UserFactory, settings: Settings
) -> None:
    users = [await make_user() for _ in range(100)]
    # A session of its own: aiohttp's default connector stops at 100 connections.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        responses = [
            await http.get(
                client.make_url("/api/stream/"), headers={"Authorization": f"Bearer {u.access}"}
            )
            for u in users
        ]
        try:
            assert {r.status for r in responses} == {200}
            async with raw_redis(settings) as redis:
                clients = await redis.client_list()
            prefix = f"taskd:{settings.redis.namespace}"
            ours = [c["name"] for c in clients if c.get("name", "").startswith(prefix)]
            assert f"{prefix}:hub" in ours  # the count below is of this app's connections
            assert f"{prefix}:cutoffs" in ours
            # The pool, the hub's and the cut-off subscription's.
            assert len(ours) <= settings.redis.max_connections + 2
            # And the streams are live.
            await users[-1].create_task("still live")
            (event,) = await SseStream(responses[-1]).take(1)
            assert event.id == "1-0"
        finally:
            for response in responses:
                response.close()


async def test_events_published_while_the_hubs_connection_was_away_are_delivered(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    """Pub/Sub keeps nothing for a connection that is away: once the hub hears the channel
    again, its subscribers are resynced from the stream, in order, with nothing missing."""
    settings = make_settings()
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "resync")
    hub = client.app[keys.HUB]
    async with user.sse() as stream:
        await user.create_task("before")
        (first,) = await stream.take(1)
        async with raw_redis(settings) as redis:
            # The hub's connections are the ones named taskd:<ns>:hub; they are killed, and
            # events are published before they are back.
            name = f"taskd:{settings.redis.namespace}:hub"
            listed = await redis.client_list()
            hubs = [c["id"] for c in listed if c.get("name") == name]
            assert hubs
            for client_id in hubs:
                await redis.client_kill_filter(_id=client_id)
        for n in range(3):
            await user.create_task(f"while away {n}")
        rest = await stream.take(3)
        assert hub.connected
    assert [e.id for e in (first, *rest)] == ["1-0", "2-0", "3-0", "4-0"]


async def test_a_websocket_closed_by_its_client_leaves_no_subscription_behind(
    alice: User,
) -> None:
    """The test server cancels a handler whose client left (`handler_cancellation`), as a
    shutdown does: the cancellation met the handler while it waited for its writer, and the
    hub kept the subscription, one of the user's 32 slots, for good."""
    hub = alice.client.app[keys.HUB]
    for _ in range(3):
        socket = await alice.client.ws_connect(
            "/api/ws/", headers={"Authorization": f"Bearer {alice.access}"}
        )
        await socket.close()
    async with asyncio.timeout(WAIT):
        while hub.subscribers_of(alice.id):  # noqa: ASYNC110 - the hub is polled
            await asyncio.sleep(0.01)
