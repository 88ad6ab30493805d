"""Postgres: the aiopg pool's lifecycle, the cursor helper, and migrations from `sql/`."""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiopg
import psycopg2
from aiohttp import web

from taskd import keys, store
from taskd.config import PostgresSettings
from taskd.errors import Unavailable

log = logging.getLogger(__name__)


def _sql_dir() -> Path:
    """Where the schema files are: `taskd/sql/` in an installed package (pyproject.toml ships
    the project's `sql/` there), else the checkout's `sql/` (an editable install, whose import
    hook cannot resolve that mapped directory: it has no `__init__.py`)."""
    shipped = importlib.resources.files("taskd") / "sql"
    if isinstance(shipped, Path) and shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent / "sql"


SQL_DIR = _sql_dir()
# Any constant works: it only has to be the same for every replica running `migrate`.
MIGRATION_LOCK = 7_243_001

Cursor = Any  # aiopg.Cursor (untyped library)

# Errors that mean "Postgres is not answering", as opposed to a bug in a statement.
_OUTAGE = (psycopg2.OperationalError, psycopg2.InterfaceError, TimeoutError)


def connect_kwargs(settings: PostgresSettings) -> dict[str, Any]:
    """Per-connection options: short connect, keepalives and a server-side statement backstop."""
    return {
        "dsn": settings.dsn.get_secret_value(),
        "timeout": settings.timeout,
        "enable_hstore": False,  # saves a catalogue query on every new connection
        "connect_timeout": max(1, round(settings.timeout)),
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "options": f"-c statement_timeout={settings.statement_timeout_ms}"
        f" -c idle_in_transaction_session_timeout={settings.statement_timeout_ms}"
        " -c timezone=UTC",
    }


async def pg_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create the pool lazily (a replica starts even while Postgres is down) and close it last."""
    settings = app[keys.SETTINGS].postgres
    pool = await aiopg.create_pool(minsize=0, maxsize=settings.pool_max, **connect_kwargs(settings))
    app[keys.PG_POOL] = pool
    try:
        await _warm_up(pool, settings.pool_min)
        yield
    finally:
        pool.close()
        await pool.wait_closed()


async def _warm_up(pool: Any, count: int) -> None:
    """Open `count` connections now so that the first requests do not pay for them."""
    try:
        conns = [await pool.acquire() for _ in range(count)]
        for conn in conns:
            pool.release(conn)
    except _OUTAGE as exc:
        log.warning("postgres not reachable at start-up (%s); serving 503 until it is", exc)


@asynccontextmanager
async def cursor(pool: Any) -> AsyncIterator[Cursor]:
    """A pooled connection's cursor; an outage becomes a quick 503, never a hang."""
    try:
        async with pool.acquire() as conn, conn.cursor() as cur:
            yield cur
    except _OUTAGE as exc:
        log.warning("postgres unavailable: %s", exc)
        # After a restart every idle connection is dead: drop them all, so that one request
        # pays for the outage rather than one per pooled connection.
        await pool.clear()
        raise Unavailable() from exc
    except asyncio.CancelledError:
        # aiopg turns a server-side statement timeout into CancelledError; only a real
        # cancellation of this task may propagate as one.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("postgres statement cancelled by the server")
        raise Unavailable() from None


async def _fill_username_keys(cur: Cursor) -> None:
    if clashes := await store.backfill_username_keys(cur):
        log.warning(
            "accounts %s share a canonical username with an older account: they cannot log"
            " in until renamed (see README, What protects a user)",
            clashes,
        )


# What a migration needs done in Python, in its transaction, right after its SQL (a rule SQL
# cannot state, such as Unicode case folding).
AFTER_FILE: dict[str, Callable[[Cursor], Awaitable[None]]] = {
    "003_hardening.sql": _fill_username_keys,
}


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    """The numbered schema files, in the order they apply. None at all is an error: an
    install without them would otherwise report that nothing needs applying."""
    found = sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))
    if not found:
        raise FileNotFoundError(f"no migration files (NNN_*.sql) in {sql_dir}")
    return found


async def migrate(cur: Cursor, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply each file of `sql/` not yet applied, once, under a lock; return the names applied."""
    await cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        await cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await cur.execute("SELECT name FROM schema_migrations")
        done = {row[0] for row in await cur.fetchall()}
        applied = []
        for path in migration_files(sql_dir):
            if path.name in done:
                continue
            async with cur.begin():
                await cur.execute(path.read_text(encoding="utf-8"))
                if (step := AFTER_FILE.get(path.name)) is not None:
                    await step(cur)
                await cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
            log.info("applied migration %s", path.name)
            applied.append(path.name)
        return applied
    finally:
        await cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


async def migrate_dsn(settings: PostgresSettings) -> list[str]:
    """Connect once and migrate (the `taskd migrate` command and the test template)."""
    async with aiopg.connect(**connect_kwargs(settings)) as conn, conn.cursor() as cur:
        return await migrate(cur)
