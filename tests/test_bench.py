"""The benchmark (bench/) runs end to end on tiny sizes and reports every figure, losing no
event. Timing goals stay out of here: this checks that the bench runs and reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import devtools
from bench.cases import crud, pgbench

PROJECT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT = 110  # the tiny run takes about a minute on 2 busy cores


def test_pgbench_scripts_hold_the_stores_statements() -> None:
    """bench/pgbench/*.sql compare the service with Postgres running the same statements:
    a change to taskd/store/tasks.py must be copied into them."""
    assert pgbench.drift() == [], "update bench/pgbench/<case>.sql from taskd/store/tasks.py"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="no wrk: run scripts/ensure-bench-tools.sh (make test does)"
)
@pytest.mark.timeout(BENCH_TIMEOUT + 10)
def test_tiny_bench_reports_every_figure(services: devtools.Services, tmp_path: Path) -> None:
    out, png = tmp_path / "results.json", tmp_path / "bench.png"
    env = {
        **os.environ,
        # The servers this test session uses (configured or private): no second private pair.
        "TASKD_POSTGRES_DSN": services.postgres_dsn,
        "TASKD_REDIS_URL": services.redis_url,
    }
    command = [sys.executable, "-m", "bench.run", "--tiny", "--out", str(out), "--plot", str(png)]
    done = subprocess.run(
        command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-6000:]}"
    results = json.loads(out.read_text())
    assert results["errors"] == []
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "CRUD" in done.stdout
    assert "Live" in done.stdout

    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "ram_bytes", "python", "packages", "git_commit"):
        assert machine[key], key
    assert results["date"]

    for workers in ("1", "2"):
        for case in crud.CASES:
            figures = results["crud"][workers][case]
            assert figures["requests"] > 0, (workers, case)
            assert figures["errors"] == 0, (workers, case)
            for key in ("rps", "p50_ms", "p99_ms", "wrk_cpu_pct", "server_cpu_pct"):
                assert _number(figures[key]), (workers, case, key)
    for case in pgbench.CASES:
        figures = results["pgbench"][case]
        assert figures["transactions"] > 0, case
        assert figures["failed"] == 0, case
        assert _number(figures["tps"]), case
        assert _number(figures["p99_ms"]), case
    assert _number(results["redis_rtt"]["p99_ms"])

    live = results["live"]
    profile = results["profile"]
    assert {(r["subscribers"], r["transport"]) for r in live} == {
        (n, t) for n in profile["subscriber_counts"] for t in ("sse", "ws")
    }
    for r in live:
        where = (r["subscribers"], r["transport"])
        assert r["opened"] == r["subscribers"], where
        assert r["write_failures"] == 0, where
        assert r["deliveries"] == r["writes"] * profile["subscribers_per_user"], where
        for key in ("lost", "duplicated", "unexpected", "out_of_order", "resets", "reconnects"):
            assert r[key] == 0, (where, key)
        for key in ("p50_ms", "p99_ms", "max_ms"):
            assert _number(r["latency"][key]), where
        assert _number(r["rss_per_connection_kib"]), where
        for moment in ("idle", "open", "after"):
            assert r["redis_connections"][moment]["max_per_process"] >= 1, (where, moment)
        assert _number(r["client_processes"]["loop_lag_max_ms"]), where

    catchup = results["catchup"]
    assert catchup["exit_code"] == 0
    assert catchup["never_reconnected"] == 0
    assert catchup["deliveries"] > 0
    for key in ("lost", "duplicated", "out_of_order", "resets"):
        assert catchup[key] == 0, key
    assert _number(catchup["all_live_after_serving_s"])

    storm = results["storm"]
    assert storm["ok"] + storm["rejected_503"] == storm["logins"] == profile["storm_logins"]
    assert storm["ok"] > 0
    assert _number(storm["healthz_during"]["p99_ms"])
