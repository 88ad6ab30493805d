"""Development tools of a source checkout, never in the wheel or the image: the Postgres and
Redis that `make run` (`taskd dev` imports this lazily), the tests and the fault tests use."""

import contextlib
import logging
from pathlib import Path
from typing import Any, Self

import psycopg2
import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn
from redis.connection import parse_url

from devtools.servers import PostgresServer as PostgresServer
from devtools.servers import RedisServer as RedisServer
from devtools.servers import free_port as free_port
from devtools.servers import postgres_reachable as postgres_reachable
from devtools.servers import redis_reachable as redis_reachable
from devtools.servers import state_dir as state_dir

log = logging.getLogger(__name__)


def ensure_database(dsn: str) -> None:
    """Create the database named in dsn on its server if it does not exist yet."""
    params = parse_dsn(dsn)
    if not (dbname := params.get("dbname")):
        return
    conn = psycopg2.connect(make_dsn(dsn, dbname="postgres"))
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction block
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
                log.info("created database %s on %s", dbname, _where(params))
    except psycopg2.errors.DuplicateDatabase:
        pass  # another process created it between our check and our CREATE
    finally:
        conn.close()


class Services:
    """Use the configured Postgres and Redis if reachable, else private ones for the duration."""

    def __init__(self, postgres_dsn: str, redis_url: str, base_dir: Path) -> None:
        self.postgres_dsn = postgres_dsn
        self.redis_url = redis_url
        self.base_dir = Path(base_dir)
        self.started: list[PostgresServer | RedisServer] = []
        self._stops = contextlib.ExitStack()

    def __enter__(self) -> Self:
        """Pick or start both servers and make sure the configured database exists."""
        with self._stops:  # __exit__ is not called when __enter__ raises
            self._setup_postgres()
            self._setup_redis()
            self._stops = self._stops.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the servers this object started, newest first; leave reused ones alone."""
        self.started.clear()
        self._stops.close()  # stops every one even if one fails

    def _start(self, server: PostgresServer | RedisServer) -> None:
        self._stops.callback(server.stop)
        server.start()
        self.started.append(server)

    def _setup_postgres(self) -> None:
        configured = parse_dsn(self.postgres_dsn)
        if postgres_reachable(self.postgres_dsn):
            log.info("postgres: using configured server %s", _where(configured))
        else:
            server = PostgresServer(self.base_dir / "postgres")
            self._start(server)
            self.postgres_dsn = server.dsn(configured.get("dbname") or "postgres")
            private = _where(parse_dsn(self.postgres_dsn))
            log.info("postgres: using private server %s (none at %s)", private, _where(configured))
        ensure_database(self.postgres_dsn)

    def _setup_redis(self) -> None:
        configured: dict[str, Any] = parse_url(self.redis_url)  # type: ignore[no-untyped-call]
        where = _where(configured)
        if redis_reachable(self.redis_url):
            log.info("redis: using configured server %s", where)
            return
        server = RedisServer(self.base_dir / "redis")
        self._start(server)
        self.redis_url = f"redis://127.0.0.1:{server.port}/{configured.get('db', 0)}"
        log.info("redis: using private server 127.0.0.1:%d (none at %s)", server.port, where)


def _where(params: dict[str, Any]) -> str:
    """host:port/database of a parsed DSN or Redis URL, for logs: never the password."""
    host = params.get("host") or params.get("hostaddr") or params.get("path") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{host}{port}/{params.get('dbname', params.get('db', 0))}"
