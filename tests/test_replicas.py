"""Two app instances on one database and one Redis behave as one service."""

from __future__ import annotations

from taskd.app import create_app
from taskd.config import Settings
from tests.conftest import ClientFactory, register_and_login


async def test_logout_on_one_replica_is_honoured_by_the_other(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    user = await register_and_login(one, "roamer")
    async with two.post("/api/logout/", json={"refresh": user.refresh}) as resp:
        assert resp.status == 204
    async with one.post("/api/token/refresh/", json={"refresh": user.refresh}) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "token_not_valid"


async def test_a_task_written_on_one_replica_is_read_on_the_other(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    user = await register_and_login(one, "roamer")
    task = await user.create_task("shared")
    user.client = two
    status, body, _ = await user.call("GET", f"/api/tasks/{task['id']}/")
    assert (status, body) == (200, task)
