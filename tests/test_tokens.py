"""Forged, tampered, expired and wrong-type tokens never get in."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from taskd.app import create_app
from taskd.config import Settings
from tests.conftest import ClientFactory, SettingsFactory, User, register_and_login


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(user: User, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": str(user.id),
        "type": "access",
        "jti": "5f0c6c8e-8f7a-4c43-9a43-4d2b3c1e0a11",
        "iat": now,
        "exp": now + 60,
    }
    return {**base, **overrides}


async def status_with(user: User, token: str) -> tuple[int, Any]:
    async with user.client.get("/api/tasks/", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


def secret(settings: Settings) -> str:
    return settings.auth.secret.get_secret_value()


async def test_a_genuine_token_works(alice: User, settings: Settings) -> None:
    token = jwt.encode(claims(alice), secret(settings), algorithm="HS256")
    assert (await status_with(alice, token))[0] == 200


async def test_alg_none_is_refused(alice: User) -> None:
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(alice))}."
    status, body = await status_with(alice, token)
    assert (status, body["code"]) == (401, "token_not_valid")


async def test_wrong_key_is_refused(alice: User) -> None:
    token = jwt.encode(
        claims(alice), "another-key-that-is-long-enough-for-hs256!!", algorithm="HS256"
    )
    assert (await status_with(alice, token))[0] == 401


async def test_other_hmac_algorithm_is_refused(alice: User, settings: Settings) -> None:
    token = jwt.encode(claims(alice), secret(settings) * 2, algorithm="HS512")
    assert (await status_with(alice, token))[0] == 401


async def test_tampered_payload_is_refused(alice: User, bob: User) -> None:
    header, _, signature = alice.access.split(".")
    forged = f"{header}.{b64(claims(alice, sub=str(bob.id)))}.{signature}"
    status, body = await status_with(alice, forged)
    assert (status, body["code"]) == (401, "token_not_valid")


async def test_refresh_token_is_not_an_access_token(alice: User) -> None:
    status, body = await status_with(alice, alice.refresh)
    assert (status, body["code"]) == (401, "token_not_valid")


async def test_expired_token_is_refused(alice: User, settings: Settings) -> None:
    past = int(time.time()) - 100
    token = jwt.encode(claims(alice, iat=past - 60, exp=past), secret(settings), algorithm="HS256")
    status, body = await status_with(alice, token)
    assert (status, body["code"]) == (401, "token_not_valid")
    assert "expired" in body["detail"]


@pytest.mark.parametrize("missing", ["sub", "type", "jti", "iat", "exp"])
async def test_a_token_missing_a_claim_is_refused(
    alice: User, settings: Settings, missing: str
) -> None:
    body = claims(alice)
    del body[missing]
    assert (await status_with(alice, jwt.encode(body, secret(settings), algorithm="HS256")))[
        0
    ] == 401


@pytest.mark.parametrize("header", ["Token abc", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz"])
async def test_malformed_authorization_header(alice: User, header: str) -> None:
    async with alice.client.get("/api/tasks/", headers={"Authorization": header}) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "token_not_valid"
        assert "invalid_token" in resp.headers["WWW-Authenticate"]


def _digits(user: User, zero: str) -> str:
    return "".join(chr(ord(zero) + int(d)) for d in str(user.id))


@pytest.mark.parametrize(
    "sub",
    [
        lambda u: f"0{u.id}",
        lambda u: _digits(u, "\uff10"),  # fullwidth
        lambda u: _digits(u, "\u0660"),  # Arabic-Indic
        lambda u: f" {u.id}",
        lambda u: f"+{u.id}",
        lambda u: str(2**63),
        lambda u: "9" * 30,
        lambda u: "0",
    ],
    ids=["leading-zero", "fullwidth", "arabic-indic", "space", "plus", "past-bigint", "huge", "0"],
)
async def test_a_sub_that_is_not_a_canonical_id_is_refused(
    alice: User, settings: Settings, sub: Callable[[User], str]
) -> None:
    token = jwt.encode(claims(alice, sub=sub(alice)), secret(settings), algorithm="HS256")
    status, body = await status_with(alice, token)
    assert (status, body["code"]) == (401, "token_not_valid")


async def test_query_token_is_not_accepted_on_rest_routes(alice: User) -> None:
    async with alice.client.get(f"/api/tasks/?token={alice.access}") as resp:
        assert resp.status == 401


async def test_a_remembered_access_token_still_expires(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    """Verified access tokens are remembered, never past their `exp`."""
    client = await aiohttp_client(create_app(make_settings(auth={"access_ttl": 2})))
    user = await register_and_login(client, "brief")
    status, _ = await status_with(user, user.access)
    assert status == 200  # verified, and now remembered
    expires = jwt.decode(user.access, options={"verify_signature": False})["exp"]
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)  # wall-clock expiry itself
    status, body = await status_with(user, user.access)
    assert (status, body["code"]) == (401, "token_not_valid")
