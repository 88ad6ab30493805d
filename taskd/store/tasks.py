"""Tasks: reads, and writes that queue their event in the same transaction.

Write paths lock the user's row first (taking the next event number), then the task row, so
two writers never deadlock; a write that ends up changing nothing rolls back, so the event
numbers stay dense (DESIGN.md, "Event ids").
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from taskd.errors import NotFound, PreconditionFailed
from taskd.models import Task, TaskListing
from taskd.store.cursor import Cursor

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


STREAM_POSITION = "SELECT event_seq FROM users WHERE id = %s"


async def stream_position(cur: Cursor, user_id: int) -> int | None:
    """The user's newest event number (one primary-key read); None when the user is gone."""
    await cur.execute(STREAM_POSITION, (user_id,))
    row = await cur.fetchone()
    return int(row[0]) if row else None


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
) -> TaskListing:
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
    return TaskListing(count=int(total), tasks=tasks, event_seq=int(event_seq or 0))


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


async def _update(
    cur: Cursor, user_id: int, task_id: int, changes: dict[str, Any], if_match: set[int] | None
) -> Task:
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
    return Task(*await cur.fetchone())


# Inside a caller's transaction (a keyed write) a no-op gives its event number back by rolling
# back to here, and the transaction goes on to record the answer.
SAVEPOINT = "SAVEPOINT task_change"
ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO SAVEPOINT task_change"


async def update_task(
    cur: Cursor,
    user_id: int,
    task_id: int,
    changes: dict[str, Any],
    if_match: set[int] | None,
    *,
    nested: bool = False,
) -> tuple[Task, bool]:
    """Apply `changes` (title/description/done); return the task and whether it changed.
    `nested`: in the caller's transaction rather than one of its own."""
    try:
        if nested:
            await cur.execute(SAVEPOINT)
            try:
                return await _update(cur, user_id, task_id, changes, if_match), True
            except _NoChange:
                await cur.execute(ROLLBACK_TO_SAVEPOINT)
                raise
        async with cur.begin():
            return await _update(cur, user_id, task_id, changes, if_match), True
    except _NoChange as unchanged:
        return unchanged.task, False


async def delete_task(
    cur: Cursor, user_id: int, task_id: int, if_match: set[int] | None, *, nested: bool = False
) -> None:
    """Delete the task and queue its `task.deleted` event (`nested`: see `update_task`)."""
    if nested:
        await _delete(cur, user_id, task_id, if_match)
        return
    async with cur.begin():
        await _delete(cur, user_id, task_id, if_match)


async def _delete(cur: Cursor, user_id: int, task_id: int, if_match: set[int] | None) -> None:
    seq, at, task = await _lock(cur, user_id, task_id)
    _check_version(task, if_match)
    params = {"task_id": task_id, "seq": seq, "kind": "task.deleted", "at": at}
    await cur.execute(DELETE_TASK, params)
