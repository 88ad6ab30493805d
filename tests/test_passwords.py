"""bcrypt off the loop: bounded waiting under a login storm, and equal work for every check."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskd.app import create_app
from taskd.auth import Passwords
from taskd.config import AuthSettings
from taskd.errors import Unavailable
from tests.conftest import PASSWORD, ClientFactory, SettingsFactory

Client = TestClient[web.Request, web.Application]


async def test_a_login_storm_is_answered_503_past_the_bound_and_other_requests_go_on(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    # Cost 10 is tens of milliseconds a check: 60 logins are far more than 0.3 s of work
    # for one thread, so most of them must be turned away at once rather than queue.
    settings = make_settings(
        auth={"bcrypt_rounds": 10, "bcrypt_threads": 1, "bcrypt_max_wait": 0.3},
        throttle={"login_per_username": 10_000},
    )
    client = await aiohttp_client(create_app(settings))
    body = {"username": "storm", "password": PASSWORD}
    async with client.post("/api/register/", json=body) as resp:
        assert resp.status == 201

    async def login() -> tuple[int, Any, Any]:
        async with client.post("/api/login/", json=body) as resp:
            return resp.status, await resp.json(), resp.headers

    async def health() -> int:
        async with client.get("/healthz") as resp:
            return resp.status

    storm = [asyncio.create_task(login()) for _ in range(60)]
    # The loop is free while the pool hashes: a request that needs no hashing is answered.
    assert await health() == 200
    results = await asyncio.gather(*storm)
    refused = [(body, headers) for status, body, headers in results if status == 503]
    served = [status for status, _, _ in results if status == 200]
    assert refused, "nothing was refused: the queue is unbounded"
    assert served, "nothing was served"
    for answer, headers in refused:
        assert answer["code"] == "unavailable"
        assert int(headers["Retry-After"]) >= 1
    assert {status for status, _, _ in results} <= {200, 503}


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


async def test_every_check_costs_one_hash_at_the_configured_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unknown user, current account, account hashed at a lower cost (the cost was raised
    since): the same bcrypt work, 2^rounds, so timing does not tell which accounts exist."""
    rounds = 6
    settings = AuthSettings(bcrypt_rounds=rounds, bcrypt_threads=1)
    with ThreadPoolExecutor(1) as executor:
        passwords = await Passwords.start(settings, executor)
        work: list[int] = []
        real_checkpw = bcrypt.checkpw

        def counting_checkpw(password: bytes, hashed: bytes) -> bool:
            work.append(2 ** _cost(hashed))
            return real_checkpw(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
        current = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds))
        older = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4))
        cases = [
            (None, False),
            (current, True),
            (older, True),
        ]
        for hashed, expected in cases:
            work.clear()
            assert await passwords.verify(PASSWORD, hashed) is expected
            assert sum(work) == 2**rounds, (hashed, work)
            work.clear()
            assert await passwords.verify("wrong password", hashed) is False
            assert sum(work) == 2**rounds, (hashed, work)


async def test_work_past_the_bound_is_refused_without_queueing() -> None:
    settings = AuthSettings(bcrypt_rounds=8, bcrypt_threads=1, bcrypt_max_wait=0.05)
    with ThreadPoolExecutor(1) as executor:
        passwords = await Passwords.start(settings, executor)
        results = await asyncio.gather(
            *(passwords.verify(PASSWORD, None) for _ in range(50)), return_exceptions=True
        )
    refused = [r for r in results if isinstance(r, Unavailable)]
    assert refused
    assert all(r is False or isinstance(r, Unavailable) for r in results)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
