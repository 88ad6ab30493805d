"""Users of the benchmark (registered and logged in through the API), seeded tasks, and the
open-loop writer whose request times the live cases compare delivery times with."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PASSWORD = "correct horse battery"
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class Account:
    index: int  # position in the bench's list: what subscriber processes report
    id: int
    username: str
    token: str
    seq: int = 0  # the user's newest event number, counted from the bench's own writes
    task_ids: list[int] = field(default_factory=list)
    writes: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=TIMEOUT)


async def make_accounts(url: str, count: int, concurrency: int = 16) -> list[Account]:
    """Register and log in `count` users; returned in user-id order."""
    prefix = f"b{uuid.uuid4().hex[:6]}"
    gate = asyncio.Semaphore(concurrency)

    async def one(http: aiohttp.ClientSession, i: int) -> tuple[int, str, str]:
        user = {"username": f"{prefix}u{i}", "password": PASSWORD}
        async with gate:
            async with http.post(f"{url}/api/register/", json=user) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"register: {resp.status} {await resp.text()}")
                user_id = int((await resp.json())["id"])
            async with http.post(f"{url}/api/login/", json=user) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"login: {resp.status} {await resp.text()}")
                return user_id, user["username"], str((await resp.json())["access"])

    async with session() as http:
        made = sorted(await asyncio.gather(*(one(http, i) for i in range(count))))
    return [Account(i, user_id, name, token) for i, (user_id, name, token) in enumerate(made)]


async def seed_tasks(url: str, accounts: list[Account], per_user: int) -> bool:
    """Create `per_user` tasks for each account, one request at a time in user-id order, so
    that (in a fresh database) user u owns task ids (u-1)*per_user+1 ... u*per_user, which
    the pgbench scripts rely on. Returns whether that layout holds."""
    expected = 0
    formulaic = True
    async with session() as http:
        for account in accounts:
            for j in range(per_user):
                body = {"title": f"seeded {j}", "description": "benchmark task"}
                async with http.post(f"{url}/api/tasks/", json=body, headers=account.auth) as r:
                    if r.status != 201:
                        raise RuntimeError(f"seed: {r.status} {await r.text()}")
                    task_id = int((await r.json())["id"])
                expected += 1
                formulaic &= task_id == (account.id - 1) * per_user + j + 1 == expected
                account.task_ids.append(task_id)
                account.seq += 1
    return formulaic


async def give_each_a_task(url: str, accounts: list[Account], concurrency: int = 16) -> None:
    """One task per account, so that any write of the live cases may be a PATCH."""
    gate = asyncio.Semaphore(concurrency)

    async def one(http: aiohttp.ClientSession, account: Account) -> None:
        async with (
            gate,
            http.post(f"{url}/api/tasks/", json={"title": "first"}, headers=account.auth) as resp,
        ):
            if resp.status != 201:
                raise RuntimeError(f"create: {resp.status} {await resp.text()}")
            account.task_ids.append(int((await resp.json())["id"]))
            account.seq += 1

    async with session() as http:
        await asyncio.gather(*(one(http, a) for a in accounts))


@dataclass
class Write:
    account: int
    kind: str  # "create" or "patch"
    sent: float  # time.monotonic() just before the request
    acked: float  # ... when its answer arrived
    status: int  # 0 when the request itself failed
    seq: int | None  # the event number it produced, when it succeeded


class Writer:
    """Writes at a fixed rate (open loop: a slow answer does not delay the next write),
    creates and PATCHes in turn, round robin over the users. One user's writes are sent one
    after another, so each successful write's event number is the user's next."""

    def __init__(self, url: str, accounts: list[Account], rate: float) -> None:
        self.url = url
        self.accounts = accounts
        self.rate = rate
        self.writes: list[Write] = []
        self._locks = {a.index: asyncio.Lock() for a in accounts}

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> None:
        """Until `duration` seconds have passed or `stop` is set."""
        async with session() as http:
            started = time.monotonic()
            pending: set[asyncio.Task[None]] = set()
            i = 0
            while duration is None or i < duration * self.rate:
                due = started + i / self.rate
                if stop is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))
                        break
                else:
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                account = self.accounts[i % len(self.accounts)]
                task = asyncio.create_task(self._write(http, account, create=i % 2 == 0))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            await asyncio.gather(*pending)

    async def _write(self, http: aiohttp.ClientSession, account: Account, create: bool) -> None:
        async with self._locks[account.index]:
            create = create or not account.task_ids  # a PATCH needs a task
            account.writes += 1
            if create:
                method, path = "POST", "/api/tasks/"
                body: dict[str, Any] = {"title": f"live {account.writes}"}
            else:
                method, path = "PATCH", f"/api/tasks/{account.task_ids[-1]}/"
                body = {"title": f"patched {account.writes}"}  # always a change: one event
            sent = time.monotonic()
            status, task_id = 0, None
            try:
                async with http.request(
                    method, self.url + path, json=body, headers=account.auth
                ) as r:
                    status = r.status
                    if status in (200, 201):
                        task_id = int((await r.json())["id"])
            except (aiohttp.ClientError, TimeoutError):
                pass
            acked = time.monotonic()
            seq = None
            if task_id is not None:
                account.seq += 1
                seq = account.seq
                if create:
                    account.task_ids.append(task_id)
            kind = "create" if create else "patch"
            self.writes.append(Write(account.index, kind, sent, acked, status, seq))

    def sent_times(self) -> dict[tuple[int, int], float]:
        """(account index, event number) -> when its write request was sent."""
        return {(w.account, w.seq): w.sent for w in self.writes if w.seq is not None}

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in self.writes:
            counts[w.kind] = counts.get(w.kind, 0) + 1
        return counts

    def failures(self) -> int:
        return sum(w.seq is None for w in self.writes)


def last_seqs(accounts: Iterable[Account]) -> dict[int, int]:
    return {a.index: a.seq for a in accounts}
