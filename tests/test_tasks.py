"""Task CRUD, list parameters, versions, ETag/If-Match, ownership and the outbox."""

from __future__ import annotations

import asyncio
import re

import pytest

from taskd.app import create_app
from taskd.config import PublicUrl
from taskd.errors import ValidationFailed
from taskd.schemas import parse_list_query
from tests.conftest import (
    ClientFactory,
    SettingsFactory,
    User,
    UserFactory,
    register_and_login,
)

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def test_create_returns_task_with_location_and_etag(alice: User) -> None:
    status, body, headers = await alice.call(
        "POST", "/api/tasks/", {"title": "Buy milk", "description": "2 litres"}
    )
    assert status == 201
    assert body["title"] == "Buy milk"
    assert body["description"] == "2 litres"
    assert body["done"] is False
    assert body["user"] == alice.id
    assert body["version"] == 1
    assert TIMESTAMP.match(body["created_at"])
    assert body["created_at"] == body["updated_at"]
    assert headers["ETag"] == '"1"'
    assert headers["Location"].endswith(f"/api/tasks/{body['id']}/")
    assert headers["Location"].startswith("http://")


async def test_retrieve_has_strong_etag(alice: User) -> None:
    task = await alice.create_task("x")
    status, body, headers = await alice.call("GET", f"/api/tasks/{task['id']}/")
    assert status == 200
    assert body == task
    assert headers["ETag"] == '"1"'


async def test_retrieve_with_matching_if_none_match_is_304(alice: User) -> None:
    task = await alice.create_task("x")
    headers = {"If-None-Match": '"1"'}
    status, _, _ = await alice.call("GET", f"/api/tasks/{task['id']}/", headers=headers)
    assert status == 304


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ('W/"1"', 304),
        ('"7", "1"', 304),
        ('"7", W/"1"', 304),
        ("*", 304),
        ('"2"', 200),
        ('"01"', 200),
        ('"\u0661"', 200),
        ('"' + "1" * 5000 + '"', 200),
    ],
)
async def test_if_none_match_compares_weakly(alice: User, header: str, status: int) -> None:
    task = await alice.create_task("x")
    url = f"/api/tasks/{task['id']}/"
    got, _, headers = await alice.call("GET", url, headers={"If-None-Match": header})
    assert (got, headers["ETag"]) == (status, '"1"')


async def test_patch_changes_only_given_fields_and_bumps_version(alice: User) -> None:
    task = await alice.create_task("x", description="keep")
    status, body, headers = await alice.call("PATCH", f"/api/tasks/{task['id']}/", {"done": True})
    assert status == 200
    assert body["done"] is True
    assert body["description"] == "keep"
    assert body["version"] == 2
    assert headers["ETag"] == '"2"'
    assert body["updated_at"] > task["updated_at"]
    assert body["created_at"] == task["created_at"]


async def test_put_requires_title_and_keeps_omitted_fields(alice: User) -> None:
    task = await alice.create_task("x", description="keep", done=True)
    status, body, _ = await alice.call("PUT", f"/api/tasks/{task['id']}/", {"done": False})
    assert status == 400
    assert body == {"title": ["This field is required."]}
    status, body, _ = await alice.call("PUT", f"/api/tasks/{task['id']}/", {"title": "y"})
    assert status == 200
    assert (body["title"], body["description"], body["done"]) == ("y", "keep", True)


async def test_noop_update_keeps_version_and_sends_no_event(alice: User) -> None:
    task = await alice.create_task("x")
    for method in ("PUT", "PATCH"):
        status, body, _ = await alice.call(method, f"/api/tasks/{task['id']}/", {"title": "x"})
        assert status == 200
        assert body == task
    marker = await alice.create_task("marker")
    # Ids are dense: the marker being event 2 proves the no-ops produced none.
    events = await alice.events(after="0-0", count=2)
    assert [(e.id, e.event) for e in events] == [("1-0", "task.created"), ("2-0", "task.created")]
    assert events[1].json["task"] == marker


async def test_delete_then_gone(alice: User) -> None:
    task = await alice.create_task("x")
    status, body, _ = await alice.call("DELETE", f"/api/tasks/{task['id']}/")
    assert (status, body) == (204, None)
    status, body, _ = await alice.call("GET", f"/api/tasks/{task['id']}/")
    assert status == 404
    assert body == {"detail": "Not found.", "code": "not_found"}
    status, _, _ = await alice.call("DELETE", f"/api/tasks/{task['id']}/")
    assert status == 404
    # The deleted event carries the last version plus one.
    (deleted,) = await alice.events(after="1-0", count=1)
    assert (deleted.id, deleted.event) == ("2-0", "task.deleted")
    assert deleted.json["task"] == {"id": task["id"], "version": 2}


async def test_every_change_makes_one_dense_event_and_failures_none(alice: User) -> None:
    task = await alice.create_task("x")
    url = f"/api/tasks/{task['id']}/"
    await alice.call("PATCH", url, {"title": "y"})
    await alice.call("PATCH", url, {"title": "y"})  # no-op
    await alice.call("PATCH", url, {"title": ""})  # 400
    await alice.call("PATCH", url, {"done": True}, headers={"If-Match": '"1"'})  # 412
    await alice.call("DELETE", f"/api/tasks/{task['id'] + 100}/")  # 404
    await alice.call("DELETE", url)
    await alice.create_task("marker")
    events = await alice.events(after="0-0", count=4)
    assert [(e.id, e.event, e.json["task"]["version"]) for e in events] == [
        ("1-0", "task.created", 1),
        ("2-0", "task.updated", 2),
        ("3-0", "task.deleted", 3),
        ("4-0", "task.created", 1),
    ]


async def test_if_match(alice: User) -> None:
    task = await alice.create_task("x")
    url = f"/api/tasks/{task['id']}/"
    status, body, _ = await alice.call("PATCH", url, {"title": "y"}, headers={"If-Match": '"2"'})
    assert status == 412
    assert body["code"] == "precondition_failed"
    # Stale is 412 even when the change would be a no-op.
    status, _, _ = await alice.call("PATCH", url, {"title": "x"}, headers={"If-Match": '"7"'})
    assert status == 412
    status, body, _ = await alice.call("PATCH", url, {"title": "y"}, headers={"If-Match": '"1"'})
    assert (status, body["version"]) == (200, 2)
    status, body, _ = await alice.call("PUT", url, {"title": "z"}, headers={"If-Match": "*"})
    assert (status, body["version"]) == (200, 3)
    status, _, _ = await alice.call("DELETE", url, headers={"If-Match": '"2"'})
    assert status == 412
    status, _, _ = await alice.call("DELETE", url, headers={"If-Match": 'W/"3"'})
    assert status == 412  # a weak tag never matches If-Match
    for spelling in ('"03"', '"\u0663"', '"' + "3" * 5000 + '"', "3", '"3'):
        status, _, _ = await alice.call("DELETE", url, headers={"If-Match": spelling})
        assert status == 412, spelling  # only the canonical tag names version 3
    status, _, _ = await alice.call("DELETE", url, headers={"If-Match": '"7", "3"'})
    assert status == 204
    # A task that does not exist is a 404 before any precondition.
    status, _, _ = await alice.call("DELETE", url, headers={"If-Match": '"3"'})
    assert status == 404


async def test_a_stranger_sees_404_and_changes_nothing(alice: User, bob: User) -> None:
    task = await alice.create_task("private")
    url = f"/api/tasks/{task['id']}/"
    for method, body in (("GET", None), ("PUT", {"title": "x"}), ("PATCH", {"done": True})):
        status, answer, _ = await bob.call(method, url, body)
        assert status == 404, method
        assert answer == {"detail": "Not found.", "code": "not_found"}
    status, _, _ = await bob.call("DELETE", url)
    assert status == 404
    status, listing, _ = await bob.call("GET", "/api/tasks/")
    assert listing["count"] == 0
    status, body, _ = await alice.call("GET", url)
    assert body == task


@pytest.mark.parametrize(
    "bad_id", ["abc", "1e3", "99999999999", "0", "-1", "9" * 30, "\u0661", "0{id}", "00{id}"]
)
async def test_an_id_that_is_not_a_task_is_404(alice: User, bad_id: str) -> None:
    task = await alice.create_task("x")
    bad_id = bad_id.format(id=task["id"])  # leading zeros before a real id
    for method in ("GET", "PATCH", "DELETE"):
        status, body, _ = await alice.call(method, f"/api/tasks/{bad_id}/", {})
        assert status == 404, (method, bad_id)
        assert body == {"detail": "Not found.", "code": "not_found"}


async def test_concurrent_patches_lose_no_update(alice: User) -> None:
    task = await alice.create_task("counter")
    url = f"/api/tasks/{task['id']}/"
    results = await asyncio.gather(
        *(alice.call("PATCH", url, {"description": f"writer {i}"}) for i in range(20))
    )
    assert all(status == 200 for status, _, _ in results)
    versions = sorted(body["version"] for _, body, _ in results)
    assert versions == list(range(2, 22))
    _, final, _ = await alice.call("GET", url)
    assert final["version"] == 21


async def test_concurrent_if_match_updates_exactly_one_wins(alice: User) -> None:
    task = await alice.create_task("x")
    url = f"/api/tasks/{task['id']}/"
    results = await asyncio.gather(
        *(
            alice.call("PATCH", url, {"title": f"t{i}"}, headers={"If-Match": '"1"'})
            for i in range(8)
        )
    )
    assert sorted(status for status, _, _ in results) == [200] + [412] * 7


# --- list --------------------------------------------------------------------------------


async def test_list_default_order_and_envelope(alice: User) -> None:
    first = await alice.create_task("first")
    second = await alice.create_task("second")
    status, body, headers = await alice.call("GET", "/api/tasks/")
    assert status == 200
    assert body == {"count": 2, "next": None, "previous": None, "results": [second, first]}
    assert headers["X-Stream-Position"] == "2-0"


async def test_list_position_is_zero_before_any_change(alice: User) -> None:
    _, _, headers = await alice.call("GET", "/api/tasks/")
    assert headers["X-Stream-Position"] == "0-0"


async def test_list_pagination_links(alice: User) -> None:
    for i in range(5):
        await alice.create_task(f"t{i}")
    status, body, _ = await alice.call("GET", "/api/tasks/?limit=2&offset=2&ordering=id&done=false")
    assert status == 200
    assert [t["title"] for t in body["results"]] == ["t2", "t3"]
    assert body["count"] == 5
    assert body["next"].startswith("http://")
    assert "offset=4" in body["next"]
    assert "limit=2" in body["next"]
    assert "ordering=id" in body["next"]
    assert "offset" not in body["previous"]
    _, last, _ = await alice.call("GET", "/api/tasks/?limit=2&offset=4")
    assert last["next"] is None
    assert "offset=2" in last["previous"]
    _, beyond, _ = await alice.call("GET", "/api/tasks/?offset=50")
    assert (beyond["count"], beyond["results"]) == (5, [])


async def test_list_limit_is_clamped(alice: User) -> None:
    await alice.create_task("x")
    status, body, _ = await alice.call("GET", "/api/tasks/?limit=5000")
    assert status == 200
    assert body["count"] == 1


async def test_list_filters_by_done(alice: User) -> None:
    await alice.create_task("open")
    await alice.create_task("closed", done=True)
    _, body, _ = await alice.call("GET", "/api/tasks/?done=true")
    assert [t["title"] for t in body["results"]] == ["closed"]
    _, body, _ = await alice.call("GET", "/api/tasks/?done=false")
    assert [t["title"] for t in body["results"]] == ["open"]


async def test_search_is_a_literal_case_insensitive_substring(alice: User) -> None:
    await alice.create_task("100% Done", description="")
    await alice.create_task("1000 Done")
    await alice.create_task("snake_case")
    await alice.create_task("snakeXcase")
    await alice.create_task("other", description="has the WORD inside")
    for query, expected in (
        ("%", ["100% Done"]),
        ("_", ["snake_case"]),
        ("done", ["1000 Done", "100% Done"]),
        ("word", ["other"]),
    ):
        status, body, _ = await alice.call("GET", "/api/tasks/", params={"search": query})
        assert status == 200
        assert [t["title"] for t in body["results"]] == expected, query


async def test_ordering(alice: User) -> None:
    for title in ("b", "A", "c", "a"):
        await alice.create_task(title)
    _, body, _ = await alice.call("GET", "/api/tasks/?ordering=title")
    titles = [t["title"] for t in body["results"]]
    assert titles[2:] == ["b", "c"]
    assert sorted(titles[:2]) == ["A", "a"]
    ids = [t["id"] for t in body["results"][:2]]
    assert ids == sorted(ids)  # ties broken by id in the same direction
    _, body, _ = await alice.call("GET", "/api/tasks/?ordering=-title")
    assert [t["title"] for t in body["results"]][:2] == ["c", "b"]
    ids = [t["id"] for t in body["results"][2:]]
    assert ids == sorted(ids, reverse=True)
    _, body, _ = await alice.call("GET", "/api/tasks/?ordering=id")
    assert [t["title"] for t in body["results"]] == ["b", "A", "c", "a"]
    _, body, _ = await alice.call("GET", "/api/tasks/?ordering=-updated_at")
    assert [t["title"] for t in body["results"]] == ["a", "c", "A", "b"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("limit=-5", "limit"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
        ("done=maybe", "done"),
        ("ordering=password", "ordering"),
        ("ordering=--id", "ordering"),
    ],
)
async def test_bad_list_parameter_is_400_on_it(alice: User, query: str, field: str) -> None:
    status, body, _ = await alice.call("GET", f"/api/tasks/?{query}")
    assert status == 400
    assert list(body) == [field]
    assert isinstance(body[field], list)


@pytest.mark.parametrize("search", ["a\u0000b", "\u0000"])
async def test_search_with_a_nul_is_400_on_it(alice: User, search: str) -> None:
    status, body, _ = await alice.call("GET", "/api/tasks/", params={"search": search})
    assert (status, body) == (400, {"search": ["Null characters are not allowed."]})


def test_search_with_a_lone_surrogate_is_refused() -> None:
    # yarl decodes the URL with replacement characters, so only a direct call can send one.
    with pytest.raises(ValidationFailed) as caught:
        parse_list_query({"search": "a\ud800"})
    assert caught.value.errors == {"search": ["Invalid unicode: lone surrogate."]}


async def test_a_repeated_list_parameter_counts_by_its_last_value(alice: User) -> None:
    for i in range(3):
        await alice.create_task(f"t{i}")
    status, body, _ = await alice.call("GET", "/api/tasks/?limit=2&limit=abc")
    assert (status, list(body)) == (400, ["limit"])
    status, body, _ = await alice.call(
        "GET", "/api/tasks/?limit=abc&limit=1&ordering=x&ordering=id"
    )
    assert status == 200
    assert [t["title"] for t in body["results"]] == ["t0"]
    assert "limit=1" in body["next"]
    assert "ordering=id" in body["next"]
    assert "ordering=x" not in body["next"]


async def test_unknown_list_parameters_are_ignored(alice: User) -> None:
    status, _, _ = await alice.call("GET", "/api/tasks/?colour=blue")
    assert status == 200


async def test_users_only_list_their_own(alice: User, bob: User) -> None:
    await alice.create_task("a")
    await bob.create_task("b")
    _, body, _ = await bob.call("GET", "/api/tasks/")
    assert [t["title"] for t in body["results"]] == ["b"]
    assert body["count"] == 1


async def test_many_users_keep_their_own_sequence(make_user: UserFactory) -> None:
    users = [await make_user() for _ in range(3)]
    await asyncio.gather(*(u.create_task(f"t{i}") for u in users for i in range(3)))
    for user in users:
        events = await user.events(after="0-0", count=3)
        assert [e.id for e in events] == ["1-0", "2-0", "3-0"]
        assert {e.json["task"]["user"] for e in events} == {user.id}


async def test_public_url_pins_absolute_urls_whatever_the_host_header(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        http={"public_url": PublicUrl(scheme="https", authority="tasks.example")}
    )
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "pinned")
    for i in range(3):
        await user.create_task(f"t{i}")
    headers = {"Host": "evil.example"}
    status, _, answer = await user.call("POST", "/api/tasks/", {"title": "x"}, headers=headers)
    assert status == 201
    assert answer["Location"].startswith("https://tasks.example/api/tasks/")
    _, page, _ = await user.call("GET", "/api/tasks/?limit=2", headers=headers)
    assert page["next"].startswith("https://tasks.example/api/tasks/?")


async def test_a_big_page_and_a_big_body_round_trip(alice: User) -> None:
    # Both are past the size at which JSON is handled off the event loop.
    big = "d" * 10_000
    await asyncio.gather(*(alice.create_task(f"t{i}", description=big) for i in range(12)))
    status, page, headers = await alice.call("GET", "/api/tasks/?ordering=id")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert page["count"] == 12
    assert all(t["description"] == big for t in page["results"])
    assert headers["X-Stream-Position"] == "12-0"
    status, body, _ = await alice.call(
        "PATCH", f"/api/tasks/{page['results'][0]['id']}/", {"description": "é" * 10_000}
    )
    assert (status, body["description"]) == (200, "é" * 10_000)
    status, body, _ = await alice.call("POST", "/api/tasks/", {"title": "x", "bad": "b" * 70_000})
    assert (status, body) == (400, {"bad": ["Unknown field."]})
