"""pgbench running the service's own statements (bench/pgbench/*.sql) against the same
Postgres, with as many clients as wrk has connections: what the database alone can do."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from psycopg2.extensions import parse_dsn

from bench.cases.crud import run_measured
from bench.stats import summary_ms
from taskd.store import tasks

SCRIPTS = Path(__file__).resolve().parent.parent / "pgbench"
CASES = ("retrieve", "list", "update", "create")  # create last: it grows the users' lists


def _inline(statement: str, values: dict[str, str], positional: tuple[str, ...] = ()) -> str:
    for name, value in values.items():
        statement = statement.replace(f"%({name})s", value)
    for value in positional:
        statement = statement.replace("%s", value, 1)
    return statement


def _expected() -> dict[str, list[str]]:
    """The store's statements with the scripts' values inlined (as psycopg2 would)."""
    common = {"title": "'pgbench'", "description": "''", "done": "false"}
    return {
        "retrieve": [_inline(tasks.GET_TASK, {}, (":tid", ":uid"))],
        "list": [
            _inline(
                tasks.LIST_TASKS["-created_at"],
                {"user_id": ":uid", "done": "NULL", "search": "NULL", "limit": "20", "offset": "0"},
            )
        ],
        "create": [_inline(tasks.CREATE_TASK, {**common, "user_id": ":uid"})],
        "update": [
            _inline(tasks.NEXT_EVENT, {}, (":uid",)),
            _inline(tasks.LOCK_TASK, {}, (":tid", ":uid")),
            _inline(
                tasks.UPDATE_TASK,
                {
                    **common,
                    "task_id": ":tid",
                    "seq": ":event_seq",
                    "kind": "'task.updated'",
                    "at": "':clock_timestamp'",
                },
            ),
        ],
    }


def _normal(sql: str) -> str:
    kept = [line for line in sql.splitlines() if not line.lstrip().startswith(("--", "\\set"))]
    return re.sub(r"\s+", " ", " ".join(kept)).strip()


def drift() -> list[str]:
    """Scripts that no longer hold the statements taskd/store/tasks.py sends: a warning that
    the pgbench figures compare with something the service stopped doing."""
    stale = []
    for case, statements in _expected().items():
        script = _normal((SCRIPTS / f"{case}.sql").read_text())
        if not all(_normal(s) in script for s in statements):
            stale.append(case)
    return stale


async def run_pgbench(
    dsn: str, case: str, seconds: float, clients: int, users: int, per_user: int
) -> dict[str, Any]:
    return await asyncio.to_thread(_pgbench, dsn, case, seconds, clients, users, per_user)


def _binary() -> str | None:
    """pgbench on PATH, else Debian's newest /usr/lib/postgresql/<major>/bin/pgbench."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pgbench"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return shutil.which("pgbench") or (str(found[-1]) if found else None)


def _pgbench(
    dsn: str, case: str, seconds: float, clients: int, users: int, per_user: int
) -> dict[str, Any]:
    binary = _binary()
    if binary is None:
        raise RuntimeError("pgbench not found: run scripts/ensure-bench-tools.sh (make bench does)")
    params = parse_dsn(dsn)
    env = {**os.environ}
    if params.get("password"):
        env["PGPASSWORD"] = params["password"]
    script = SCRIPTS / f"{case}.sql"
    with tempfile.TemporaryDirectory(prefix="taskd-pgbench-") as logs:
        command = [
            binary, "-n", "-M", "simple", "-c", str(clients), "-j", "2",
            "-T", str(max(1, round(seconds))), "-f", str(script),
            "-D", f"users={users}", "-D", f"per_user={per_user}", "-l", f"--log-prefix={logs}/tx",
            "-h", params.get("host", "127.0.0.1"), "-p", str(params.get("port", 5432)),
            "-U", params.get("user", "postgres"), params["dbname"],
        ]  # fmt: skip
        code, out, err, cpu, wall = run_measured(command, env)
        if code != 0:
            raise RuntimeError(f"pgbench {case} failed ({code}):\n{out}\n{err}")
        # One line per transaction: client, number, elapsed microseconds, script, epoch, us.
        elapsed = [
            int(line.split()[2]) / 1e6
            for log in Path(logs).iterdir()
            for line in log.read_text().splitlines()
            if line.strip()
        ]
    tps = re.search(r"tps = ([\d.]+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    latency = summary_ms(elapsed)
    return {
        "tps": round(float(tps.group(1)), 1) if tps else None,
        "transactions": len(elapsed),
        "failed": int(failed.group(1)) if failed else 0,
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "max_ms": latency["max_ms"],
        "pgbench_cpu_pct": round(100 * cpu / wall, 1),
    }
