"""GET /api/tasks/ carries a weak ETag of the stream position and the query; a matching
If-None-Match is a 304 for one primary-key read."""

from __future__ import annotations

import re
from typing import Any

import pytest

import taskd.store
from tests.conftest import User

WEAK_TAG = re.compile(r'^W/"[0-9]+-[0-9a-f]{16}"$')


async def listed(user: User, query: str = "", tag: str | None = None) -> tuple[int, Any, Any]:
    headers = {} if tag is None else {"If-None-Match": tag}
    return await user.call("GET", f"/api/tasks/{query}", headers=headers)


async def test_the_list_is_304_until_something_changes(alice: User) -> None:
    await alice.create_task("one")
    status, page, headers = await listed(alice)
    tag = headers["ETag"]
    assert (status, page["count"], headers["X-Stream-Position"]) == (200, 1, "1-0")
    assert WEAK_TAG.match(tag)
    status, body, unchanged = await listed(alice, tag=tag)
    assert (status, body) == (304, None)
    assert (unchanged["ETag"], unchanged["X-Stream-Position"]) == (tag, "1-0")
    task = await alice.create_task("two")
    status, page, headers = await listed(alice, tag=tag)
    assert (status, page["count"], headers["X-Stream-Position"]) == (200, 2, "2-0")
    assert headers["ETag"] != tag
    tag = headers["ETag"]
    await alice.call("PATCH", f"/api/tasks/{task['id']}/", {"done": True})
    assert (await listed(alice, tag=tag))[0] == 200  # any change to any task moves it
    await alice.call("PATCH", f"/api/tasks/{task['id']}/", {"done": True})  # a no-op
    assert (await listed(alice, tag=(await listed(alice))[2]["ETag"]))[0] == 304


async def test_the_tag_is_of_the_query_and_the_user(alice: User, bob: User) -> None:
    await alice.create_task("one")
    tag = (await listed(alice, "?limit=5"))[2]["ETag"]
    assert (await listed(alice, "?limit=5", tag))[0] == 304
    assert (await listed(alice, "?offset=0&limit=5&ignored=x", tag))[0] == 200
    assert (await listed(alice, "?limit=6", tag))[0] == 200
    assert (await listed(alice, "", tag))[0] == 200
    await bob.create_task("one")
    assert (await listed(bob, "?limit=5", tag))[0] == 200  # same position, another user


@pytest.mark.parametrize(
    "header",
    ["{tag}", "{strong}", '"0-0000000000000000", {tag}', "*"],
)
async def test_if_none_match_compares_weakly_and_takes_lists_and_a_star(
    alice: User, header: str
) -> None:
    tag = (await listed(alice))[2]["ETag"]
    value = header.format(tag=tag, strong=tag.removeprefix("W/"))
    assert (await listed(alice, tag=value))[0] == 304


async def test_a_304_costs_one_primary_key_read(
    alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    await alice.create_task("one")
    tag = (await listed(alice))[2]["ETag"]
    calls: list[str] = []
    for name in ("list_tasks", "stream_position"):
        real = getattr(taskd.store, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return await _real(*args, **kwargs)

        monkeypatch.setattr(taskd.store, name, counted)
    assert (await listed(alice, tag=tag))[0] == 304
    assert calls == ["stream_position"]
    calls.clear()
    assert (await listed(alice))[0] == 200
    assert calls == ["list_tasks"]  # without If-None-Match, the list as before: one statement


async def test_a_bad_query_is_still_a_400(alice: User) -> None:
    tag = (await listed(alice))[2]["ETag"]
    status, errors, _ = await listed(alice, "?limit=0", tag)
    assert (status, list(errors)) == (400, ["limit"])
