"""What the figures were measured on: machine, versions, commit."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

import psutil
import redis

from bench.deploy import PROJECT, Stack

PACKAGES = (
    "taskd", "aiohttp", "aiohttp-sse", "aiopg", "psycopg2-binary", "redis", "pydantic",
    "pyjwt", "bcrypt", "prometheus-client", "uvloop", "orjson", "psutil", "matplotlib",
)  # fmt: skip


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _run(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not found"
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PROJECT)
    return (done.stdout or done.stderr).strip()


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(stack: Stack) -> dict[str, Any]:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        redis_version = str(client.info("server").get("redis_version"))
    finally:
        client.close()
    postgres = stack.admin("SHOW server_version")[0][0]
    commit = _run(["git", "rev-parse", "HEAD"])
    changed = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    wrk = _run(["wrk", "-v"]).splitlines()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": _versions(),
        "postgres": postgres,
        "redis": redis_version,
        "wrk": re.sub(r"\s+", " ", wrk[0]) if wrk else None,
        "pgbench": _run(["pgbench", "--version"]),
        "git_commit": commit,
        "git_uncommitted_changes": [line[3:] for line in changed.splitlines() if line.strip()],
        "servers": "private (devtools)" if stack.started_private else "configured",
    }
