"""Every error a client can provoke is API.md's JSON, with the right status, and changes nothing."""

from __future__ import annotations

import io
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import User


async def raw(
    user: User, method: str, path: str, data: bytes, **headers: str
) -> tuple[int, Any, Any]:
    """Send bytes as they are (a stream, so aiohttp does not warn about big bodies)."""
    all_headers = {"Authorization": f"Bearer {user.access}", "Content-Type": "application/json"}
    all_headers.update(headers)
    async with user.client.request(
        method, path, data=io.BytesIO(data), headers=all_headers
    ) as resp:
        return resp.status, await resp.json(), resp.headers


@pytest.mark.parametrize(
    "payload",
    [b"{", b"not json", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b""],
    ids=["truncated", "text", "bad-utf8", "deep-nesting", "empty"],
)
async def test_malformed_json_is_400_non_field(alice: User, payload: bytes) -> None:
    status, body, _ = await raw(alice, "POST", "/api/tasks/", payload)
    assert status == 400
    assert list(body) == ["non_field_errors"]
    assert body["non_field_errors"][0].startswith("JSON parse error")


@pytest.mark.parametrize(
    ("payload", "kind"), [(b"[]", "list"), (b'"x"', "str"), (b"3", "int"), (b"null", "null")]
)
async def test_a_body_that_is_not_an_object_is_400(alice: User, payload: bytes, kind: str) -> None:
    status, body, _ = await raw(alice, "POST", "/api/tasks/", payload)
    assert status == 400
    assert body == {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {kind}."]}


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"title": ["This field is required."]}),
        ({"title": ""}, {"title": ["This field may not be blank."]}),
        ({"title": " \t\n"}, {"title": ["This field may not be blank."]}),
        ({"title": None}, {"title": ["This field may not be null."]}),
        ({"title": 5}, {"title": ["Not a valid string."]}),
        ({"title": "x" * 256}, {"title": ["Ensure this field has no more than 255 characters."]}),
        (
            {"title": "x", "description": "d" * 10_001},
            {"description": ["Ensure this field has no more than 10000 characters."]},
        ),
        ({"title": "a\u0000b"}, {"title": ["Null characters are not allowed."]}),
        ({"title": "\ud800abc"}, {"title": ["Invalid unicode: lone surrogate."]}),
        (
            {"title": "x", "description": "\u0000"},
            {"description": ["Null characters are not allowed."]},
        ),
        (
            {"title": "x", "description": "abc\udfff"},
            {"description": ["Invalid unicode: lone surrogate."]},
        ),
        ({"title": "x", "done": "yes"}, {"done": ["Must be a valid boolean."]}),
        ({"title": "x", "done": 1}, {"done": ["Must be a valid boolean."]}),
        ({"title": "x", "colour": "red"}, {"colour": ["Unknown field."]}),
        ({"title": "x", "id": 5}, {"id": ["This field is read-only."]}),
        ({"title": "x", "user": 5}, {"user": ["This field is read-only."]}),
        ({"title": "x", "version": 9}, {"version": ["This field is read-only."]}),
        ({"title": "x", "created_at": "2020-01-01"}, {"created_at": ["This field is read-only."]}),
    ],
)
async def test_invalid_task_fields(alice: User, body: dict[str, Any], errors: Any) -> None:
    status, answer, _ = await alice.call("POST", "/api/tasks/", body)
    assert status == 400
    assert answer == errors
    _, listing, _ = await alice.call("GET", "/api/tasks/")
    assert listing["count"] == 0


async def test_boundaries_are_accepted(alice: User) -> None:
    status, body, _ = await alice.call(
        "POST", "/api/tasks/", {"title": "x" * 255, "description": "é" * 10_000}
    )
    assert status == 201, body


@pytest.mark.parametrize("text", ["a\u0000b", "\ud800abc"], ids=["nul", "lone-surrogate"])
async def test_text_postgres_cannot_hold_is_400_on_update(alice: User, text: str) -> None:
    task = await alice.create_task("x")
    url = f"/api/tasks/{task['id']}/"
    for method in ("PUT", "PATCH"):
        status, body, _ = await alice.call(method, url, {"title": "ok", "description": text})
        assert (status, list(body)) == (400, ["description"]), method
    _, after, _ = await alice.call("GET", url)
    assert after == task


async def test_invalid_patch_changes_nothing(alice: User) -> None:
    task = await alice.create_task("x")
    url = f"/api/tasks/{task['id']}/"
    status, body, _ = await alice.call("PATCH", url, {"title": "ok", "done": "nope"})
    assert (status, body) == (400, {"done": ["Must be a valid boolean."]})
    _, after, _ = await alice.call("GET", url)
    assert after == task


async def test_oversized_body_is_413(alice: User) -> None:
    payload = b'{"title": "x", "description": "' + b"a" * (1024 * 1024) + b'"}'
    status, body, _ = await raw(alice, "POST", "/api/tasks/", payload)
    assert status == 413
    assert body["code"] == "too_large"


async def test_method_not_allowed_is_405_with_allow(alice: User) -> None:
    status, body, headers = await alice.call("DELETE", "/api/tasks/")
    assert status == 405
    assert body == {"detail": 'Method "DELETE" not allowed.', "code": "method_not_allowed"}
    assert set(headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}


async def test_head_is_allowed_where_get_is(alice: User) -> None:
    task = await alice.create_task("x")
    for path in ("/api/me/", "/api/tasks/", f"/api/tasks/{task['id']}/"):
        status, body, headers = await alice.call("HEAD", path)
        assert (status, body) == (200, None), path
    assert headers["ETag"] == '"1"'


@pytest.mark.parametrize("path", ["/api/stream/", "/api/ws/"])
async def test_head_is_not_allowed_on_live_routes(alice: User, path: str) -> None:
    status, _, _ = await alice.call("HEAD", path)
    assert status == 405


async def test_unknown_route_is_json_404(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/api/nothing-here/")
    assert resp.status == 404
    assert await resp.json() == {"detail": "Not found.", "code": "not_found"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/tasks/"),
        ("POST", "/api/tasks/"),
        ("GET", "/api/tasks/1/"),
        ("GET", "/api/me/"),
    ],
)
async def test_no_token_is_401_with_challenge(
    client: TestClient[web.Request, web.Application], method: str, path: str
) -> None:
    resp = await client.request(method, path)
    assert resp.status == 401
    assert await resp.json() == {
        "detail": "Authentication credentials were not provided.",
        "code": "not_authenticated",
    }
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_healthz(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200


async def test_readyz_when_both_answer(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"postgres": True, "redis": True, "live": True}
