"""Event latency at N subscribers over SSE or WebSocket, with the server's RSS per idle
connection and its Redis connections per process; and the bare Redis XADD -> XREAD round
trip on the same Redis, the floor under any delivery."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from bench.accounts import Account, Writer, last_seqs
from bench.deploy import Deployment, Server, Stack, redis_connections
from bench.fleet import Fleet, judge
from bench.profiles import Profile
from bench.stats import CpuWindow, LagMonitor, summary_ms

DELIVERY_WAIT = 10.0  # seconds the subscribers get to receive the last write's event


def _redis(stack: Stack, deployment: Deployment, server: Server) -> dict[str, Any]:
    return redis_connections(stack.redis_url, deployment.namespace, server)


async def live_case(
    stack: Stack,
    deployment: Deployment,
    accounts: list[Account],
    profile: Profile,
    transport: str,
    count: int,
) -> dict[str, Any]:
    users = accounts[: max(1, count // profile.subscribers_per_user)]
    # A fresh server per case: RSS before/after is then about these connections alone, and
    # one case's stall or leftovers cannot leak into the next.
    server = deployment.server(profile.live_workers)
    await server.start()
    fleet = None
    try:
        await asyncio.sleep(profile.settle_seconds)
        rss_before, redis_idle = server.rss_bytes(), _redis(stack, deployment, server)
        fleet = Fleet(
            stack, server.url, transport, users, profile.subscribers_per_user,
            profile.max_per_process,
        )  # fmt: skip
        opened = await fleet.open()
        await asyncio.sleep(profile.settle_seconds)
        rss_open, redis_open = server.rss_bytes(), _redis(stack, deployment, server)
        writer = Writer(server.url, users, profile.writes_per_second)
        fleet.go()
        cpu = CpuWindow(server.processes())
        lag = LagMonitor()
        lag.start()
        await writer.run(profile.live_seconds)
        replies = await fleet.expect(last_seqs(users), DELIVERY_WAIT)
        usage, own_lag = cpu.result(), await lag.stop()
        rss_after, redis_after = server.rss_bytes(), _redis(stack, deployment, server)
    finally:
        if fleet is not None:
            await fleet.close()
        await server.stop()
    verdict = judge(replies, writer)
    connections = max(1, opened["opened"])
    return {
        "transport": transport,
        "subscribers": count,
        "users": len(users),
        "workers": profile.live_workers,
        "seconds": profile.live_seconds,
        **opened,
        "writes": len(writer.writes),
        "writes_by_kind": writer.kinds(),
        "write_failures": writer.failures(),
        "write_latency": summary_ms([w.acked - w.sent for w in writer.writes]),
        **verdict,
        "writer_loop": own_lag,
        **usage,
        "rss_kib": {
            "before": rss_before // 1024,
            "open": rss_open // 1024,
            "after_writes": rss_after // 1024,
        },
        "rss_per_connection_kib": round((rss_open - rss_before) / 1024 / connections, 2),
        "redis_connections": {"idle": redis_idle, "open": redis_open, "after": redis_after},
        # What the server logged about itself meanwhile (gc pauses, warnings): stalls explained.
        "server_warnings": [line.strip() for line in server.output if "WARNING" in line][-20:],
    }


async def redis_round_trip(stack: Stack, namespace: str, samples: int) -> dict[str, Any]:
    """XADD on one connection, XREAD BLOCK on another, both to the bench's Redis."""
    key = f"{namespace}:bench-rtt"
    writer, reader = Redis.from_url(stack.redis_url), Redis.from_url(stack.redis_url)
    latencies: list[float] = []

    async def read() -> None:
        last = "$"
        while len(latencies) < samples:
            reply: Any = await reader.xread({key: last}, block=2000)
            now = time.monotonic()
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    latencies.append(now - float(fields[b"t"]))
                    last = entry_id

    try:
        reading = asyncio.create_task(read())
        await asyncio.sleep(0.2)  # XREAD from `$` sees only entries added after it blocks
        for _ in range(samples):
            await writer.xadd(key, {"t": repr(time.monotonic())})
            await asyncio.sleep(0.002)
        async with asyncio.timeout(10):
            await reading
    finally:
        await writer.delete(key)
        await writer.aclose()
        await reader.aclose()
    return summary_ms(latencies)
