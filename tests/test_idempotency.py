"""Idempotency-Key on task writes: a repeat replays the first answer and writes nothing,
whatever happened to the first (a crash after its commit included), however many race."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

import taskd.store
from taskd.app import create_app
from taskd.config import Settings
from tests.conftest import ClientFactory, User, register_and_login
from tests.replicas import Replica, eventually

Client = TestClient[web.Request, web.Application]
REPLAYED = "Idempotency-Replayed"


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def query(settings: Settings, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(settings.postgres.dsn.get_secret_value())
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


async def position(user: User) -> str:
    """The user's newest event id: how many changes were committed."""
    status, _, headers = await user.call("GET", "/api/tasks/")
    assert status == 200
    return str(headers["X-Stream-Position"])


async def count(user: User) -> int:
    return int((await user.call("GET", "/api/tasks/"))[1]["count"])


async def test_a_repeated_create_replays_the_first_answer_and_writes_nothing(
    alice: User,
) -> None:
    body = {"title": "once", "description": "only once"}
    first = await alice.call("POST", "/api/tasks/", body, headers=keyed("create-1"))
    again = await alice.call("POST", "/api/tasks/", body, headers=keyed("create-1"))
    assert first[0] == again[0] == 201
    assert first[1] == again[1]
    for header in ("ETag", "Location", "Content-Type"):
        assert first[2][header] == again[2][header]
    assert REPLAYED not in first[2]
    assert again[2][REPLAYED] == "true"
    assert (await count(alice), await position(alice)) == (1, "1-0")


async def test_repeats_of_updates_and_deletes_replay_the_first_answer(alice: User) -> None:
    task = await alice.create_task("to change")
    path = f"/api/tasks/{task['id']}/"
    patched = await alice.call("PATCH", path, {"done": True}, headers=keyed("patch"))
    put = await alice.call("PUT", path, {"title": "renamed"}, headers=keyed("put"))
    assert (patched[0], patched[1]["version"], put[1]["version"]) == (200, 2, 3)
    for method, body, key, first in (
        ("PATCH", {"done": True}, "patch", patched),
        ("PUT", {"title": "renamed"}, "put", put),
    ):
        status, replay, headers = await alice.call(method, path, body, headers=keyed(key))
        assert (status, replay, headers["ETag"], headers[REPLAYED]) == (
            200,
            first[1],  # the task as it was then: version 2 after the PATCH
            first[2]["ETag"],
            "true",
        )
    assert (await alice.call("DELETE", path, headers=keyed("delete")))[0] == 204
    status, body, headers = await alice.call("DELETE", path, headers=keyed("delete"))
    assert (status, body, headers[REPLAYED]) == (204, None, "true")  # not 404: a replay
    assert (await alice.call("DELETE", path))[0] == 404
    assert await position(alice) == "4-0"  # create, PATCH, PUT, DELETE: nothing twice


async def test_the_same_key_for_another_request_is_422(alice: User) -> None:
    task = await alice.create_task("x")
    path = f"/api/tasks/{task['id']}/"
    assert (await alice.call("PATCH", path, {"title": "a", "done": True}, headers=keyed("k")))[
        0
    ] == 200
    # The same JSON with its keys in another order is the same request.
    same = await alice.call("PATCH", path, {"done": True, "title": "a"}, headers=keyed("k"))
    assert (same[0], same[2][REPLAYED]) == (200, "true")
    for method, where, body in (
        ("PATCH", path, {"title": "b", "done": True}),
        ("PUT", path, {"title": "a", "done": True}),
        ("PATCH", "/api/tasks/999/", {"title": "a", "done": True}),
        ("POST", "/api/tasks/", {"title": "a", "done": True}),
    ):
        status, error, _ = await alice.call(method, where, body, headers=keyed("k"))
        assert (status, error["code"]) == (422, "idempotency_key_reused"), (method, where)
        assert set(error) == {"detail", "code"}
    assert await position(alice) == "2-0"


async def test_keys_belong_to_their_user(alice: User, bob: User) -> None:
    for user in (alice, bob):
        status, _, headers = await user.call(
            "POST", "/api/tasks/", {"title": "t"}, headers=keyed("shared")
        )
        assert (status, REPLAYED in headers) == (201, False)


@pytest.mark.parametrize("key", ["", " ", "a b", "x" * 256, "tab\there", "ünïcode"], ids=repr)
async def test_a_malformed_key_is_a_400_on_the_header(alice: User, key: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            alice.client.make_url("/api/tasks/"),
            json={"title": "t"},
            headers={"Authorization": f"Bearer {alice.access}", "Idempotency-Key": key},
        ) as resp,
    ):
        status, body = resp.status, await resp.json()
    assert status == 400
    assert list(body) == ["Idempotency-Key"]
    assert await count(alice) == 0


async def test_two_keys_on_one_request_are_a_400(alice: User) -> None:
    """Which one would count? A proxy that folds them would send `a, b`, itself a 400."""
    headers = CIMultiDict([("Authorization", f"Bearer {alice.access}"), ("Idempotency-Key", "a")])
    headers.add("Idempotency-Key", "b")
    async with alice.client.post("/api/tasks/", json={"title": "t"}, headers=headers) as resp:
        status, body = resp.status, await resp.json()
    assert (status, list(body)) == (400, ["Idempotency-Key"])
    assert await count(alice) == 0


async def test_the_longest_key_and_every_visible_character_are_taken(alice: User) -> None:
    visible = "".join(chr(c) for c in range(0x21, 0x7F))
    for key in ("x" * 255, visible, "!"):
        assert (await alice.call("POST", "/api/tasks/", {"title": "t"}, headers=keyed(key)))[
            0
        ] == 201


async def test_a_failure_is_not_recorded_and_a_repeat_runs_again(alice: User) -> None:
    task = await alice.create_task("x")
    path = f"/api/tasks/{task['id']}/"
    stale = {"If-Match": '"7"', **keyed("try")}
    assert (await alice.call("PATCH", path, {"done": True}, headers=stale))[0] == 412
    status, body, headers = await alice.call("PATCH", path, {"done": True}, headers=keyed("try"))
    assert (status, body["version"], REPLAYED in headers) == (200, 2, False)
    assert (await alice.call("PUT", "/api/tasks/999/", {"title": "y"}, headers=keyed("gone")))[
        0
    ] == 404
    assert await position(alice) == "2-0"


async def test_a_keyed_no_op_is_recorded_and_takes_no_event_number(alice: User) -> None:
    task = await alice.create_task("same")
    path = f"/api/tasks/{task['id']}/"
    for _ in range(2):
        status, body, _ = await alice.call("PATCH", path, {"title": "same"}, headers=keyed("n"))
        assert (status, body["version"]) == (200, 1)
    assert (await alice.call("PATCH", path, {"done": True}))[1]["version"] == 2
    # Dense: the rolled-back no-op left no hole.
    assert [e.id for e in await alice.events(after="0-0", count=2)] == ["1-0", "2-0"]


@contextlib.contextmanager
def users_row_locked(settings: Settings, user_id: int) -> Iterator[None]:
    """Hold the user's row: a write of theirs waits inside its transaction, key taken."""
    conn = psycopg2.connect(settings.postgres.dsn.get_secret_value())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user_id,))
            yield
        conn.rollback()
    finally:
        conn.close()


async def test_a_repeat_while_the_first_runs_is_409_then_replays(
    alice: User, settings: Settings
) -> None:
    body = {"title": "slow"}
    with users_row_locked(settings, alice.id):
        first = asyncio.create_task(alice.call("POST", "/api/tasks/", body, headers=keyed("slow")))

        async def first_is_waiting() -> bool:
            waiting = query(
                settings,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            return bool(waiting[0][0])

        await eventually(first_is_waiting)
        status, error, _ = await alice.call("POST", "/api/tasks/", body, headers=keyed("slow"))
        assert (status, error["code"]) == (409, "conflict")
    status, created, headers = await first
    assert (status, REPLAYED in headers) == (201, False)
    status, replay, headers = await alice.call("POST", "/api/tasks/", body, headers=keyed("slow"))
    assert (status, replay, headers[REPLAYED]) == (201, created, "true")
    assert await count(alice) == 1


async def test_concurrent_repeats_of_one_key_write_once(alice: User) -> None:
    rounds, racers = 30, 6
    seen: dict[int, int] = {}
    for n in range(rounds):
        body = {"title": f"round {n}"}
        answers = await asyncio.gather(
            *(
                alice.call("POST", "/api/tasks/", body, headers=keyed(f"race-{n}"))
                for _ in range(racers)
            )
        )
        fresh = [a for a in answers if a[0] == 201 and REPLAYED not in a[2]]
        assert len(fresh) == 1, [a[0] for a in answers]
        for status, answer, _ in answers:
            seen[status] = seen.get(status, 0) + 1
            assert status in (201, 409), answer
            if status == 201:
                assert answer == fresh[0][1]
            else:
                assert answer["code"] == "conflict"
    assert await count(alice) == rounds
    assert await position(alice) == f"{rounds}-0"
    print("answers over all rounds:", seen)  # how often the race met a running first


async def test_an_answer_lost_after_the_commit_is_replayed(
    alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write commits, then the process fails before answering: the retry replays."""
    real = taskd.store.keyed_write

    async def commits_then_fails(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise ConnectionResetError("the process went away before answering")

    monkeypatch.setattr(taskd.store, "keyed_write", commits_then_fails)
    body = {"title": "lost answer"}
    assert (await alice.call("POST", "/api/tasks/", body, headers=keyed("lost")))[0] == 500
    monkeypatch.setattr(taskd.store, "keyed_write", real)
    status, task, headers = await alice.call("POST", "/api/tasks/", body, headers=keyed("lost"))
    assert (status, task["title"], headers[REPLAYED]) == (201, "lost answer", "true")
    assert (await count(alice), await position(alice)) == (1, "1-0")


async def test_a_replica_killed_after_the_commit_leaves_a_retry_that_replays(
    aiohttp_client: ClientFactory, settings: Settings, replicas: list[Replica]
) -> None:
    doomed = Replica(settings)
    replicas.append(doomed)
    await doomed.start()
    survivor = await aiohttp_client(create_app(settings))
    user = await register_and_login(survivor, "retrier")
    request = (
        "POST /api/tasks/ HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{doomed.port}\r\n"
        f"Authorization: Bearer {user.access}\r\n"
        "Idempotency-Key: crash-1\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 22\r\n\r\n"
        '{"title": "survivor?"}'
    )
    _, writer = await asyncio.open_connection("127.0.0.1", doomed.port)
    writer.write(request.encode())
    await writer.drain()

    async def committed() -> bool:
        return bool(query(settings, "SELECT 1 FROM idempotency_keys WHERE key = 'crash-1'"))

    await eventually(committed)
    doomed.signal(signal.SIGKILL)  # whatever it had sent, the client never reads it
    writer.close()
    status, task, headers = await user.call(
        "POST", "/api/tasks/", {"title": "survivor?"}, headers=keyed("crash-1")
    )
    assert (status, task["title"], headers[REPLAYED]) == (201, "survivor?", "true")
    assert (await count(user), await position(user)) == (1, "1-0")
    assert [e.id for e in await user.events(after="0-0", count=1)] == ["1-0"]


async def test_records_expire_after_a_day_and_each_new_one_purges_old_ones(
    alice: User, settings: Settings
) -> None:
    for n in range(20):
        await alice.call("POST", "/api/tasks/", {"title": "t"}, headers=keyed(f"old-{n}"))
    query(settings, "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    # An expired key is a new request: it runs again (and replaces its old record).
    status, _, headers = await alice.call(
        "POST", "/api/tasks/", {"title": "t"}, headers=keyed("old-0")
    )
    assert (status, REPLAYED in headers) == (201, False)
    expired = "SELECT count(*) FROM idempotency_keys WHERE created_at < now() - interval '1 day'"
    assert query(settings, expired) == [(20 - 1 - 16,)]  # replaced one, purged up to 16
    await alice.call("POST", "/api/tasks/", {"title": "t"}, headers=keyed("new"))
    assert query(settings, expired) == [(0,)]
    assert query(settings, "SELECT count(*) FROM idempotency_keys") == [(2,)]


async def test_the_replica_that_answers_the_repeat_does_not_matter(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    user = await register_and_login(one, "roamer")
    first = await user.call("POST", "/api/tasks/", {"title": "t"}, headers=keyed("k"))
    again = await dataclasses.replace(user, client=two).call(
        "POST", "/api/tasks/", {"title": "t"}, headers=keyed("k")
    )
    assert (again[0], again[1], again[2][REPLAYED]) == (201, first[1], "true")
