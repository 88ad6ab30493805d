"""Response bodies: built by hand on the fast path (`task_body`, `user_body`), and described
by pydantic models that are the source of the OpenAPI document (tests check the one against
the other)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from taskd.models import Task, User
from taskd.schemas import (
    BIGINT_MAX,
    EVENT_ID_PATTERN,
    JWT_PATTERN,
    TIMESTAMP_PATTERN,
    Description,
    SchemaHint,
    Title,
    Username,
)


def timestamp(value: datetime) -> str:
    """UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (isoformat: a tenth of strftime's cost)."""
    if value.utcoffset():
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def task_body(task: Task) -> dict[str, Any]:
    """A task as API.md gives it."""
    return {
        "id": task.id,
        "user": task.user_id,
        "title": task.title,
        "description": task.description,
        "done": task.done,
        "created_at": timestamp(task.created_at),
        "updated_at": timestamp(task.updated_at),
        "version": task.version,
    }


def user_body(user: User) -> dict[str, Any]:
    return {"id": user.id, "username": user.username, "email": user.email}


# Response models: the source of the OpenAPI document. Handlers build bodies with `task_body` and
# `user_body` (the fast path); tests check those bodies against these schemas.


class _Out(BaseModel):
    # Forbidding extras makes the document say `additionalProperties: false`: a field the
    # service starts sending without documenting it fails the conformance test.
    model_config = ConfigDict(extra="forbid", frozen=True)


Id = Annotated[int, Field(ge=1, le=BIGINT_MAX)]
Timestamp = Annotated[str, Field(pattern=TIMESTAMP_PATTERN, description="UTC, microseconds.")]
EventId = Annotated[str, Field(pattern=EVENT_ID_PATTERN)]


class TaskOut(_Out):
    id: Id
    user: Annotated[int, Field(ge=1, le=BIGINT_MAX, description="The owner's id.")]
    title: Title
    description: Description
    done: bool
    created_at: Timestamp
    updated_at: Timestamp
    version: Annotated[int, Field(ge=1, description="1 at creation, +1 on every change.")]


class TaskPage(_Out):
    """DRF limit/offset pagination."""

    count: Annotated[int, Field(ge=0)]
    next: Annotated[str, SchemaHint(format="uri")] | None
    previous: Annotated[str, SchemaHint(format="uri")] | None
    results: list[TaskOut]


class UserOut(_Out):
    id: Id
    username: Username
    email: Annotated[str, Field(description='"" when none was given.')]


class TokenPair(_Out):
    access: Annotated[str, Field(pattern=JWT_PATTERN)]
    refresh: Annotated[str, Field(pattern=JWT_PATTERN)]


class ErrorDetail(_Out):
    detail: str
    code: Annotated[str, Field(examples=["not_found", "token_not_valid", "throttled"])]


class FieldErrors(RootModel[dict[str, list[str]]]):
    """400: messages per field; a problem not tied to one field is under `non_field_errors`."""

    root: Annotated[
        dict[str, Annotated[list[str], Field(min_length=1)]],
        Field(min_length=1, examples=[{"title": ["This field is required."]}]),
    ]


class DeletedTask(_Out):
    id: Id
    version: Annotated[int, Field(ge=2, description="The task's last version plus one.")]


class Event(_Out):
    """One committed change, on SSE (`data:`) and WebSocket (a text frame)."""

    id: EventId
    type: Literal["task.created", "task.updated", "task.deleted"]
    task: TaskOut | DeletedTask
    at: Timestamp


class Reset(_Out):
    """The resume id could not be honoured: re-read the list, then continue from `position`."""

    type: Literal["reset"]
    reason: Literal["trimmed", "malformed", "ahead"]
    position: EventId


class Reauth(_Out):
    """The access token expired: reconnect with a fresh one and the last event id."""

    type: Literal["reauth"]


class Pong(_Out):
    type: Literal["pong"]


class SocketError(_Out):
    type: Literal["error"]
    detail: str


class Health(_Out):
    status: Literal["ok"]


class Readiness(_Out):
    status: Literal["ok", "unavailable", "draining"]
    checks: Annotated[
        dict[Literal["postgres", "redis", "live"], bool],
        Field(
            description="Which dependency answers (`live`: this replica's hub hears every"
            " Redis master); empty while draining."
        ),
    ]
