"""The `taskd` command as `make run` uses it: private servers when none answer, a working API,
and Ctrl-C stops everything it started."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import uuid
from pathlib import Path

import aiohttp

import devtools
from taskd.cli import DEV_NEEDS_CHECKOUT
from taskd.config import Settings
from taskd.streams import RedisKeys
from tests.conftest import PASSWORD, PROJECT, admin_execute, with_dbname
from tests.live import raw_redis

STARTUP_LIMIT = 120.0  # initdb on a busy machine; a bound, not a goal
# The console script, as `make run` runs it: unlike `python -m`, it does not put the current
# directory on the path, so `taskd dev` finds devtools/ in a checkout by itself.
SCRIPT = Path(sys.executable).with_name("taskd")


async def run_taskd(
    *args: str, env: dict[str, str], cwd: Path, script: bool = False
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *([str(SCRIPT)] if script else [sys.executable, "-m", "taskd"]),
        *args,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_serve_refuses_a_missing_secret(tmp_path: Path) -> None:
    proc = await run_taskd("serve", env={"TASKD_AUTH_SECRET": ""}, cwd=tmp_path)
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"secret" in output


async def test_dev_starts_private_servers_serves_and_stops_them() -> None:
    workdir = devtools.state_dir(PROJECT) / f"cli-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    # A checkout of its own (its devtools/ is the project's), so that state stays in it.
    (workdir / "devtools").symlink_to(PROJECT / "devtools")
    port = devtools.free_port()
    env = {
        # Nothing listens on these: the launcher must start its own servers.
        "TASKD_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{devtools.free_port()}/taskd",
        "TASKD_REDIS_URL": f"redis://127.0.0.1:{devtools.free_port()}/0",
        "TASKD_HTTP_PORT": str(port),
        "TASKD_AUTH_BCRYPT_ROUNDS": "4",
        "TASKD_AUTH_SECRET": "",
    }
    proc = await run_taskd("dev", env=env, cwd=workdir, script=True)
    assert proc.stdout is not None
    output = []
    try:
        async with asyncio.timeout(STARTUP_LIMIT):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "".join(output)
                output.append(line)
                if "taskd is serving at" in line:
                    break
        assert f"http://127.0.0.1:{port}/" in line
        ports = {
            kind: int(
                re.findall(rf"{kind}: using private server 127\.0\.0\.1:(\d+)", "".join(output))[0]
            )
            for kind in ("postgres", "redis")
        }

        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            body = {"username": "newcomer", "password": PASSWORD}
            async with http.post(f"{base}/api/register/", json=body) as resp:
                assert resp.status == 201
            async with http.post(f"{base}/api/login/", json=body) as resp:
                access = (await resp.json())["access"]
            headers = {"Authorization": f"Bearer {access}"}
            async with http.post(
                f"{base}/api/tasks/", json={"title": "hi"}, headers=headers
            ) as resp:
                assert resp.status == 201
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, "".join(output) + rest.decode()
    pg_dsn = f"postgresql://postgres@127.0.0.1:{ports['postgres']}/postgres"
    assert not devtools.postgres_reachable(pg_dsn, timeout=1)
    # A clean shutdown: postgres removes its pid file (a crash leaves it).
    assert not (workdir / ".dev" / "postgres" / "pgdata" / "postmaster.pid").exists()
    assert not devtools.redis_reachable(f"redis://127.0.0.1:{ports['redis']}/0", timeout=1)
    shutil.rmtree(workdir)


async def test_dev_outside_a_checkout_says_to_run_make_run(tmp_path: Path) -> None:
    """A plain install has no devtools/: one line that says what to do, and nothing started."""
    proc = await run_taskd("dev", env={"PYTHONPATH": ""}, cwd=tmp_path, script=True)
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert output.decode() == DEV_NEEDS_CHECKOUT + "\n"
    assert "make run" in DEV_NEEDS_CHECKOUT
    assert not (tmp_path / ".dev").exists()


async def test_migrate_of_a_new_schema_clears_stale_events_from_its_namespace(
    services: devtools.Services, settings: Settings, tmp_path: Path
) -> None:
    name = f"taskd_fresh_{uuid.uuid4().hex[:8]}"
    admin_execute(services.postgres_dsn, f"CREATE DATABASE {name}")
    try:
        env = {
            "TASKD_POSTGRES_DSN": with_dbname(services.postgres_dsn, name),
            "TASKD_REDIS_URL": services.redis_url,
            "TASKD_REDIS_NAMESPACE": settings.redis.namespace,
        }
        stale = RedisKeys(settings.redis.namespace).events(1)
        async with raw_redis(settings) as redis:
            await redis.xadd(stale, {"data": "from another database"}, id="7-0")
            proc = await run_taskd("migrate", env=env, cwd=tmp_path)
            output, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, output.decode()
            assert not await redis.exists(stale)
            # An existing schema keeps its events; an earlier version's keys go.
            await redis.xadd(stale, {"data": "this database's"}, id="1-0")
            ns = settings.redis.namespace
            old_layout = (f"{ns}:events:1", f"{ns}:firehose")
            for key in old_layout:
                await redis.xadd(key, {"data": "before the shard channels"})
            proc = await run_taskd("migrate", env=env, cwd=tmp_path)
            output, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, output.decode()
            assert b"none needed" in output
            assert await redis.exists(stale)
            assert not await redis.exists(*old_layout)
    finally:
        admin_execute(services.postgres_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_migrate_without_postgres_is_a_one_line_error(tmp_path: Path) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{devtools.free_port()}/taskd"
    proc = await run_taskd("migrate", env={"TASKD_POSTGRES_DSN": dsn}, cwd=tmp_path)
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert b"Traceback" not in output
    assert b"OperationalError" in output
