"""Postgres, Redis and `taskd serve` for the benchmark, found or started as `make run` does
(`devtools.Services`), each case on a throwaway database and Redis namespace; everything the
bench made is removed at the end, also after Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
import uuid
from collections import Counter
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Self

import aiohttp
import psutil
import psycopg2
import redis
from psycopg2.extensions import make_dsn, parse_dsn

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # devtools/ is not installed: it lives in the checkout

import devtools  # noqa: E402
from taskd.config import Settings, load_settings  # noqa: E402

SERVING = "taskd is serving at"
START_TIMEOUT = 60.0  # a busy 2-core machine imports slowly; not a goal


class Stack:
    """The Postgres and Redis servers, and every database, namespace and process made on them."""

    def __init__(self) -> None:
        self.settings: Settings = load_settings(PROJECT / "config.toml")
        self._services = devtools.Services(
            self.settings.postgres.dsn.get_secret_value(),
            self.settings.redis.url.get_secret_value(),
            devtools.state_dir(PROJECT) / "bench",
        )
        self.secret = secrets.token_urlsafe(48)
        self.databases: list[str] = []
        self.namespaces: list[str] = []
        self.servers: list[Server] = []
        self.children: list[BaseProcess] = []  # load-generating processes

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._services.__enter__)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            for server in self.servers:
                with contextlib.suppress(Exception):
                    await server.stop(signal.SIGINT, grace=10)
            for child in self.children:
                if child.is_alive():
                    child.kill()
                child.join(5)
            await asyncio.to_thread(self._forget)
        finally:
            await asyncio.to_thread(self._services.__exit__, None, None, None)

    @property
    def started_private(self) -> bool:
        """Whether Postgres or Redis are private ones (none answered where configured)."""
        return bool(self._services.started)

    @property
    def postgres_dsn(self) -> str:
        return self._services.postgres_dsn

    @property
    def redis_url(self) -> str:
        return self._services.redis_url

    def admin(self, statement: str, params: Any = None, dbname: str = "postgres") -> list[Any]:
        """Run one statement in autocommit (CREATE/DROP DATABASE need it); return its rows."""
        conn = psycopg2.connect(make_dsn(**{**parse_dsn(self.postgres_dsn), "dbname": dbname}))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    async def deployment(self, label: str) -> Deployment:
        """A new database, migrated as `taskd migrate` does, and a Redis namespace of its own."""
        name = f"taskd_bench_{label}_{uuid.uuid4().hex[:8]}"
        self.databases.append(name)
        await asyncio.to_thread(self.admin, f"CREATE DATABASE {name}")
        deployment = Deployment(self, name, f"bench-{label}-{uuid.uuid4().hex[:8]}")
        self.namespaces.append(deployment.namespace)
        env = deployment.env(port=devtools.free_port())
        migrate = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "taskd", "migrate", env=env, cwd=PROJECT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await migrate.communicate()
        if migrate.returncode != 0:
            raise RuntimeError(f"taskd migrate failed:\n{output.decode()}")
        return deployment

    def _forget(self) -> None:
        for name in self.databases:
            with contextlib.suppress(psycopg2.Error):
                self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        client = redis.Redis.from_url(self.redis_url)
        try:
            for namespace in self.namespaces:
                doomed = list(client.scan_iter(match=f"{namespace}:*", count=1000))
                for start in range(0, len(doomed), 500):
                    client.delete(*doomed[start : start + 500])
        finally:
            client.close()


class Deployment:
    """One database and one Redis namespace: what a set of replicas shares."""

    def __init__(self, stack: Stack, dbname: str, namespace: str) -> None:
        self.stack = stack
        self.dbname = dbname
        self.namespace = namespace
        self.dsn = make_dsn(**{**parse_dsn(stack.postgres_dsn), "dbname": dbname})

    def env(self, *, port: int, bcrypt_rounds: int | None = 4, **extra: str) -> dict[str, str]:
        """`taskd serve`'s environment. bcrypt_rounds=None keeps the configured cost."""
        env = {
            **os.environ,
            "TASKD_POSTGRES_DSN": self.dsn,
            "TASKD_REDIS_URL": self.stack.redis_url,
            "TASKD_REDIS_NAMESPACE": self.namespace,
            "TASKD_AUTH_SECRET": self.stack.secret,
            "TASKD_HTTP_HOST": "127.0.0.1",
            "TASKD_HTTP_PORT": str(port),
            "TASKD_LOG_LEVEL": "WARNING",
            # A whole run outlasts the default 5 minutes; an expiring token would end streams.
            "TASKD_AUTH_ACCESS_TTL": "7200",
            # 10 subscribers per user, plus a reconnect overlapping its old connection.
            "TASKD_STREAM_MAX_PER_USER": "64",
            # Set-up registers and logs in hundreds of users from one address.
            "TASKD_THROTTLE_LOGIN_PER_ADDRESS": "1000000",
            "TASKD_THROTTLE_LOGIN_PER_USERNAME": "1000000",
            "TASKD_THROTTLE_REGISTER_PER_ADDRESS": "1000000",
            **extra,
        }
        if bcrypt_rounds is not None:
            env["TASKD_AUTH_BCRYPT_ROUNDS"] = str(bcrypt_rounds)
        return env

    def server(
        self,
        workers: int,
        *,
        port: int | None = None,
        bcrypt_rounds: int | None = 4,
        extra: dict[str, str] | None = None,
    ) -> Server:
        """A `taskd serve` on this deployment (not started); `extra` adds TASKD_* settings."""
        port = port or devtools.free_port()
        env = self.env(port=port, bcrypt_rounds=bcrypt_rounds, **(extra or {}))
        server = Server(env, workers, port)
        self.stack.servers.append(server)
        return server


class Server:
    """`python -m taskd serve --workers N` in a process group of its own (so that a Ctrl-C
    meant for the bench does not reach it before the bench stops it, and every worker dies)."""

    def __init__(self, env: dict[str, str], workers: int, port: int) -> None:
        self.env = env
        self.workers = workers
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.output: list[str] = []
        self.serving_at = 0.0  # time.monotonic() when the last worker said it listens
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.output.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "taskd", "serve", "--workers", str(self.workers),
            env=self.env, cwd=PROJECT, start_new_session=True,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        deadline = time.monotonic() + START_TIMEOUT
        # Every worker prints the line once it listens; then the hub must be up (/readyz).
        while sum(SERVING in line for line in self.output) < self.workers:
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"taskd serve did not start:\n{self.tail()}")
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            ready = 0
            while ready < 3 * self.workers:  # new connections land on either worker
                try:
                    async with http.get(f"{self.url}/readyz") as resp:
                        ready = ready + 1 if resp.status == 200 else 0
                except aiohttp.ClientError:
                    ready = 0
                if time.monotonic() > deadline:
                    raise RuntimeError(f"taskd serve never became ready:\n{self.tail()}")
                if not ready:
                    await asyncio.sleep(0.05)

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace")
            if SERVING in text:
                self.serving_at = time.monotonic()
            self.output.append(text)

    def tail(self, lines: int = 30) -> str:
        return "".join(self.output[-lines:])

    def processes(self) -> list[psutil.Process]:
        """The processes that serve requests: the one process, or the supervisor's workers."""
        if self.proc is None or self.proc.returncode is not None:
            return []
        main = psutil.Process(self.proc.pid)
        return [main] if self.workers == 1 else main.children()

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)  # the supervisor forwards it to every worker

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self, sig: int = signal.SIGINT, grace: float = 30.0) -> None:
        """SIGINT skips the drain (the bench has no load balancer to tell); SIGKILL the group
        if it is not gone in time."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.send_signal(sig)
        try:
            async with asyncio.timeout(grace):
                await self.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.wait()


def redis_connections(redis_url: str, namespace: str, server: Server) -> dict[str, Any]:
    """The service's Redis connections (client names `taskd:<namespace>...`), per process:
    Redis' view of each client's address is the worker's local port."""
    client = redis.Redis.from_url(redis_url)
    try:
        clients = client.client_list()
    finally:
        client.close()
    prefix = f"taskd:{namespace}"
    names = ((c, str(c.get("name", ""))) for c in clients)
    ours = [c for c, name in names if name == prefix or name.startswith(f"{prefix}:")]
    port_of = {int(c["addr"].rsplit(":", 1)[1]): c for c in ours}
    per_process: Counter[int] = Counter()
    for proc in server.processes():
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port in port_of:
                    per_process[proc.pid] += 1
    counts = [per_process.get(p.pid, 0) for p in server.processes()]
    return {
        "total": len(ours),
        "per_process": counts,
        "max_per_process": max(counts, default=0),
    }
