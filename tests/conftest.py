"""Fixtures: real Postgres and Redis (the configured ones, or private ones started here),
a database cloned from a migrated template per test, and a Redis namespace per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient
from psycopg2.extensions import make_dsn, parse_dsn
from pydantic import SecretStr

import devtools
from taskd.app import create_app
from taskd.config import Settings, load_settings
from taskd.db import migrate_dsn
from tests.cluster import local_cluster as local_cluster
from tests.live import SseEvent, SseStream
from tests.replicas import Replica

PROJECT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"


def with_dbname(dsn: str, dbname: str) -> str:
    return make_dsn(**{**parse_dsn(dsn), "dbname": dbname})


def admin_execute(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(with_dbname(dsn, "postgres"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """config.toml plus the environment, as `make test` and CI see them."""
    return load_settings(PROJECT / "config.toml")


@pytest.fixture(scope="session")
def services(base_settings: Settings) -> Iterator[devtools.Services]:
    """The configured servers when they answer, otherwise private ones for this run."""
    with devtools.Services(
        base_settings.postgres.dsn.get_secret_value(),
        base_settings.redis.url.get_secret_value(),
        devtools.state_dir(PROJECT) / "test",
    ) as running:
        yield running


@pytest.fixture(scope="session")
def template_dsn(services: devtools.Services) -> Iterator[str]:
    """A migrated database that every test's database is cloned from."""
    name = f"taskd_template_{os.getpid()}"
    admin_execute(services.postgres_dsn, f"DROP DATABASE IF EXISTS {name}")
    admin_execute(services.postgres_dsn, f"CREATE DATABASE {name}")
    dsn = with_dbname(services.postgres_dsn, name)
    settings = Settings().postgres.model_copy(update={"dsn": SecretStr(dsn)})
    asyncio.run(migrate_dsn(settings))
    yield dsn
    admin_execute(services.postgres_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_dsn(services: devtools.Services, template_dsn: str) -> Iterator[str]:
    """A fresh database for this test (a template clone takes milliseconds)."""
    name = f"taskd_test_{uuid.uuid4().hex[:16]}"
    template = parse_dsn(template_dsn)["dbname"]
    admin_execute(services.postgres_dsn, f"CREATE DATABASE {name} TEMPLATE {template}")
    yield with_dbname(services.postgres_dsn, name)
    admin_execute(services.postgres_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def namespaces(services: devtools.Services) -> Iterator[list[str]]:
    """Every test's Redis namespace, removed at the end of the session: an app or replica
    still shutting down after its test cannot leave keys behind."""
    used: list[str] = []
    yield used
    client = redis.Redis.from_url(services.redis_url)
    try:
        for name in used:
            for key in client.scan_iter(match=f"{name}:*", count=1000):
                client.delete(key)
    finally:
        client.close()


@pytest.fixture
def namespace(namespaces: list[str]) -> str:
    """A Redis key prefix of this test's own."""
    name = f"taskd-test-{uuid.uuid4().hex[:12]}"
    namespaces.append(name)
    return name


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    base_settings: Settings, services: devtools.Services, database_dsn: str, namespace: str
) -> SettingsFactory:
    """Settings on this test's database and namespace; `section={key: value}` overrides."""
    secret = SecretStr(secrets.token_urlsafe(48))

    def make(**overrides: dict[str, Any]) -> Settings:
        sections: dict[str, dict[str, Any]] = {
            "postgres": {"dsn": SecretStr(database_dsn), "pool_max": 10},
            "redis": {"url": SecretStr(services.redis_url), "namespace": namespace},
            "auth": {"secret": secret, "bcrypt_rounds": 4},
            "throttle": {"login_per_address": 10_000, "register_per_address": 10_000},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return base_settings.model_copy(
            update={
                name: getattr(base_settings, name).model_copy(update=values)
                for name, values in sections.items()
            }
        )

    return make


def private_dir(kind: str) -> Path:
    """A fresh directory for a private server of one test."""
    return devtools.state_dir(PROJECT) / f"{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def private_redis() -> Iterator[devtools.RedisServer]:
    """A Redis of the test's own (append-only file on), for tests that stop or break it."""
    base = private_dir("redis")
    server = devtools.RedisServer(base, persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, settings: Settings
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(create_app(settings))


@dataclass
class User:
    """A registered, logged-in user and the client it talks through."""

    client: TestClient[web.Request, web.Application]
    id: int
    username: str
    access: str
    refresh: str
    headers: dict[str, str] = field(default_factory=dict)

    async def call(
        self, method: str, path: str, json: Any = None, **kwargs: Any
    ) -> tuple[int, Any, Any]:
        """(status, parsed JSON body or None, headers), authenticated as this user."""
        headers = {"Authorization": f"Bearer {self.access}", **kwargs.pop("headers", {})}
        if json is not None:
            kwargs["json"] = json
        async with self.client.request(method, path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            body = await resp.json() if text else None
            return resp.status, body, resp.headers

    @contextlib.asynccontextmanager
    async def sse(
        self, last_event_id: str | None = None, query: dict[str, str] | None = None
    ) -> AsyncIterator[SseStream]:
        """An open `GET /api/stream/` (200 asserted), resuming from `last_event_id` if given."""
        headers = {"Authorization": f"Bearer {self.access}"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        async with self.client.get("/api/stream/", headers=headers, params=query) as resp:
            assert resp.status == 200, await resp.text()
            yield SseStream(resp)

    async def events(self, after: str, count: int) -> list[SseEvent]:
        """The `count` events after `after`, read from the stream, and nothing else in between."""
        async with self.sse(last_event_id=after) as stream:
            return await stream.take(count)

    async def create_task(self, title: str = "a task", **fields: Any) -> dict[str, Any]:
        status, body, _ = await self.call("POST", "/api/tasks/", {"title": title, **fields})
        assert status == 201, body
        return dict(body)


async def register_and_login(
    client: TestClient[web.Request, web.Application], username: str
) -> User:
    resp = await client.post("/api/register/", json={"username": username, "password": PASSWORD})
    assert resp.status == 201, await resp.text()
    user_id = (await resp.json())["id"]
    resp = await client.post("/api/login/", json={"username": username, "password": PASSWORD})
    assert resp.status == 200, await resp.text()
    tokens = await resp.json()
    return User(client, user_id, username, tokens["access"], tokens["refresh"])


UserFactory = Callable[..., Awaitable[User]]


@pytest.fixture
def make_user(client: TestClient[web.Request, web.Application]) -> UserFactory:
    """`await make_user()` registers and logs in a new user on the test's client."""
    counter = iter(range(1_000_000))

    async def make(
        username: str | None = None,
        on: TestClient[web.Request, web.Application] | None = None,
    ) -> User:
        return await register_and_login(on or client, username or f"user{next(counter)}")

    return make


@pytest.fixture
async def alice(make_user: UserFactory) -> User:
    return await make_user("alice")


@pytest.fixture
async def bob(make_user: UserFactory) -> User:
    return await make_user("bob")


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    """Append `Replica`s to this list; whatever is still running is killed afterwards."""
    started: list[Replica] = []
    yield started
    for replica in started:
        await replica.stop()
