"""The outbox and the stream positions: what the relay publishes and the feeds check."""

from __future__ import annotations

from taskd.models import Backlog, OutboxEvent, StreamState, Task
from taskd.store.cursor import Cursor

# --- outbox and stream positions (the relay and the hub) -------------------------------------


# Whatever is there, oldest first: never "ids above the last one seen", since a row can commit
# after a row with a higher id was read (DESIGN.md, pitfalls). `id` is taken at insert, after
# the user's row lock, so one user's rows come in `seq` order, and one user's backlog does not
# hold back everyone else's.
FETCH_OUTBOX = """
SELECT user_id, seq, kind, task_id, version, title, description, done, created_at, updated_at, at
FROM outbox WHERE NOT (user_id = ANY(%s::bigint[])) ORDER BY id LIMIT %s
"""
# ... and name the users among them whose account is gone: deleted while the relay published
# their last events, which created their stream again (the relay deletes it).
DELETE_OUTBOX = """
WITH published AS (
    DELETE FROM outbox o
    USING unnest(%(users)s::bigint[], %(seqs)s::bigint[]) AS d(user_id, seq)
    WHERE o.user_id = d.user_id AND o.seq = d.seq
)
SELECT DISTINCT d.user_id FROM unnest(%(users)s::bigint[]) AS d(user_id)
WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = d.user_id)
"""
STREAM_STATE = """
SELECT u.event_seq, (SELECT min(seq) FROM outbox o WHERE o.user_id = u.id)
FROM users u WHERE u.id = %s
"""


async def fetch_outbox(cur: Cursor, limit: int, skip_users: list[int]) -> list[OutboxEvent]:
    """The oldest unpublished events, in (user, seq) order, leaving out `skip_users`."""
    await cur.execute(FETCH_OUTBOX, (skip_users, limit))
    events = []
    for (
        user_id,
        seq,
        kind,
        task_id,
        version,
        title,
        desc,
        done,
        created,
        updated,
        at,
    ) in await cur.fetchall():
        task = (
            None
            if kind == "task.deleted"
            else Task(task_id, user_id, title, desc, done, created, updated, version)
        )
        events.append(OutboxEvent(user_id, seq, kind, task_id, version, task, at))
    return events


async def delete_outbox(cur: Cursor, published: list[tuple[int, int]]) -> list[int]:
    """Forget published events, by (user_id, seq); return the users of them that are gone."""
    users, seqs = [p[0] for p in published], [p[1] for p in published]
    await cur.execute(DELETE_OUTBOX, {"users": users, "seqs": seqs})
    return [int(row[0]) for row in await cur.fetchall()]


LEADER_LOCK = 7_243_002  # advisory lock key: one relay leader per database
TRY_LEAD = "SELECT pg_try_advisory_lock(%s)"


async def try_lead(cur: Cursor) -> bool:
    """Take the relay leader's lock on this session if nobody holds it; whether we hold it."""
    await cur.execute(TRY_LEAD, (LEADER_LOCK,))
    return bool((await cur.fetchone())[0])


LOCK_USER_SEQ = "SELECT event_seq FROM users WHERE id = %s FOR UPDATE"
FIRST_PENDING = "SELECT min(seq) FROM outbox WHERE user_id = %s"
# In two steps, through negative numbers: shifting in place would collide with the primary key.
SHIFT_PENDING = (
    "UPDATE outbox SET seq = -(seq + %(shift)s) WHERE user_id = %(user_id)s",
    "UPDATE outbox SET seq = -seq WHERE user_id = %(user_id)s AND seq < 0",
    "UPDATE users SET event_seq = event_seq + %(shift)s WHERE id = %(user_id)s",
)


async def renumber_pending(cur: Cursor, user_id: int, first: int) -> int:
    """Move the user's unpublished events (and sequence) up so the oldest becomes `first`;
    return the shift (0 when nothing was pending or nothing needed moving).

    For a sequence that fell behind what Redis holds (a restored database, a failover to a
    lagging standby): event ids must never be reused, so new events go above the old ones.
    The user's row lock holds writers back meanwhile.
    """
    async with cur.begin():
        await cur.execute(LOCK_USER_SEQ, (user_id,))
        await cur.execute(FIRST_PENDING, (user_id,))
        row = await cur.fetchone()
        if row is None or row[0] is None or first <= row[0]:
            return 0
        shift = first - int(row[0])
        for statement in SHIFT_PENDING:
            await cur.execute(statement, {"shift": shift, "user_id": user_id})
        return shift


async def stream_state(cur: Cursor, user_id: int) -> StreamState:
    """Where the user's event sequence stands in Postgres (one primary-key read)."""
    await cur.execute(STREAM_STATE, (user_id,))
    row = await cur.fetchone()
    if row is None:
        return StreamState(0, None)
    return StreamState(int(row[0]), None if row[1] is None else int(row[1]))


BACKLOG_COUNT_CAP = 10_000
# Cheap enough for every scrape whatever the backlog: a capped index count and one index probe.
OUTBOX_BACKLOG = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT %s) AS capped),
       coalesce(extract(epoch FROM clock_timestamp()
                        - (SELECT at FROM outbox ORDER BY id LIMIT 1)), 0)
"""


async def outbox_backlog(cur: Cursor) -> Backlog:
    """How much the relay has yet to publish (for /metrics), counted up to a cap."""
    await cur.execute(OUTBOX_BACKLOG, (BACKLOG_COUNT_CAP,))
    count, age = await cur.fetchone()
    return Backlog(int(count), float(age))


async def ping(cur: Cursor) -> None:
    """A round trip that touches nothing (readiness)."""
    await cur.execute("SELECT 1")
