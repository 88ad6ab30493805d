"""Login and register are throttled per address and per username, shared by replicas."""

from __future__ import annotations

import ipaddress
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

import devtools
from taskd.app import create_app
from tests.conftest import PASSWORD, ClientFactory, SettingsFactory

Client = TestClient[web.Request, web.Application]
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


async def login(client: Client, username: str, **headers: str) -> tuple[int, Any, Any]:
    body = {"username": username, "password": "wrong password"}
    async with client.post("/api/login/", json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_login_per_username(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client = await aiohttp_client(create_app(make_settings(throttle={"login_per_username": 3})))
    for _ in range(3):
        assert (await login(client, "victim"))[0] == 401
    status, body, headers = await login(client, "VICTIM")
    assert status == 429
    assert body["code"] == "throttled"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert (await login(client, "someone-else"))[0] == 401


async def test_register_per_address(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client = await aiohttp_client(create_app(make_settings(throttle={"register_per_address": 2})))
    statuses = []
    for i in range(3):
        body = {"username": f"u{i}", "password": PASSWORD}
        async with client.post("/api/register/", json=body) as resp:
            statuses.append(resp.status)
    assert statuses == [201, 201, 429]


async def test_replicas_share_counters(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(throttle={"login_per_address": 4})
    one, two = (
        await aiohttp_client(create_app(settings)),
        await aiohttp_client(create_app(settings)),
    )
    for client in (one, two, one, two):
        assert (await login(client, "x"))[0] == 401
    assert (await login(two, "x"))[0] == 429
    assert (await login(one, "y"))[0] == 429


async def test_forwarded_for_only_from_a_trusted_proxy(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    trusted = make_settings(throttle={"login_per_address": 2}, http={"trusted_proxies": LOOPBACK})
    client = await aiohttp_client(create_app(trusted))
    for _ in range(2):
        assert (await login(client, "a", **{"X-Forwarded-For": "203.0.113.7"}))[0] == 401
    assert (await login(client, "b", **{"X-Forwarded-For": "203.0.113.7"}))[0] == 429
    # Another client address behind the same proxy has its own budget.
    assert (await login(client, "c", **{"X-Forwarded-For": "198.51.100.1"}))[0] == 401


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    client = await aiohttp_client(create_app(make_settings(throttle={"login_per_address": 2})))
    for address in ("203.0.113.1", "203.0.113.2"):
        assert (await login(client, "a", **{"X-Forwarded-For": address}))[0] == 401
    assert (await login(client, "a", **{"X-Forwarded-For": "203.0.113.3"}))[0] == 429


async def test_throttle_carries_on_per_process_without_redis(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    dead = f"redis://127.0.0.1:{devtools.free_port()}/0"
    settings = make_settings(
        redis={"url": SecretStr(dead), "timeout": 0.5}, throttle={"login_per_username": 2}
    )
    client = await aiohttp_client(create_app(settings))
    assert (await login(client, "z"))[0] == 401
    assert (await login(client, "z"))[0] == 401
    assert (await login(client, "z"))[0] == 429
