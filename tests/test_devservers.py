"""Tests for devtools: private Postgres/Redis start, crash, restart, stale servers and Services."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis

from devtools import (
    PostgresServer,
    RedisServer,
    Services,
    ensure_database,
    free_port,
    postgres_reachable,
    redis_reachable,
    state_dir,
)


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A fresh directory that user nobody can traverse (pytest's tmp_path is 0700 as root)."""
    path = Path(tempfile.mkdtemp(prefix="taskd-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _query_one(dsn: str, query: str) -> object:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            row = cur.fetchone()
            assert row is not None
            return row[0]
    finally:
        conn.close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_state_dir_uses_project_dir_when_traversable(base_dir: Path) -> None:
    project = base_dir / "project"
    project.mkdir()
    chosen = state_dir(project)
    assert chosen == project.resolve() / ".dev"
    assert chosen.is_dir()
    assert chosen.stat().st_mode & 0o005 == 0o005


def test_state_dir_falls_back_when_nobody_cannot_traverse(base_dir: Path) -> None:
    hidden = base_dir / "hidden"
    hidden.mkdir(mode=0o700)
    hidden.chmod(0o700)
    project = hidden / "project"
    project.mkdir()
    chosen = state_dir(project)
    if os.geteuid() != 0:
        assert chosen == project.resolve() / ".dev"
        return
    digest = hashlib.sha1(str(project.resolve()).encode()).hexdigest()[:12]
    try:
        assert chosen == Path(tempfile.gettempdir()).resolve() / f"taskd-{digest}"
        assert chosen.is_dir()
    finally:
        shutil.rmtree(chosen, ignore_errors=True)


def test_postgres_stop_and_kill_when_never_started(base_dir: Path) -> None:
    server = PostgresServer(base_dir)
    assert not server.running()
    server.stop()
    server.kill()


def test_postgres_survives_kill_and_restarts_on_same_port(base_dir: Path) -> None:
    server = PostgresServer(base_dir)
    port = server.port
    try:
        server.start()
        assert server.running()
        assert _query_one(server.dsn(), "SELECT 1") == 1

        server.kill()
        assert not server.running()
        assert not postgres_reachable(server.dsn(), timeout=1.0)
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(server.dsn(), connect_timeout=2)

        server.start()
        assert server.port == port
        assert _query_one(server.dsn(), "SELECT 1") == 1
    finally:
        server.stop()
    assert not server.running()
    assert not postgres_reachable(server.dsn(), timeout=1.0)


def test_postgres_start_ends_a_stale_server_of_the_same_data_dir(base_dir: Path) -> None:
    """As after a launcher was killed: its server would share the data directory."""
    stale = PostgresServer(base_dir)
    fresh = PostgresServer(base_dir)
    try:
        stale.start()
        fresh.start()
        assert fresh.running()
        assert not stale.running()
        assert _query_one(fresh.dsn(), "SELECT 1") == 1
        assert not postgres_reachable(stale.dsn(), timeout=1.0)
    finally:
        fresh.stop()
        stale.stop()


def test_postgres_starts_over_a_pid_file_naming_a_live_process(base_dir: Path) -> None:
    """A reused pid (or a zombie) in a stale postmaster.pid would pass for a live postmaster."""
    server = PostgresServer(base_dir)
    try:
        server.start()
        server.stop()
        (server.data_dir / "postmaster.pid").write_text(f"{os.getpid()}\n{server.data_dir}\n")
        server.start()
        assert _query_one(server.dsn(), "SELECT 1") == 1
    finally:
        server.stop()


def test_redis_start_ends_a_stale_server_of_the_same_directory(base_dir: Path) -> None:
    stale = RedisServer(base_dir)
    fresh = RedisServer(base_dir)
    try:
        stale.start()
        fresh.start()
        assert fresh.running()
        assert not stale.running()
        assert redis_reachable(fresh.url)
        assert not redis_reachable(stale.url, timeout=0.5)
    finally:
        fresh.stop()
        stale.stop()


def test_redis_persistent_keeps_data_across_restart_and_kill(base_dir: Path) -> None:
    server = RedisServer(base_dir, persistent=True)
    port = server.port
    try:
        server.start()
        with redis.Redis.from_url(server.url) as client:
            client.set("taskd:test", "kept")

        server.stop()
        assert not server.running()
        assert not redis_reachable(server.url, timeout=0.5)

        server.start()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.get("taskd:test") == b"kept"
            client.set("taskd:after-restart", "also kept")

        # appendfsync always: an acknowledged write survives SIGKILL.
        server.kill()
        assert not server.running()
        assert not redis_reachable(server.url, timeout=0.5)
        server.start()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("taskd:after-restart") == b"also kept"
    finally:
        server.stop()
    assert not server.running()


def test_redis_start_failure_reports_log_tail(base_dir: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = RedisServer(base_dir, port=blocker.getsockname()[1])
        with pytest.raises(RuntimeError, match="in use"):
            server.start()
    assert not server.running()


def test_services_starts_private_servers_when_configured_ones_are_down(base_dir: Path) -> None:
    configured_dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/taskd-Test"
    configured_url = f"redis://127.0.0.1:{free_port()}/3"

    with Services(configured_dsn, configured_url, base_dir) as services:
        assert len(services.started) == 2
        assert services.postgres_dsn != configured_dsn
        assert services.postgres_dsn.endswith("/taskd-Test")
        assert _query_one(services.postgres_dsn, "SELECT current_database()") == "taskd-Test"
        ensure_database(services.postgres_dsn)  # idempotent

        assert services.redis_url != configured_url
        assert services.redis_url.endswith("/3")
        with redis.Redis.from_url(services.redis_url) as client:
            assert client.connection_pool.connection_kwargs["db"] == 3
            assert client.ping()

        # A second Services pointed at the running servers reuses them and leaves them alone.
        inner = Services(services.postgres_dsn, services.redis_url, base_dir / "unused")
        with inner:
            assert inner.started == []
            assert inner.postgres_dsn == services.postgres_dsn
            assert inner.redis_url == services.redis_url
        assert postgres_reachable(services.postgres_dsn)
        assert redis_reachable(services.redis_url)
        started = list(services.started)
        private_dsn, private_url = services.postgres_dsn, services.redis_url

    assert services.started == []
    assert all(not server.running() for server in started)
    assert not postgres_reachable(private_dsn, timeout=1.0)
    assert not redis_reachable(private_url, timeout=0.5)
