"""Every route once: method, path, handler, who may call it, body, replies and error statuses.

`app.add_routes` registers this table and `openapi.build_document` describes it: a path is
written here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp.typedefs import Handler
from pydantic import BaseModel

from taskd import responses, schemas
from taskd.views import accounts, live, ops, tasks, web

Schema = dict[str, Any]
Model = type[BaseModel]
# Anyone; an access token in `Authorization`; or that, or `?token=` (EventSource and browser
# WebSockets cannot send headers).
Auth = Literal["public", "bearer", "bearer or query"]
JSON = "application/json"
STRING: Schema = {"type": "string"}


@dataclass(frozen=True)
class Param:
    """A query, header or path parameter of the document (the handler reads it itself)."""

    name: str
    where: Literal["query", "header", "path"]
    schema: Schema
    description: str
    required: bool = False


@dataclass(frozen=True)
class Reply:
    """One response: a JSON body of `model`, or `schema` as `media`, or no body.

    `headers` maps a wire name to a header of the document's components (by name) or to an
    inline header object. `extension` names the models of what travels inside a live
    connection (`x-...`: in the media type when there is a body, else in the response).
    """

    description: str
    model: Model | None = None
    schema: Schema | None = None
    media: str = JSON
    headers: Mapping[str, str | Schema] = field(default_factory=dict)
    extension: tuple[str, tuple[Model, ...]] | None = None


@dataclass(frozen=True)
class Route:
    """One method on one path; `errors` are API.md's error rows it can answer."""

    method: str
    path: str
    handler: Handler
    op_id: str
    summary: str
    tag: str
    replies: Mapping[int, Reply]
    errors: tuple[int, ...] = ()
    auth: Auth = "bearer"
    body: Model | None = None
    params: tuple[Param, ...] = ()
    head: bool = True  # a GET also answers HEAD; not the live ones, which would open a stream


# Error sets that several routes share.
AUTH_ERRORS = (401, 503)
BODY_ERRORS = (400, 401, 413, 503)
WRITE_ERRORS = (400, 401, 404, 412, 413, 503)

# Headers, by component name (see `openapi.HEADERS`).
NO_STORE = {"Cache-Control": "NoStore"}
ETAG = {"ETag": "ETag"}

# A placeholder `{name}` in a path is described once, here.
PATH_PARAMETERS = {
    "id": Param(
        "id",
        "path",
        {"type": "integer", "minimum": 1, "maximum": schemas.BIGINT_MAX},
        "The task's id; anything that is not one of your tasks' ids is a 404.",
        required=True,
    ),
    "asset": Param("asset", "path", {"enum": list(web.ASSETS)}, "A client file.", required=True),
}
LIST_PARAMETERS = (
    Param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "default": schemas.LIST_LIMIT_DEFAULT},
        f"Page size; above {schemas.LIST_LIMIT_MAX} it is clamped to {schemas.LIST_LIMIT_MAX}.",
    ),
    Param("offset", "query", {"type": "integer", "minimum": 0, "default": 0}, "Rows to skip."),
    Param("done", "query", {"type": "boolean"}, "Only done (or only open) tasks."),
    Param(
        "search",
        "query",
        STRING,
        "A literal substring of the title or description, case-insensitively.",
    ),
    Param(
        "ordering",
        "query",
        {
            "type": "string",
            "enum": [f"{sign}{key}" for key in schemas.ORDERINGS for sign in ("", "-")],
            "default": "-created_at",
        },
        "Sort key, `-` for descending; `title` case-insensitively; ties broken by `id`.",
    ),
)
IF_MATCH = Param(
    "If-Match",
    "header",
    STRING,
    'Change only if the task is at this version (`"<version>"`, or `*`); else 412.',
)
IF_NONE_MATCH = Param(
    "If-None-Match",
    "header",
    STRING,
    "304 when it names the current version (weak comparison) or is `*`.",
)
RESUME_QUERY = Param(
    "last_event_id",
    "query",
    {"type": "string", "examples": ["0-0", "42-0"]},
    "Resume after this event id (a first connect from a browser); malformed means a reset.",
)
LAST_EVENT_ID = Param(
    "Last-Event-ID",
    "header",
    {"type": "string", "examples": ["42-0"]},
    "Resume after this event id (wins over `last_event_id`).",
)
UPGRADE = Param("Upgrade", "header", {"type": "string", "const": "websocket"}, "", required=True)
ORIGIN = Param(
    "Origin", "header", STRING, "Browsers only: must be the service's own origin or allow-listed."
)

TOKENS = Reply("A new access and refresh token.", responses.TokenPair, headers=NO_STORE)
UPDATED = Reply("The task as it now is.", responses.TaskOut, headers=ETAG)
MESSAGES = (responses.Event, responses.Reset, responses.Reauth)
SSE = Reply(
    "Server-Sent Events: a `retry:` line, then `id:`/`event:`/`data:` per event (`event` is"
    " the event's type, `reset` or `reauth`), `: ping` at least every 15 s. `x-event-data` is"
    " the schema of each `data:` line.",
    schema=STRING,
    media="text/event-stream",
    headers={
        "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
        "X-Accel-Buffering": {"schema": {"type": "string", "const": "no"}},
    },
    extension=("x-event-data", MESSAGES),
)
WEBSOCKET = Reply(
    "Switching to WebSocket: each event is one text frame (`x-frames`); the client may send"
    ' `{"type": "ping"}`.',
    extension=("x-frames", (*MESSAGES, responses.Pong, responses.SocketError)),
)
# The web client: a page whose headers forbid inline script, and its files (`views.web`).
PAGE = Reply("The web client.", schema=STRING, media="text/html")
ASSET = {
    200: Reply("The file (JavaScript, CSS or an image).", schema=STRING, media="*/*"),
    404: Reply("No such file.", responses.ErrorDetail),
}
RETRY_WHILE_DRAINING: Schema = {
    "description": "While draining.",
    "schema": {"type": "integer", "minimum": 0},
}

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/api/register/",
        accounts.register,
        "register",
        "Create an account",
        "auth",
        {201: Reply("The new user.", responses.UserOut)},
        (400, 413, 429, 503),
        auth="public",
        body=schemas.Register,
    ),
    Route(
        "POST",
        "/api/login/",
        accounts.login,
        "login",
        "Log in",
        "auth",
        {200: TOKENS},
        (400, 401, 413, 429, 503),
        auth="public",
        body=schemas.Login,
    ),
    Route(
        "POST",
        "/api/token/refresh/",
        accounts.refresh,
        "refreshToken",
        "Rotate a refresh token (the one sent is consumed)",
        "auth",
        {200: TOKENS},
        BODY_ERRORS,
        auth="public",
        body=schemas.RefreshIn,
    ),
    Route(
        "POST",
        "/api/logout/",
        accounts.logout,
        "logout",
        "Revoke the refresh token's whole family",
        "auth",
        {204: Reply("Logged out.", headers=NO_STORE)},
        BODY_ERRORS,
        auth="public",
        body=schemas.RefreshIn,
    ),
    Route(
        "GET",
        "/api/me/",
        accounts.me,
        "me",
        "The current user",
        "auth",
        {200: Reply("You.", responses.UserOut)},
        AUTH_ERRORS,
    ),
    Route(
        "GET",
        "/api/tasks/",
        tasks.list_tasks,
        "listTasks",
        "List your tasks",
        "tasks",
        {
            200: Reply(
                "A page of tasks.",
                responses.TaskPage,
                headers={"X-Stream-Position": "StreamPosition"},
            )
        },
        (400, 401, 503),
        params=LIST_PARAMETERS,
    ),
    Route(
        "POST",
        "/api/tasks/",
        tasks.create_task,
        "createTask",
        "Create a task",
        "tasks",
        {201: Reply("The new task.", responses.TaskOut, headers={**ETAG, "Location": "Location"})},
        BODY_ERRORS,
        body=schemas.TaskCreate,
    ),
    Route(
        "GET",
        "/api/tasks/{id}/",
        tasks.get_task,
        "getTask",
        "Read a task",
        "tasks",
        {
            200: Reply("The task.", responses.TaskOut, headers=ETAG),
            304: Reply("`If-None-Match` names the current version.", headers=ETAG),
        },
        (401, 404, 503),
        params=(IF_NONE_MATCH,),
    ),
    Route(
        "PUT",
        "/api/tasks/{id}/",
        tasks.put_task,
        "putTask",
        "Replace a task's fields (an omitted optional field keeps its value)",
        "tasks",
        {200: UPDATED},
        WRITE_ERRORS,
        body=schemas.TaskPut,
        params=(IF_MATCH,),
    ),
    Route(
        "PATCH",
        "/api/tasks/{id}/",
        tasks.patch_task,
        "patchTask",
        "Change some of a task's fields",
        "tasks",
        {200: UPDATED},
        WRITE_ERRORS,
        body=schemas.TaskPatch,
        params=(IF_MATCH,),
    ),
    Route(
        "DELETE",
        "/api/tasks/{id}/",
        tasks.delete_task,
        "deleteTask",
        "Delete a task",
        "tasks",
        {204: Reply("Deleted.")},
        (401, 404, 412, 503),
        params=(IF_MATCH,),
    ),
    Route(
        "GET",
        "/api/stream/",
        live.sse,
        "stream",
        "Live events (SSE)",
        "live",
        {200: SSE},
        AUTH_ERRORS,
        auth="bearer or query",
        params=(LAST_EVENT_ID, RESUME_QUERY),
        head=False,
    ),
    Route(
        "GET",
        "/api/ws/",
        live.ws,
        "websocket",
        "Live events (WebSocket)",
        "live",
        {
            101: WEBSOCKET,
            400: Reply("Not a WebSocket handshake.", responses.ErrorDetail),
            403: Reply("A cross-site `Origin`.", responses.ErrorDetail),
        },
        AUTH_ERRORS,
        auth="bearer or query",
        params=(UPGRADE, ORIGIN, RESUME_QUERY),
        head=False,
    ),
    Route(
        "GET",
        "/healthz",
        ops.healthz,
        "healthz",
        "Liveness",
        "ops",
        {200: Reply("Running.", responses.Health)},
        auth="public",
    ),
    Route(
        "GET",
        "/readyz",
        ops.readyz,
        "readyz",
        "Readiness",
        "ops",
        {
            200: Reply("Postgres and Redis answer.", responses.Readiness),
            503: Reply(
                "A dependency is down, or the process is draining.",
                responses.Readiness,
                headers={"Retry-After": RETRY_WHILE_DRAINING},
            ),
        },
        auth="public",
    ),
    Route(
        "GET",
        "/api/openapi.json",
        ops.openapi_json,
        "openapi",
        "This document",
        "ops",
        {200: Reply("OpenAPI 3.1.", schema={"type": "object"})},
        auth="public",
    ),
    Route(
        "GET",
        "/metrics",
        ops.metrics,
        "metrics",
        "Prometheus metrics",
        "ops",
        {200: Reply("Prometheus text format.", schema=STRING, media="text/plain")},
        auth="public",
    ),
    Route("GET", "/", web.page, "webClient", "The web client", "web", {200: PAGE}, auth="public"),
    Route("GET", "/static/{asset}", web.asset, "webFile", "A file", "web", ASSET, auth="public"),
)
