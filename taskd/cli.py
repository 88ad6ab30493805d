"""The `taskd` command: `serve`, `migrate`, and `dev` (the launcher behind `make run`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2
import uvloop
from aiohttp import web
from pydantic import SecretStr

from taskd import keys
from taskd.app import create_app
from taskd.config import ConfigError, Settings, check_secret, load_settings
from taskd.db import migrate_dsn
from taskd.logs import AccessLogger, setup_logging
from taskd.server import (
    GcSchedule,
    Runner,
    raise_open_file_limit,
    watch_gc_pauses,
)
from taskd.shards import REDIS_DOWN
from taskd.streams import forget_namespace

log = logging.getLogger(__name__)

FIRST_MIGRATION = "001_schema.sql"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, help="TOML file (default ./config.toml)")
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", help="overrides [http] host")
    listen.add_argument("--port", type=int, help="overrides [http] port")
    serve = sub.add_parser("serve", parents=[config, listen], help="serve the API")
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    # Set by `--workers N` on each of its N processes: they share the port and the CPUs.
    serve.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    sub.add_parser("migrate", parents=[config], help="apply the schema files in sql/")
    sub.add_parser(
        "dev",
        parents=[config, listen],
        help="development: use the configured Postgres/Redis or start private ones, migrate, serve",
    )
    return parser


def _with_listen(settings: Settings, args: argparse.Namespace) -> Settings:
    http = settings.http.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    return settings.model_copy(update={"http": http})


async def _serve_until_stopped(settings: Settings, worker_of: int | None) -> None:
    """Serve until SIGTERM (graceful: drain, stop accepting, end streams, finish) or SIGINT."""
    app = create_app(settings, processes=worker_of or 1)
    reuse_port = worker_of is not None
    http = settings.http
    runner = Runner(
        app,
        access_log_class=AccessLogger,
        shutdown_timeout=http.shutdown_grace,
        keepalive_timeout=http.keepalive_timeout,
        handle_signals=False,
    )
    await runner.setup()
    gc_schedule = GcSchedule()
    try:
        site = web.TCPSite(runner, http.host, http.port, reuse_port=reuse_port or None)
        await site.start()
        gc_schedule.start()
        watch_gc_pauses()
        print(f"taskd is serving at http://{http.host}:{http.port}/ (Ctrl-C stops it)", flush=True)
        loop = asyncio.get_running_loop()
        received: asyncio.Future[signal.Signals] = loop.create_future()

        def on_signal(sig: signal.Signals) -> None:
            if not received.done():
                received.set_result(sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        if await received == signal.SIGTERM and http.drain_seconds:
            # Tell the load balancer first (/readyz answers 503), keep serving meanwhile.
            app[keys.LIFECYCLE].draining = True
            log.info("SIGTERM: draining for %.1f s before closing the listener", http.drain_seconds)
            await asyncio.sleep(http.drain_seconds)
        app[keys.LIFECYCLE].draining = True
    finally:
        # Stops accepting, ends live streams (on_shutdown), lets in-flight requests finish
        # within shutdown_grace, then releases resources (and relay leadership).
        await runner.cleanup()
        await gc_schedule.stop()
    log.info("taskd stopped")


def _serve(settings: Settings, workers: int = 1, worker_of: int | None = None) -> None:
    raise_open_file_limit()
    if workers > 1:
        _supervise(workers)
    else:
        # uvloop: the event loop in C (libuv); a request's socket and loop overhead halves.
        uvloop.run(_serve_until_stopped(settings, worker_of))


def _supervise(workers: int) -> None:
    """Run N `serve` processes on one port (SO_REUSEPORT); forward signals; exit when all do."""
    argv = [sys.executable, "-m", "taskd", *_worker_argv(sys.argv[1:], workers)]
    parent = os.getpid()
    children = [
        subprocess.Popen(argv, preexec_fn=lambda: _die_with(parent)) for _ in range(workers)
    ]

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    if any(codes):
        raise SystemExit(max(codes))


def _die_with(parent: int) -> None:
    """In a worker, before it runs: SIGTERM it (a graceful stop) when the supervisor dies,
    however it dies. Without this a SIGKILLed supervisor leaves its workers serving on the
    port, unsupervised (Linux only; elsewhere workers outlive a killed supervisor)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_argv(args: list[str], workers: int) -> list[str]:
    """This command line for one worker: `--workers N` becomes `--worker-of N`."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [*out, "--worker-of", str(workers)]


DEV_NEEDS_CHECKOUT = (
    "taskd: `taskd dev` runs in a source checkout of taskd (it needs devtools/, which the "
    "package does not ship): run `make run` there"
)


def _dev(settings: Settings) -> None:
    # Dev-only code stays out of the wheel: `make run` runs this in the checkout, whose
    # directory (with devtools/) is then on the path or added to it here.
    checkout = Path.cwd()
    if (checkout / "devtools" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        import devtools
    except ModuleNotFoundError as exc:
        if exc.name != "devtools":
            raise
        raise SystemExit(DEV_NEEDS_CHECKOUT) from None
    postgres, redis = settings.postgres, settings.redis
    with devtools.Services(
        postgres.dsn.get_secret_value(), redis.url.get_secret_value(), devtools.state_dir(checkout)
    ) as services:
        auth = settings.auth
        if not auth.secret.get_secret_value():
            # A throwaway key: tokens die with the process, which is what a dev run wants.
            auth = auth.model_copy(update={"secret": SecretStr(secrets.token_urlsafe(48))})
        settings = settings.model_copy(
            update={
                "postgres": postgres.model_copy(update={"dsn": SecretStr(services.postgres_dsn)}),
                "redis": redis.model_copy(update={"url": SecretStr(services.redis_url)}),
                "auth": auth,
            }
        )
        asyncio.run(_migrate(settings))
        _serve(settings)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command != "migrate":
            settings = _with_listen(settings, args)
        setup_logging(settings.log)
        if args.command == "serve":
            check_secret(settings)
            _serve(settings, args.workers, args.worker_of)
        elif args.command == "migrate":
            applied = asyncio.run(_migrate(settings))
            print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")
        else:
            _dev(settings)
    except ConfigError as exc:
        print(f"taskd: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, psycopg2.Error) as exc:  # e.g. `migrate` with Postgres unreachable
        print(f"taskd: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr)
        return 1
    return 0


async def _migrate(settings: Settings) -> list[str]:
    """Apply the schema; a brand-new schema also clears its Redis namespace of another
    database's events (a dropped and recreated database, a test run, a restore)."""
    applied = await migrate_dsn(settings.postgres)
    if applied and applied[0] == FIRST_MIGRATION:
        try:
            if forgotten := await forget_namespace(settings.redis):
                log.warning(
                    "new schema: deleted %d stale key(s) under redis namespace %r",
                    forgotten,
                    settings.redis.namespace,
                )
        except REDIS_DOWN as exc:
            log.warning("new schema, but redis is unreachable to clear its namespace: %s", exc)
    else:
        try:
            if forgotten := await forget_namespace(settings.redis, retired_only=True):
                log.warning("deleted %d redis key(s) of an earlier version's layout", forgotten)
        except REDIS_DOWN as exc:
            log.warning("redis is unreachable to clear an earlier version's keys: %s", exc)
    return applied
