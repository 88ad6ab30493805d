"""Real `taskd serve` processes for tests that need a replica whose death is real."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

import devtools
from taskd.config import Settings

RECOVERY = 30.0  # bound on waiting for a reconnect with back-off; not a goal


async def eventually(probe: Callable[[], Awaitable[bool]], limit: float = RECOVERY) -> None:
    """Retry `probe` until it holds: for recoveries that no event announces to a client."""
    async with asyncio.timeout(limit):
        while not await probe():  # noqa: ASYNC110 - nothing to await: the server is polled
            await asyncio.sleep(0.1)


class Replica:
    """A `taskd serve` process: a replica whose death is real."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self.port = devtools.free_port()
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
        self.args: list[str] = []  # extra `taskd serve` arguments
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
            *self.args,
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

    async def wait_for(self, text: str, limit: float = RECOVERY, count: int = 1) -> None:
        """Until the replica has logged `count` lines containing `text`."""
        try:
            await self._wait_for(text, limit, count)
        except TimeoutError:
            tail = "".join(self.output[-40:])
            raise AssertionError(
                f"no {count} x {text!r} within {limit} s; the log:\n{tail}"
            ) from None

    async def _wait_for(self, text: str, limit: float, count: int) -> None:
        async with asyncio.timeout(limit):
            while sum(text in line for line in self.output) < count:
                seen = self._seen.setdefault(text, asyncio.Event())
                seen.clear()
                if sum(text in line for line in self.output) >= count:
                    break
                await seen.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            # Until the output ends: every process holding it (its workers too) has exited.
            await asyncio.wait_for(self._reader, RECOVERY)
