"""Faults: Redis and Postgres going away and coming back, relay leaders dying or hanging.
Every server stopped here is a private one the test started; replicas are real processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from taskd import devservers
from taskd.app import create_app
from taskd.config import Settings
from taskd.db import migrate_dsn
from tests.conftest import PROJECT, ClientFactory, SettingsFactory, User, register_and_login
from tests.live import WAIT

RECOVERY = 30.0  # bound on waiting for a reconnect with back-off; not a goal


async def eventually(probe: Callable[[], Awaitable[bool]], limit: float = RECOVERY) -> None:
    """Retry `probe` until it holds: for recoveries that no event announces to a client."""
    async with asyncio.timeout(limit):
        while not await probe():  # noqa: ASYNC110 - nothing to await: the server is polled
            await asyncio.sleep(0.1)


def private_dir(kind: str) -> Any:
    return devservers.state_dir(PROJECT) / f"{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def private_redis() -> Iterator[devservers.RedisServer]:
    base = private_dir("redis")
    server = devservers.RedisServer(base, persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def stream_ids(user: User, after: str, count: int) -> list[str]:
    return [e.id or "" for e in await user.events(after=after, count=count)]


async def test_writes_survive_redis_outage_and_backlog_drains_in_order(
    aiohttp_client: ClientFactory,
    make_settings: SettingsFactory,
    private_redis: devservers.RedisServer,
) -> None:
    settings = make_settings(redis={"url": SecretStr(private_redis.url), "timeout": 0.5})
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "steadfast")
    async with user.sse() as stream:
        for i in range(3):
            await user.create_task(f"before{i}")
        assert [e.id for e in await stream.take(3)] == ["1-0", "2-0", "3-0"]

        private_redis.stop()
        # Open streams end so that their clients resume later.
        assert await stream.ends() == []

    for i in range(5):
        await user.create_task(f"during{i}")  # committed to Postgres and the outbox
    async with client.get(
        "/api/stream/", headers={"Authorization": f"Bearer {user.access}"}
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["code"] == "unavailable"
        assert int(resp.headers["Retry-After"]) >= 1
    async with client.get("/readyz") as resp:
        assert resp.status == 503

    private_redis.start()  # same port, same append-only file

    async def stream_opens() -> bool:
        async with client.get(
            "/api/stream/", headers={"Authorization": f"Bearer {user.access}"}
        ) as resp:
            return resp.status == 200

    await eventually(stream_opens)
    await user.create_task("after")
    ids = await stream_ids(user, after="3-0", count=6)
    assert ids == [f"{n}-0" for n in range(4, 10)]


async def test_relay_and_hub_recover_from_a_postgres_restart(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory
) -> None:
    server = devservers.PostgresServer(private_dir("pg"))
    server.start()
    try:
        devservers.ensure_database(server.dsn("taskd"))
        settings = make_settings(postgres={"dsn": SecretStr(server.dsn("taskd")), "timeout": 2.0})
        await migrate_dsn(settings.postgres)
        client = await aiohttp_client(create_app(settings))
        user = await register_and_login(client, "patient")
        await user.create_task("one")
        assert await stream_ids(user, after="0-0", count=1) == ["1-0"]

        server.kill()
        server.start()

        async def writes_work() -> bool:
            status, _, _ = await user.call("POST", "/api/tasks/", {"title": "two"})
            return status == 201

        await eventually(writes_work)
        # The relay reconnected by itself and published the write.
        assert await stream_ids(user, after="1-0", count=1) == ["2-0"]
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(server.base_dir, ignore_errors=True)


class Replica:
    """A `taskd serve` process: a replica whose death is real."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self.port = devservers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TASKD_POSTGRES_DSN": settings.postgres.dsn.get_secret_value(),
            "TASKD_REDIS_URL": settings.redis.url.get_secret_value(),
            "TASKD_REDIS_NAMESPACE": settings.redis.namespace,
            "TASKD_AUTH_SECRET": settings.auth.secret.get_secret_value(),
            "TASKD_AUTH_BCRYPT_ROUNDS": "4",
            "TASKD_HTTP_PORT": str(self.port),
            **env,
        }
        self.output: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._seen: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskd",
            "serve",
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_for("taskd is serving at")

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode():
            self.output.append(line)
            for text, seen in self._seen.items():
                if text in line:
                    seen.set()

    async def wait_for(self, text: str, limit: float = RECOVERY) -> None:
        """Until the replica logs a line containing `text`."""
        seen = self._seen.setdefault(text, asyncio.Event())
        if any(text in line for line in self.output):
            seen.set()
        async with asyncio.timeout(limit):
            await seen.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        await replica.stop()


async def test_leader_death_hands_over_with_nothing_lost_or_repeated(
    aiohttp_client: ClientFactory, settings: Settings, replicas: list[Replica]
) -> None:
    leader = Replica(settings)
    replicas.append(leader)
    await leader.start()
    await leader.wait_for("relay: this process is the leader")
    client = await aiohttp_client(create_app(settings))  # the follower, in this process
    user = await register_and_login(client, "survivor")
    async with user.sse() as stream:
        for i in range(3):
            await user.create_task(f"t{i}")
        assert [e.seq for e in await stream.take(3)] == [1, 2, 3]  # published by the leader

        leader.signal(signal.SIGKILL)
        for i in range(3, 6):
            await user.create_task(f"t{i}")
        # The follower takes the lock within seconds and publishes the rest.
        assert [e.seq for e in await stream.take(3, wait=RECOVERY)] == [4, 5, 6]
    assert await stream_ids(user, after="0-0", count=6) == [f"{n}-0" for n in range(1, 7)]


async def test_a_hung_leader_loses_the_lease(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, replicas: list[Replica]
) -> None:
    settings = make_settings(relay={"lease_seconds": 2})
    leader = Replica(settings, TASKD_RELAY_LEASE_SECONDS="2")
    replicas.append(leader)
    await leader.start()
    await leader.wait_for("relay: this process is the leader")
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "waiting")
    leader.signal(signal.SIGSTOP)  # alive but silent: its session goes idle
    try:
        async with user.sse() as stream:
            await user.create_task("while the leader hangs")
            (event,) = await stream.take(1, wait=RECOVERY)
        assert event.id == "1-0"
    finally:
        leader.signal(signal.SIGCONT)
    # The old leader wakes up, finds its session gone and does not publish twice.
    await user.create_task("after")
    assert await stream_ids(user, after="0-0", count=2) == ["1-0", "2-0"]


async def test_query_string_token_never_reaches_the_logs(
    settings: Settings, replicas: list[Replica]
) -> None:
    replica = Replica(settings)
    replicas.append(replica)
    await replica.start()
    async with aiohttp.ClientSession() as http:
        user = {"username": "logged", "password": "correct horse battery"}
        async with http.post(f"{replica.url}/api/register/", json=user) as resp:
            assert resp.status == 201
        async with http.post(f"{replica.url}/api/login/", json=user) as resp:
            tokens = await resp.json()
        async with http.get(
            f"{replica.url}/api/stream/", params={"token": tokens["access"]}
        ) as resp:
            assert resp.status == 200
        async with http.get(
            f"{replica.url}/api/stream/", params={"token": "forged.token.x"}
        ) as resp:
            assert resp.status == 401
    await replica.wait_for("/api/stream/?token=[redacted]", limit=WAIT)
    log = "".join(replica.output)
    assert tokens["access"] not in log
    assert "forged.token.x" not in log
    assert tokens["access"].split(".")[2] not in log
