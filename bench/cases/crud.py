"""CRUD throughput and latency with wrk (32 connections), 1 and 2 workers, next to
`/healthz` on the same server: what the framework alone costs on this machine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.accounts import Account, make_accounts, seed_tasks
from bench.deploy import Deployment, Server, Stack
from bench.profiles import Profile
from bench.progress import Progress
from bench.stats import CpuWindow

LUA = Path(__file__).resolve().parent.parent / "wrk" / "crud.lua"
CASES = ("healthz", "retrieve", "list", "patch", "create")  # create last: it grows the lists
WRK_THREADS = 2  # one per core: wrk's own CPU is reported next to its result


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[Any, ...]:
    """Run a load generator to its end: (exit code, stdout, stderr, its CPU seconds, wall)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the child's own rusage
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        return proc.returncode, out.read().decode(), err.read().decode(), cpu, wall


async def run_wrk(
    server: Server, case: str, accounts_file: str, seconds: float, connections: int
) -> dict[str, Any]:
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk not found: run scripts/ensure-bench-tools.sh (make bench does)")
    command = [
        binary, "-t", str(WRK_THREADS), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(LUA), server.url, "--", case, accounts_file,
    ]  # fmt: skip
    cpu = CpuWindow(server.processes())
    code, out, err, wrk_cpu, wall = await asyncio.to_thread(run_measured, command)
    usage = cpu.result()
    lines = [line for line in out.splitlines() if line.startswith("WRK_RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"wrk {case} failed ({code}):\n{out}\n{err}")
    raw = json.loads(lines[-1].removeprefix("WRK_RESULT "))
    errors = sum(raw[k] for k in raw if k.endswith("_errors") or k == "timeouts")
    return {
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "requests": raw["requests"],
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "max_ms": round(raw["max_us"] / 1000, 3),
        "errors": errors,  # socket errors, timeouts and answers other than 2xx/3xx
        "wrk_cpu_pct": round(100 * wrk_cpu / wall, 1),
        **usage,
    }


async def prepared(
    stack: Stack, profile: Profile, workers: int, label: str
) -> tuple[Deployment, Server, list[Account], bool]:
    """A new database with the CRUD users and their seeded tasks, and a server on it."""
    deployment = await stack.deployment(label)
    server = deployment.server(workers)
    await server.start()
    accounts = await make_accounts(server.url, profile.crud_users)
    formulaic = await seed_tasks(server.url, accounts, profile.crud_tasks_per_user)
    return deployment, server, accounts, formulaic


async def crud_cases(
    stack: Stack, profile: Profile, workers: int, progress: Progress
) -> dict[str, Any]:
    _, server, accounts, _ = await prepared(stack, profile, workers, f"crud{workers}")
    results: dict[str, Any] = {}
    try:
        with tempfile.NamedTemporaryFile("w", prefix="taskd-wrk-", suffix=".txt") as data:
            for a in accounts:
                data.write(f"{a.token} {','.join(map(str, a.task_ids))}\n")
            data.flush()
            if profile.warmup_seconds:  # pools, caches and code paths warm up first
                await run_wrk(server, "retrieve", data.name, profile.warmup_seconds, 8)
            for case in CASES:
                progress.step(f"CRUD, {workers} worker(s): {case}")
                result = await run_wrk(
                    server, case, data.name, profile.crud_seconds, profile.connections
                )
                results[case] = result
                progress.note(
                    f"{result['rps']:,.0f}/s p50 {result['p50_ms']:.1f} ms"
                    f" p99 {result['p99_ms']:.1f} ms, server CPU {result['server_cpu_pct']:.0f}%,"
                    f" wrk CPU {result['wrk_cpu_pct']:.0f}%, errors {result['errors']}"
                )
    finally:
        await server.stop()
    return results
