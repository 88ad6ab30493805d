"""Write-to-delivery latency: one `taskd serve` process, one SSE client, N sequential writes.

    .venv/bin/python bench/latency.py [--writes 500]

For each write it records when the POST was sent, when its 201 arrived (the commit), and when
the SSE client received the event; it prints the median and p99 of commit->delivery and
request->delivery in milliseconds. Postgres and Redis are the configured ones when they answer,
otherwise private ones (as `make run` does); a throwaway database and namespace are used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn
from pydantic import SecretStr

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

import devtools  # noqa: E402
from taskd.config import load_settings  # noqa: E402
from taskd.streams import forget_namespace  # noqa: E402


def admin(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(make_dsn(**{**parse_dsn(dsn), "dbname": "postgres"}))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(statement)
    conn.close()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, writes: int) -> tuple[list[float], list[float]]:
    async with aiohttp.ClientSession() as http:
        user = {"username": f"bench{uuid.uuid4().hex[:8]}", "password": "correct horse battery"}
        async with http.post(f"{url}/api/register/", json=user) as resp:
            assert resp.status == 201, await resp.text()
        async with http.post(f"{url}/api/login/", json=user) as resp:
            auth = {"Authorization": f"Bearer {(await resp.json())['access']}"}
        committed: dict[str, float] = {}
        sent: dict[str, float] = {}
        from_commit: list[float] = []
        from_request: list[float] = []
        async with http.get(f"{url}/api/stream/", headers=auth) as stream:
            assert stream.status == 200
            await stream.content.readline()  # retry:
            for i in range(writes):
                t0 = time.perf_counter()
                async with http.post(
                    f"{url}/api/tasks/", json={"title": f"t{i}"}, headers=auth
                ) as resp:
                    assert resp.status == 201
                    t1 = time.perf_counter()
                event_id = f"{i + 1}-0"
                sent[event_id], committed[event_id] = t0, t1
                while True:  # read up to this write's event
                    line = (await stream.content.readline()).decode().strip()
                    if line.startswith("id: "):
                        arrived = time.perf_counter()
                        got = line[4:]
                        from_commit.append(max(0.0, arrived - committed[got]) * 1000)
                        from_request.append((arrived - sent[got]) * 1000)
                        if got == event_id:
                            break
        return from_commit, from_request


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=500)
    args = parser.parse_args()
    settings = load_settings(PROJECT / "config.toml")
    with devtools.Services(
        settings.postgres.dsn.get_secret_value(),
        settings.redis.url.get_secret_value(),
        devtools.state_dir(PROJECT) / "bench",
    ) as services:
        db = f"taskd_bench_{uuid.uuid4().hex[:8]}"
        admin(services.postgres_dsn, f"CREATE DATABASE {db}")
        dsn = make_dsn(**{**parse_dsn(services.postgres_dsn), "dbname": db})
        port = devtools.free_port()
        env = {
            **os.environ,
            "TASKD_POSTGRES_DSN": dsn,
            "TASKD_REDIS_URL": services.redis_url,
            "TASKD_REDIS_NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}",
            "TASKD_AUTH_SECRET": secrets.token_urlsafe(48),
            "TASKD_AUTH_BCRYPT_ROUNDS": "4",
            "TASKD_HTTP_PORT": str(port),
            "TASKD_LOG_LEVEL": "WARNING",
        }
        namespace = env["TASKD_REDIS_NAMESPACE"]
        python = sys.executable
        migrate = await asyncio.create_subprocess_exec(python, "-m", "taskd", "migrate", env=env)
        await migrate.wait()
        server = await asyncio.create_subprocess_exec(
            python, "-m", "taskd", "serve", env=env, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert server.stdout is not None
            await server.stdout.readline()  # "taskd is serving at ..."
            from_commit, from_request = await measure(f"http://127.0.0.1:{port}", args.writes)
        finally:
            server.terminate()
            await server.wait()
            admin(services.postgres_dsn, f"DROP DATABASE {db} WITH (FORCE)")
            await forget_namespace(
                settings.redis.model_copy(
                    update={
                        "url": SecretStr(services.redis_url),
                        "namespace": namespace,
                    }
                )
            )
    for name, values in (("commit->delivery", from_commit), ("request->delivery", from_request)):
        print(
            f"{name}: n={len(values)} median={statistics.median(values):.2f} ms"
            f" p99={quantile(values, 0.99):.2f} ms max={max(values):.2f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
