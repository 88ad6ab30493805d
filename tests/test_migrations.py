"""Migration 003 on a database that has lived under 001 and 002: families, canonical
usernames and the outbox's commit order are built from what is there."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import aiopg
import psycopg2

import devtools
from taskd import db
from tests.conftest import PROJECT, admin_execute, with_dbname


def rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


async def migrate_with(dsn: str, sql_dir: Path) -> list[str]:
    async with aiopg.connect(dsn) as conn, conn.cursor() as cur:
        return await db.migrate(cur, sql_dir)


async def test_migration_003_carries_existing_rows_over(
    services: devtools.Services, tmp_path: Path
) -> None:
    name = f"taskd_mig_{uuid.uuid4().hex[:12]}"
    base = services.postgres_dsn
    admin_execute(base, f"CREATE DATABASE {name}")
    dsn = with_dbname(base, name)
    try:
        old = tmp_path / "old"
        old.mkdir()
        for path in sorted((PROJECT / "sql").glob("00[12]_*.sql")):
            shutil.copy(path, old)
        assert await migrate_with(dsn, old) == ["001_schema.sql", "002_refresh_token_cleanup.sql"]
        rows(
            dsn,
            """
            INSERT INTO users (username, password_hash, event_seq) VALUES
                ('Straße', 'x', 0), ('alice', 'x', 2), ('STRASSE', 'x', 0), ('Bob', 'x', 1);
            INSERT INTO refresh_tokens (jti, family, user_id, expires_at, used_at, revoked_at)
            SELECT gen_random_uuid(), f, 2, now() + interval '1 day', u, r
            FROM (VALUES
                ('00000000-0000-0000-0000-00000000000a'::uuid, now(), now()),
                ('00000000-0000-0000-0000-00000000000a'::uuid, NULL, NULL),
                ('00000000-0000-0000-0000-00000000000b'::uuid, NULL, NULL)
            ) AS t(f, u, r);
            INSERT INTO outbox (user_id, seq, kind, task_id, version, at) VALUES
                (2, 2, 'task.deleted', 1, 2, now()),
                (4, 1, 'task.deleted', 2, 2, now() - interval '1 minute'),
                (2, 1, 'task.deleted', 1, 2, now() - interval '2 minutes');
            """,
        )
        assert await migrate_with(dsn, PROJECT / "sql") == [
            "003_hardening.sql",
            "004_refresh_family_expiry.sql",
            "005_account_lifecycle.sql",
        ]

        keys = rows(dsn, "SELECT id, username_key FROM users ORDER BY id")
        # The older of two names that fold alike keeps it; the newer cannot be typed.
        assert keys == [(1, "strasse"), (2, "alice"), (3, "strasse#3"), (4, "bob")]
        # A family with any revoked token is revoked: the race's survivor dies with it.
        families = rows(
            dsn, "SELECT id::text, revoked_at IS NOT NULL FROM refresh_families ORDER BY id"
        )
        assert [revoked for _, revoked in families] == [True, False]
        # The waiting events get ids in the order they were committed.
        order = rows(dsn, "SELECT user_id, seq FROM outbox ORDER BY id")
        assert order == [(2, 1), (4, 1), (2, 2)]
        # And new rows continue after them.
        rows(
            dsn,
            "INSERT INTO outbox (user_id, seq, kind, task_id, version, at)"
            " VALUES (4, 2, 'task.deleted', 2, 3, now())",
        )
        assert rows(dsn, "SELECT max(id) FROM outbox") == [(4,)]
        nullable = rows(
            dsn,
            "SELECT is_nullable FROM information_schema.columns"
            " WHERE table_name = 'users' AND column_name = 'username_key'",
        )
        assert nullable == [("NO",)]
        # 005: every existing login keeps working (tokens without `gen` are generation 0).
        assert rows(dsn, "SELECT DISTINCT token_generation FROM users") == [(0,)]
    finally:
        admin_execute(base, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
