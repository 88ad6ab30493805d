"""The taskd benchmark: CRUD throughput (wrk; pgbench on the service's statements), live
event latency at many subscribers over SSE and WebSocket, memory and Redis connections per
connection, catch-up after a replica restart, and a login storm.

    .venv/bin/python -m bench.run [--quick | --tiny] [--out FILE] [--plot FILE] [--parts ...]

`make bench` runs the full profile, `make bench-quick` the quick one. Progress goes to
stderr, the table to stdout; every figure to bench/results.json and a plot to docs/bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import time
import traceback
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench import plot, report
from bench.accounts import Account, give_each_a_task, make_accounts
from bench.cases import catchup, crud, live, pgbench, storm
from bench.deploy import PROJECT, Deployment, Stack
from bench.machine import describe
from bench.profiles import PROFILES, Profile
from bench.progress import Progress

PARTS = ("crud", "pgbench", "live", "catchup", "storm")
T = TypeVar("T")


def _steps(profile: Profile, parts: set[str]) -> int:
    steps = 1  # the report
    if "crud" in parts:
        steps += len(profile.worker_counts) * (1 + len(crud.CASES))
    if "pgbench" in parts:
        steps += 1 + len(pgbench.CASES)
    if parts & {"live", "catchup", "storm"}:
        steps += 1  # their users
    if "live" in parts:
        steps += 1 + 2 * len(profile.subscriber_counts)
    return steps + ("catchup" in parts) + ("storm" in parts)


class Run:
    def __init__(self, profile: Profile, parts: set[str]) -> None:
        self.profile = profile
        self.parts = parts
        self.progress = Progress(_steps(profile, parts))
        self.results: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "profile": {"name": profile.name, **profile.__dict__},
            "errors": [],
        }

    async def guarded(self, what: str, work: Awaitable[T]) -> T | None:
        """A failed case is recorded and the others still run: one broken path should not
        hide every other figure (the run still exits non-zero)."""
        try:
            return await work
        except Exception as exc:
            traceback.print_exc()
            self.results["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
            self.progress.note(f"FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            return None

    async def crud(self, stack: Stack) -> None:
        self.results["crud"] = {}
        for workers in self.profile.worker_counts:
            self.progress.step(f"CRUD, {workers} worker(s): new database, users, seeded tasks")
            done = await self.guarded(
                f"crud {workers}", crud.crud_cases(stack, self.profile, workers, self.progress)
            )
            if done is not None:
                self.results["crud"][str(workers)] = done

    async def pgbench(self, stack: Stack) -> None:
        p = self.profile
        self.progress.step("pgbench: new database, users, seeded tasks (server stopped after)")
        deployment, server, _, formulaic = await crud.prepared(stack, p, 1, "pgbench")
        await server.stop()  # pgbench alone on Postgres; no relay publishing its outbox rows
        if not formulaic:
            raise RuntimeError("seeded task ids are not laid out as the pgbench scripts expect")
        self.results["pgbench"] = {}
        self.results["pgbench_drift"] = pgbench.drift()
        for case in pgbench.CASES:
            self.progress.step(f"pgbench: {case}")
            result = await pgbench.run_pgbench(
                deployment.dsn, case, p.crud_seconds, p.connections, p.crud_users,
                p.crud_tasks_per_user,
            )  # fmt: skip
            self.results["pgbench"][case] = result
            self.progress.note(
                f"{result['tps']:,.0f} tx/s p50 {result['p50_ms']:.2f} ms"
                f" p99 {result['p99_ms']:.2f} ms, failed {result['failed']}"
            )

    async def users(self, stack: Stack) -> tuple[Deployment, list[Account]]:
        p = self.profile
        count = max(
            max(p.subscriber_counts) // p.subscribers_per_user,
            p.catchup_clients // p.subscribers_per_user,
            p.storm_logins,
        )
        self.progress.step(f"live: new database, {count:,} users")
        deployment = await stack.deployment("live")
        server = deployment.server(p.live_workers)
        await server.start()
        try:
            accounts = await make_accounts(server.url, count)
            await give_each_a_task(server.url, accounts)
            return deployment, accounts
        finally:
            await server.stop()

    async def live(self, stack: Stack, deployment: Deployment, accounts: list[Account]) -> None:
        p = self.profile
        self.progress.step("bare Redis XADD -> XREAD round trip")
        rtt = await live.redis_round_trip(stack, deployment.namespace, p.rtt_samples)
        self.results["redis_rtt"] = rtt
        self.progress.note(f"p50 {rtt['p50_ms']:.2f} ms, p99 {rtt['p99_ms']:.2f} ms")
        self.results["live"] = []
        for count in p.subscriber_counts:
            for transport in ("sse", "ws"):
                self.progress.step(f"live: {count:,} {transport.upper()} subscribers")
                r = await self.guarded(
                    f"live {count} {transport}",
                    live.live_case(stack, deployment, accounts, p, transport, count),
                )
                if r is not None:
                    self.results["live"].append(r)
                    lat = r["latency"]
                    self.progress.note(
                        f"opened {r['opened']:,} in {r['open_seconds']:.1f} s; p50"
                        f" {lat['p50_ms']} ms p99 {lat['p99_ms']} ms max {lat['max_ms']} ms;"
                        f" lost {r['lost']} dup {r['duplicated']};"
                        f" {r['rss_per_connection_kib']} KiB/conn"
                    )

    async def main(self) -> dict[str, Any]:
        async with Stack() as stack:
            self.results["machine"] = await asyncio.to_thread(describe, stack)
            if "crud" in self.parts:
                await self.crud(stack)
            if "pgbench" in self.parts:
                await self.guarded("pgbench", self.pgbench(stack))
            users = None
            if self.parts & {"live", "catchup", "storm"}:
                users = await self.guarded("users", self.users(stack))
            if users is not None:
                deployment, accounts = users
                if "live" in self.parts:
                    await self.guarded("live", self.live(stack, deployment, accounts))
                if "catchup" in self.parts:
                    self.progress.step(f"catch-up: {self.profile.catchup_clients:,} SSE clients")
                    c = await self.guarded(
                        "catchup", catchup.catchup_case(stack, deployment, accounts, self.profile)
                    )
                    self.results["catchup"] = c
                if "storm" in self.parts:
                    self.progress.step(f"login storm: {self.profile.storm_logins} logins")
                    s = await self.guarded(
                        "storm", storm.storm_case(stack, deployment, accounts, self.profile)
                    )
                    self.results["storm"] = s
            self.progress.step("cleaning up: servers, databases, Redis keys")
        return self.results


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes (make bench-quick)")
    size.add_argument("--tiny", action="store_true", help="tiny sizes (tests/test_bench.py)")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results.json")
    parser.add_argument("--plot", type=Path, default=PROJECT / "docs" / "bench.png")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--subscribers", type=int, nargs="+", help="subscriber counts instead of the profile's"
    )
    return parser.parse_args(argv)


async def _run_cancellable(run: Run) -> dict[str, Any]:
    # SIGTERM cleans up like Ctrl-C does: cancel the run, and the Stack stops what it started.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run.main()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.subscribers:
        profile = dataclasses.replace(profile, subscriber_counts=tuple(args.subscribers))
    run = Run(profile, set(args.parts))
    started = time.monotonic()
    try:
        results = asyncio.run(_run_cancellable(run))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: servers stopped, databases and Redis keys removed", file=sys.stderr)
        return 130
    results["total_seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot.draw(results, args.plot)
    run.progress.finish()
    print(report.table(results))
    print(f"\nwrote {args.out} and {args.plot} in {results['total_seconds']:.0f} s")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
