"""Login storm: N logins at once at the configured bcrypt cost, with /healthz measured
meanwhile: logins/s, how many the bounded bcrypt queue turned away (503), and whether the
event loop stayed responsive."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import aiohttp
import bcrypt

from bench.accounts import PASSWORD, Account
from bench.deploy import Deployment, Stack
from bench.profiles import Profile
from bench.stats import CpuWindow, LagMonitor, summary_ms

BASELINE = 1.0  # seconds of /healthz before the storm
HEALTHZ_PAUSE = 0.005


async def _poll_healthz(url: str, samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    # A new connection per request: with --workers 2 a kept-alive one would sample one worker.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while not stop.is_set():
            sent = time.monotonic()
            async with http.get(f"{url}/healthz") as resp:
                await resp.read()
            samples.append((sent, time.monotonic() - sent))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEALTHZ_PAUSE)


async def storm_case(
    stack: Stack, deployment: Deployment, accounts: list[Account], profile: Profile
) -> dict[str, Any]:
    rounds = stack.settings.auth.bcrypt_rounds
    users = accounts[: profile.storm_logins]
    # Their hashes were made at cost 4 (set-up speed). A login against a cheaper stored hash
    # pads to the configured cost and re-hashes it: twice the work. So store a hash at the
    # configured cost, as if they had registered on this server.
    hashed = await asyncio.to_thread(bcrypt.hashpw, PASSWORD.encode(), bcrypt.gensalt(rounds))
    await asyncio.to_thread(
        stack.admin,
        "UPDATE users SET password_hash = %s WHERE id = ANY(%s)",
        (hashed.decode(), [u.id for u in users]),
        deployment.dbname,
    )
    server = deployment.server(profile.live_workers, bcrypt_rounds=None)  # configured cost
    await server.start()
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    try:
        polling = asyncio.create_task(_poll_healthz(server.url, samples, stop))
        await asyncio.sleep(BASELINE)
        started = time.monotonic()
        cpu = CpuWindow(server.processes())
        lag = LagMonitor()
        lag.start()
        outcomes: list[tuple[int, float]] = []

        async def login(http: aiohttp.ClientSession, user: Account) -> None:
            body = {"username": user.username, "password": PASSWORD}
            try:
                async with http.post(f"{server.url}/api/login/", json=body) as resp:
                    await resp.read()
                    outcomes.append((resp.status, time.monotonic()))
            except (aiohttp.ClientError, TimeoutError):
                outcomes.append((0, time.monotonic()))

        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await asyncio.gather(*(login(http, u) for u in users))
        finished = time.monotonic()
        usage, own_lag = cpu.result(), await lag.stop()
        stop.set()
        await polling
    finally:
        stop.set()
        await server.stop()
    statuses = Counter(status for status, _ in outcomes)
    ok_times = [t for status, t in outcomes if status == 200]
    rejected = [t for status, t in outcomes if status == 503]
    before = [d for t, d in samples if t < started]
    during = [d for t, d in samples if started <= t <= finished]
    return {
        "bcrypt_rounds": rounds,
        "workers": profile.live_workers,
        "logins": len(users),
        "ok": statuses.get(200, 0),
        "rejected_503": statuses.get(503, 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(finished - started, 3),
        "logins_per_s": round(len(ok_times) / (max(ok_times) - started), 2) if ok_times else 0,
        "first_503_ms": round((min(rejected) - started) * 1000, 1) if rejected else None,
        # Answer times: with the queue bounded, no login should wait much past bcrypt_max_wait.
        "login_latency": summary_ms([t - started for t in ok_times]),
        "bcrypt_max_wait": stack.settings.auth.bcrypt_max_wait,
        "healthz_before": summary_ms(before),
        "healthz_during": summary_ms(during),
        "healthz_timeline": [
            (round(t - started, 3), round(d * 1000, 2)) for t, d in samples if t <= finished
        ],
        "client_loop": own_lag,
        **usage,
    }
