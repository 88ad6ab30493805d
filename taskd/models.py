"""Plain data and rules that several layers share; nothing here does I/O."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime


def canonical_username(username: str) -> str:
    """The one form in which two usernames are compared: NFKC, case-folded, NFKC again.

    Registration's uniqueness, login's lookup and the per-username throttle all use it, so
    no spelling of a name (`TIMO`, the fullwidth `timo`, `Straße`/`STRASSE`) reaches the
    same account through another door. It is computed here, never in SQL: Postgres' `lower()`
    depends on the database's locale and folds differently (`İ`).
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold())


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    email: str


@dataclass(frozen=True, slots=True)
class Credentials:
    user_id: int
    username: str
    password_hash: bytes
    token_generation: int  # access tokens of an older generation are refused


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """Who a rotated refresh token belongs to, and the generation its access token gets."""

    user_id: int
    token_generation: int


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
class TaskListing:
    count: int
    tasks: list[Task]
    event_seq: int  # the user's newest event number in the snapshot the rows came from


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


@dataclass(frozen=True, slots=True)
class KeyedRequest:
    """A task write sent with an Idempotency-Key: the key, scoped to its user, and what the
    request was (a digest of its method, path and body)."""

    user_id: int
    key: str
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """A write's answer as recorded for its Idempotency-Key, to be replayed as it was."""

    status: int
    body: str | None  # JSON text; None for a 204
    etag: str | None
    location: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a write answered, and whether it changed anything (an event to announce)."""

    answer: Answer
    changed: bool


@dataclass(frozen=True, slots=True)
class Backlog:
    count: int  # at most BACKLOG_COUNT_CAP
    oldest_age: float  # seconds; 0 when empty
