"""Every SQL statement of the service. Functions take an aiopg cursor and return plain data.

Write paths lock the user's row first (taking the next event number), then the task row, so
two writers never deadlock; a write that ends up changing nothing rolls back, so the event
numbers stay dense (DESIGN.md, "Event ids").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2
from psycopg2 import errorcodes

from taskd.errors import NotFound, PreconditionFailed
from taskd.models import canonical_username

Cursor = Any  # aiopg.Cursor


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    email: str


@dataclass(frozen=True, slots=True)
class Credentials:
    user_id: int
    password_hash: bytes


@dataclass(frozen=True, slots=True)
class Task:
    id: int
    user_id: int
    title: str
    description: str
    done: bool
    created_at: datetime
    updated_at: datetime
    version: int


@dataclass(frozen=True, slots=True)
class TaskPage:
    count: int
    tasks: list[Task]
    event_seq: int  # the user's newest event number in the snapshot the rows came from


class UsernameTaken(Exception):
    """The username exists already (compared case-insensitively)."""


# --- users -----------------------------------------------------------------------------------

INSERT_USER = """
INSERT INTO users (username, username_key, email, password_hash) VALUES (%s, %s, %s, %s)
RETURNING id, username, email
"""
USERNAME_EXISTS = "SELECT 1 FROM users WHERE username_key = %s"
GET_USER = "SELECT id, username, email FROM users WHERE id = %s"
GET_CREDENTIALS = "SELECT id, password_hash FROM users WHERE username_key = %s"
# Only over the hash that was checked: a concurrent change of it wins.
UPDATE_PASSWORD_HASH = "UPDATE users SET password_hash = %s WHERE id = %s AND password_hash = %s"


async def username_exists(cur: Cursor, username: str) -> bool:
    await cur.execute(USERNAME_EXISTS, (canonical_username(username),))
    return bool(await cur.fetchone())


async def create_user(cur: Cursor, username: str, email: str, password_hash: bytes) -> User:
    """Insert an account; `UsernameTaken` when the name's canonical form is in use."""
    params = (username, canonical_username(username), email, password_hash.decode())
    try:
        await cur.execute(INSERT_USER, params)
    except psycopg2.IntegrityError as exc:
        if exc.pgcode == errorcodes.UNIQUE_VIOLATION:
            raise UsernameTaken(username) from None
        raise
    return User(*await cur.fetchone())


async def get_user(cur: Cursor, user_id: int) -> User | None:
    await cur.execute(GET_USER, (user_id,))
    row = await cur.fetchone()
    return User(*row) if row else None


async def get_credentials(cur: Cursor, username: str) -> Credentials | None:
    await cur.execute(GET_CREDENTIALS, (canonical_username(username),))
    row = await cur.fetchone()
    return Credentials(row[0], row[1].encode()) if row else None


async def update_password_hash(cur: Cursor, credentials: Credentials, new_hash: bytes) -> None:
    """Replace the hash just checked (e.g. at a new bcrypt cost); a no-op if it changed since."""
    params = (new_hash.decode(), credentials.user_id, credentials.password_hash.decode())
    await cur.execute(UPDATE_PASSWORD_HASH, params)


USERS_WITHOUT_KEY = "SELECT id, username FROM users WHERE username_key IS NULL ORDER BY id"
TAKEN_KEYS = "SELECT username_key FROM users WHERE username_key = ANY(%s)"
SET_USERNAME_KEYS = """
UPDATE users u SET username_key = k.key FROM unnest(%s::bigint[], %s::text[]) AS k(id, key)
WHERE u.id = k.id
"""
USERNAME_KEY_REQUIRED = "ALTER TABLE users ALTER COLUMN username_key SET NOT NULL"


async def backfill_username_keys(cur: Cursor) -> list[int]:
    """Migration 003: give every account its canonical username; return the ids that clash.

    Two old accounts may share a canonical form (`Straße` and `STRASSE` were distinct under
    `lower()`): the older keeps it, a newer one gets `<key>#<id>`, which no login can type
    (`#` is not a username character) until an operator renames one of them.
    """
    await cur.execute(USERS_WITHOUT_KEY)
    rows = await cur.fetchall()
    wanted = {user_id: canonical_username(name) for user_id, name in rows}
    await cur.execute(TAKEN_KEYS, (list(set(wanted.values())),))
    taken = {row[0] for row in await cur.fetchall()}
    clashes, keys = [], []
    for user_id, key in wanted.items():
        if key in taken:
            clashes.append(user_id)
            key = f"{key}#{user_id}"
        taken.add(key)
        keys.append(key)
    if wanted:
        await cur.execute(SET_USERNAME_KEYS, (list(wanted), keys))
    await cur.execute(USERNAME_KEY_REQUIRED)
    return clashes


# --- refresh tokens --------------------------------------------------------------------------

# A login also forgets the user's expired families and tokens, so the tables stay the size of
# the live logins (an expired token is refused by its `exp` before any lookup).
INSERT_REFRESH = """
WITH expired_families AS (
    DELETE FROM refresh_families WHERE user_id = %(user_id)s AND expires_at < now()
), expired_tokens AS (
    DELETE FROM refresh_tokens WHERE user_id = %(user_id)s AND expires_at < now()
), family AS (
    INSERT INTO refresh_families (id, user_id, expires_at)
    VALUES (%(family)s, %(user_id)s, now() + make_interval(secs => %(ttl)s))
    RETURNING id, user_id, expires_at
)
INSERT INTO refresh_tokens (jti, family, user_id, expires_at)
SELECT %(jti)s, id, user_id, expires_at FROM family
"""
# Consume the presented token and issue its successor in one statement. Of two concurrent
# refreshes with one token exactly one finds `used_at IS NULL`. The successor is issued only
# through an UPDATE of the family row that finds it unrevoked: that UPDATE waits for a
# concurrent revocation and re-checks after it, so rotation and revocation are serialised,
# and a family revoked at any point never gains a live token.
ROTATE_REFRESH = """
WITH consumed AS (
    UPDATE refresh_tokens SET used_at = now()
    WHERE jti = %(jti)s AND used_at IS NULL AND expires_at > now()
    RETURNING family
), family AS (
    UPDATE refresh_families f SET expires_at = now() + make_interval(secs => %(ttl)s)
    FROM consumed c
    WHERE f.id = c.family AND f.revoked_at IS NULL
    RETURNING f.id, f.user_id
)
INSERT INTO refresh_tokens (jti, family, user_id, expires_at)
SELECT %(new_jti)s, id, user_id, now() + make_interval(secs => %(ttl)s) FROM family
RETURNING user_id
"""
# A consumed token presented again is taken as theft: the whole family goes.
REVOKE_FAMILY_IF_REUSED = """
UPDATE refresh_families SET revoked_at = now()
WHERE id = (SELECT family FROM refresh_tokens WHERE jti = %s AND used_at IS NOT NULL)
  AND revoked_at IS NULL
"""
# Logout: revoke the family of a token that is still live; report whether it was.
REVOKE_FAMILY_OF_LIVE = """
UPDATE refresh_families f SET revoked_at = now()
FROM refresh_tokens t
WHERE t.jti = %s AND t.used_at IS NULL AND t.expires_at > now()
  AND f.id = t.family AND f.revoked_at IS NULL
RETURNING f.id
"""


async def insert_refresh(cur: Cursor, jti: uuid.UUID, user_id: int, ttl: int) -> None:
    """Record a new login's refresh token, the first of a new family."""
    params = {"jti": str(jti), "family": str(uuid.uuid4()), "user_id": user_id, "ttl": ttl}
    await cur.execute(INSERT_REFRESH, params)


async def rotate_refresh(cur: Cursor, jti: uuid.UUID, new_jti: uuid.UUID, ttl: int) -> int | None:
    """Consume `jti`, recording `new_jti` in its family; None if it was not live.

    A token presented after it was consumed revokes its whole family.
    """
    params = {"jti": str(jti), "new_jti": str(new_jti), "ttl": ttl}
    await cur.execute(ROTATE_REFRESH, params)
    row = await cur.fetchone()
    if row:
        return int(row[0])
    await cur.execute(REVOKE_FAMILY_IF_REUSED, (str(jti),))
    return None


async def revoke_family(cur: Cursor, jti: uuid.UUID) -> bool:
    """Logout: revoke the family of a live token. False (revoking on reuse) if it was not live."""
    await cur.execute(REVOKE_FAMILY_OF_LIVE, (str(jti),))
    if await cur.fetchall():
        return True
    await cur.execute(REVOKE_FAMILY_IF_REUSED, (str(jti),))
    return False


# --- tasks: reads ----------------------------------------------------------------------------

TASK_COLUMNS = "id, user_id, title, description, done, created_at, updated_at, version"
GET_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %s AND user_id = %s"

_FILTER = """
    user_id = %(user_id)s
    AND (%(done)s::boolean IS NULL OR done = %(done)s)
    AND (%(search)s::text IS NULL
         OR strpos(lower(title), lower(%(search)s)) > 0
         OR strpos(lower(description), lower(%(search)s)) > 0)
"""
# Ties are broken by id in the same direction; `title` orders case-insensitively.
_ORDER_BY = {
    "id": "{p}id ASC",
    "-id": "{p}id DESC",
    "created_at": "{p}created_at ASC, {p}id ASC",
    "-created_at": "{p}created_at DESC, {p}id DESC",
    "updated_at": "{p}updated_at ASC, {p}id ASC",
    "-updated_at": "{p}updated_at DESC, {p}id DESC",
    "title": "lower({p}title) ASC, {p}id ASC",
    "-title": "lower({p}title) DESC, {p}id DESC",
}
# One statement, so the count, the rows and the event position share one snapshot: a client
# that subscribes from `event_seq` gets exactly the changes the rows do not show.
_LIST_TASKS = """
SELECT head.event_seq, head.total, {page_columns}
FROM (SELECT (SELECT event_seq FROM users WHERE id = %(user_id)s) AS event_seq,
             (SELECT count(*) FROM tasks WHERE {filter}) AS total) AS head
LEFT JOIN LATERAL (
    SELECT {columns} FROM tasks WHERE {filter}
    ORDER BY {inner_order} LIMIT %(limit)s OFFSET %(offset)s
) AS page ON true
ORDER BY {outer_order}
"""
LIST_TASKS = {
    ordering: _LIST_TASKS.format(
        page_columns=", ".join(f"page.{c}" for c in TASK_COLUMNS.split(", ")),
        columns=TASK_COLUMNS,
        filter=_FILTER,
        inner_order=order.format(p=""),
        outer_order=order.format(p="page."),
    )
    for ordering, order in _ORDER_BY.items()
}


async def get_task(cur: Cursor, user_id: int, task_id: int) -> Task:
    """The user's task; `NotFound` when it is missing or someone else's."""
    await cur.execute(GET_TASK, (task_id, user_id))
    row = await cur.fetchone()
    if row is None:
        raise NotFound()
    return Task(*row)


async def list_tasks(
    cur: Cursor,
    user_id: int,
    *,
    limit: int,
    offset: int,
    done: bool | None,
    search: str | None,
    ordering: str,
) -> TaskPage:
    """One page of the user's tasks, the total count, and the stream position of the snapshot."""
    params = {
        "user_id": user_id,
        "done": done,
        "search": search,
        "limit": limit,
        "offset": offset,
    }
    await cur.execute(LIST_TASKS[ordering], params)
    rows = await cur.fetchall()
    event_seq, total = rows[0][0], rows[0][1]
    tasks = [Task(*row[2:]) for row in rows if row[2] is not None]
    return TaskPage(count=int(total), tasks=tasks, event_seq=int(event_seq or 0))


# --- tasks: writes (each with its outbox row, in one transaction) ----------------------------

NEXT_EVENT = """
UPDATE users SET event_seq = event_seq + 1 WHERE id = %s
RETURNING event_seq, clock_timestamp()
"""
LOCK_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %s AND user_id = %s FOR UPDATE"
_OUTBOX_FROM_ROW = """
INSERT INTO outbox (user_id, seq, kind, task_id, version, title, description, done,
                    created_at, updated_at, at)
SELECT user_id, %(seq)s, %(kind)s, id, version, title, description, done,
       created_at, updated_at, %(at)s FROM changed
"""
# Create needs no read first, so it is one statement: its own transaction in autocommit.
CREATE_TASK = f"""
WITH event AS (
    UPDATE users SET event_seq = event_seq + 1 WHERE id = %(user_id)s
    RETURNING event_seq, clock_timestamp() AS at
), changed AS (
    INSERT INTO tasks (user_id, title, description, done, created_at, updated_at, version)
    SELECT %(user_id)s, %(title)s, %(description)s, %(done)s, at, at, 1 FROM event
    RETURNING {TASK_COLUMNS}
), queued AS (
    INSERT INTO outbox (user_id, seq, kind, task_id, version, title, description, done,
                        created_at, updated_at, at)
    SELECT c.user_id, e.event_seq, 'task.created', c.id, c.version, c.title, c.description,
           c.done, c.created_at, c.updated_at, e.at
    FROM changed c, event e
)
SELECT {TASK_COLUMNS} FROM changed
"""
UPDATE_TASK = f"""
WITH changed AS (
    UPDATE tasks SET title = %(title)s, description = %(description)s, done = %(done)s,
                     version = version + 1, updated_at = %(at)s
    WHERE id = %(task_id)s
    RETURNING {TASK_COLUMNS}
), queued AS ({_OUTBOX_FROM_ROW})
SELECT {TASK_COLUMNS} FROM changed
"""
DELETE_TASK = (
    """
WITH changed AS (
    DELETE FROM tasks WHERE id = %(task_id)s
    RETURNING id, user_id, version + 1 AS version, NULL::varchar AS title,
              NULL::text AS description, NULL::boolean AS done,
              NULL::timestamptz AS created_at, NULL::timestamptz AS updated_at
)
"""
    + _OUTBOX_FROM_ROW
)


class _NoChange(Exception):
    """Roll the transaction back (returning the sequence number) and answer with the task."""

    def __init__(self, task: Task) -> None:
        self.task = task


def _check_version(task: Task, if_match: set[int] | None) -> None:
    """`If-Match` as parsed by the view: None = absent or `*`; a set of acceptable versions."""
    if if_match is not None and task.version not in if_match:
        raise PreconditionFailed()


async def create_task(
    cur: Cursor, user_id: int, *, title: str, description: str, done: bool
) -> Task | None:
    """Insert a task and its `task.created` event; None if the user no longer exists."""
    params = {"user_id": user_id, "title": title, "description": description, "done": done}
    await cur.execute(CREATE_TASK, params)
    row = await cur.fetchone()
    return Task(*row) if row else None


async def _lock(cur: Cursor, user_id: int, task_id: int) -> tuple[int, datetime, Task]:
    """Take the user's next event number (locking its row), then lock the task."""
    await cur.execute(NEXT_EVENT, (user_id,))
    seq_row = await cur.fetchone()
    await cur.execute(LOCK_TASK, (task_id, user_id))
    row = await cur.fetchone()
    if seq_row is None or row is None:
        raise NotFound()
    return int(seq_row[0]), seq_row[1], Task(*row)


async def update_task(
    cur: Cursor,
    user_id: int,
    task_id: int,
    changes: dict[str, Any],
    if_match: set[int] | None,
) -> tuple[Task, bool]:
    """Apply `changes` (title/description/done); return the task and whether it changed."""
    try:
        async with cur.begin():
            seq, at, task = await _lock(cur, user_id, task_id)
            _check_version(task, if_match)
            merged = {
                "title": changes.get("title", task.title),
                "description": changes.get("description", task.description),
                "done": changes.get("done", task.done),
            }
            if (merged["title"], merged["description"], merged["done"]) == (
                task.title,
                task.description,
                task.done,
            ):
                raise _NoChange(task)
            params = {**merged, "task_id": task_id, "seq": seq, "kind": "task.updated", "at": at}
            await cur.execute(UPDATE_TASK, params)
            return Task(*await cur.fetchone()), True
    except _NoChange as unchanged:
        return unchanged.task, False


async def delete_task(cur: Cursor, user_id: int, task_id: int, if_match: set[int] | None) -> None:
    """Delete the task and queue its `task.deleted` event."""
    async with cur.begin():
        seq, at, task = await _lock(cur, user_id, task_id)
        _check_version(task, if_match)
        params = {"task_id": task_id, "seq": seq, "kind": "task.deleted", "at": at}
        await cur.execute(DELETE_TASK, params)


# --- outbox and stream positions (the relay and the hub) -------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    user_id: int
    seq: int
    kind: str
    task_id: int
    version: int
    task: Task | None  # None for task.deleted
    at: datetime


@dataclass(frozen=True, slots=True)
class StreamState:
    committed: int  # the user's newest committed event number
    pending_from: int | None  # the oldest event still waiting in the outbox, if any


# Whatever is there, oldest first: never "ids above the last one seen", since a row can commit
# after a row with a higher id was read (DESIGN.md, pitfalls). `id` is taken at insert, after
# the user's row lock, so one user's rows come in `seq` order, and one user's backlog does not
# hold back everyone else's.
FETCH_OUTBOX = """
SELECT user_id, seq, kind, task_id, version, title, description, done, created_at, updated_at, at
FROM outbox WHERE NOT (user_id = ANY(%s::bigint[])) ORDER BY id LIMIT %s
"""
DELETE_OUTBOX = """
DELETE FROM outbox o USING unnest(%s::bigint[], %s::bigint[]) AS d(user_id, seq)
WHERE o.user_id = d.user_id AND o.seq = d.seq
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


async def delete_outbox(cur: Cursor, published: list[tuple[int, int]]) -> None:
    """Forget published events, by (user_id, seq)."""
    users, seqs = [p[0] for p in published], [p[1] for p in published]
    await cur.execute(DELETE_OUTBOX, (users, seqs))


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


@dataclass(frozen=True, slots=True)
class Backlog:
    count: int  # at most BACKLOG_COUNT_CAP
    oldest_age: float  # seconds; 0 when empty


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
