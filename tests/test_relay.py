"""The relay: commit order across users, and never an event id reused after the database
fell behind Redis (a restore, a failover to a lagging standby)."""

from __future__ import annotations

import json

import aiopg
import psycopg2

from taskd import store
from taskd.app import create_app
from taskd.config import Settings
from taskd.streams import RedisKeys
from tests.conftest import ClientFactory, SettingsFactory, register_and_login
from tests.live import raw_redis


def execute(dsn: str, statement: str, params: tuple[object, ...] = ()) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
    finally:
        conn.close()


def queue_event(dsn: str, user_id: int) -> None:
    """Commit a change's outbox row as a write does, without a relay to publish it."""
    execute(
        dsn,
        """
        WITH e AS (UPDATE users SET event_seq = event_seq + 1 WHERE id = %s
                   RETURNING id, event_seq, clock_timestamp() AS at)
        INSERT INTO outbox (user_id, seq, kind, task_id, version, at)
        SELECT id, event_seq, 'task.deleted', 1, 2, at FROM e
        """,
        (user_id,),
    )


async def test_the_outbox_is_read_in_commit_order(database_dsn: str, settings: Settings) -> None:
    """One user's backlog does not hold back a user with a higher id who wrote first."""
    execute(
        database_dsn,
        "INSERT INTO users (username, username_key, password_hash) VALUES"
        " ('low', 'low', 'x'), ('high', 'high', 'x')",
    )
    conn = psycopg2.connect(database_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM users ORDER BY id")
        low, high = (row[0] for row in cur.fetchall())
    conn.close()
    queue_event(database_dsn, high)
    for _ in range(5):
        queue_event(database_dsn, low)
    queue_event(database_dsn, high)
    async with aiopg.connect(database_dsn) as pg, pg.cursor() as cur:
        batch = await store.fetch_outbox(cur, 3, [])
    assert [(e.user_id, e.seq) for e in batch] == [(high, 1), (low, 1), (low, 2)]


async def test_a_sequence_behind_redis_never_reuses_an_id(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, database_dsn: str
) -> None:
    settings = make_settings()
    client = await aiohttp_client(create_app(settings))
    user = await register_and_login(client, "restored")
    async with user.sse() as stream:
        for i in range(5):
            await user.create_task(f"before{i}")
        before = await stream.take(5)
        assert [e.id for e in before] == ["1-0", "2-0", "3-0", "4-0", "5-0"]
        # The database goes back in time (restored from a backup taken after event 2);
        # Redis still holds 1-0 .. 5-0.
        execute(database_dsn, "UPDATE users SET event_seq = 2 WHERE id = %s", (user.id,))
        for i in range(4):
            await user.create_task(f"after{i}")
        # The subscriber at 5-0 must not take a new change for "6-0" and carry on as if
        # nothing happened: it is told to re-read.
        items = await stream.take(1)
        while items[-1].event != "reset":
            items += await stream.take(1)
    async with raw_redis(settings) as redis:
        entries = await redis.xrange(RedisKeys(settings.redis.namespace).events(user.id))
    held = {
        int(entry_id.split(b"-")[0]): json.loads(fields[b"data"]) for entry_id, fields in entries
    }
    # The old events are untouched, every entry is the event its id names, ...
    assert [held[n] for n in range(1, 6)] == [e.json for e in before]
    assert all(event["id"] == f"{n}-0" for n, event in held.items())
    # ... every new change is there under a new id, and one id above the old ones is left
    # unused, so that every subscriber of the old history meets a gap and resets.
    newer = sorted(n for n in held if n > 5)
    assert {held[n]["task"]["title"] for n in newer} == {f"after{i}" for i in range(4)}
    assert newer != list(range(6, 6 + len(newer)))
