"""Catch-up: SSE clients on one replica while another takes the writes; the replica gets
SIGTERM and is started again on its port; every client reconnects with its Last-Event-ID.
Measured: how long until every client is live again, and that none missed an event."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from bench.accounts import Account, Writer, last_seqs
from bench.deploy import Deployment, Stack
from bench.fleet import Fleet, judge
from bench.profiles import Profile
from bench.stats import distribution_ms, quantile

DELIVERY_WAIT = 30.0


async def catchup_case(
    stack: Stack, deployment: Deployment, accounts: list[Account], profile: Profile
) -> dict[str, Any]:
    per_user = profile.subscribers_per_user
    users = accounts[: max(1, profile.catchup_clients // per_user)]
    drain = {"TASKD_HTTP_DRAIN_SECONDS": str(profile.drain_seconds)}
    replica = deployment.server(1, extra=drain)
    writes_to = deployment.server(1)
    await asyncio.gather(replica.start(), writes_to.start())
    fleet = Fleet(stack, replica.url, "sse", users, per_user, profile.max_per_process)
    stop = asyncio.Event()
    writer = Writer(writes_to.url, users, profile.writes_per_second)
    writing = None
    try:
        opened = await fleet.open()
        writing = asyncio.create_task(writer.run(stop=stop))
        fleet.go()
        await asyncio.sleep(profile.catchup_before_seconds)
        sigterm_at = time.monotonic()
        replica.send_signal(signal.SIGTERM)
        exit_code = await replica.wait()
        exited_at = time.monotonic()
        await replica.start()  # the same port: clients come back to where they were
        await asyncio.sleep(profile.catchup_after_seconds)
        stop.set()
        await writing
        replies = await fleet.expect(last_seqs(users), DELIVERY_WAIT)
    finally:
        stop.set()
        if writing is not None:
            await asyncio.gather(writing, return_exceptions=True)
        await fleet.close()
        await asyncio.gather(replica.stop(), writes_to.stop())
    serving_at = replica.serving_at
    # A client is live again once it has reconnected and holds every event committed
    # before the new process listened (the backlog of its downtime).
    backlog: dict[int, int] = {}
    for w in writer.writes:
        if w.seq is not None and w.acked < serving_at:
            backlog[w.account] = max(backlog.get(w.account, 0), w.seq)
    live_at: list[float] = []
    ended: list[float] = []
    never = 0
    for reply in replies:
        for client in reply["clients"]:
            back = [t for t in client["opens"] if t > sigterm_at]
            ended += [t for t in client["ends"] if t > sigterm_at][:1]
            if not back:
                never += 1
                continue
            target = backlog.get(client["account"], 0)
            got = [t for seq, t in client["received"] if seq == target]
            live_at.append(max(back[0], got[0] if got else back[0]))
    since_serving = [t - serving_at for t in live_at]
    return {
        "clients": len(users) * per_user,
        **opened,
        "drain_seconds": profile.drain_seconds,
        "exit_code": exit_code,
        "streams_ended_after_sigterm_s": round(min(ended) - sigterm_at, 3) if ended else None,
        "shutdown_s": round(exited_at - sigterm_at, 3),
        "restart_s": round(serving_at - exited_at, 3),  # process start to listening
        "never_reconnected": never,
        "all_live_after_serving_s": round(max(since_serving), 3) if since_serving else None,
        "p50_live_after_serving_s": round(quantile(since_serving, 0.5), 3)
        if since_serving
        else None,
        "all_live_after_sigterm_s": round(max(live_at) - sigterm_at, 3) if live_at else None,
        "live_after_sigterm_ms": distribution_ms([t - sigterm_at for t in live_at]),
        "writes": len(writer.writes),
        "write_failures": writer.failures(),
        **{k: v for k, v in judge(replies, writer).items() if k not in ("timeline",)},
    }
