"""The OpenAPI 3.1 document of API.md, its schemas generated from the models in `schemas`."""

from __future__ import annotations

import functools
import json
from importlib import metadata
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from taskd import schemas
from taskd.auth import public
from taskd.schemas import (
    EVENT_ID_PATTERN,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    ORDERINGS,
    ErrorDetail,
    FieldErrors,
)

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
JSON = "application/json"
Schema = dict[str, Any]

BEARER: list[dict[str, list[str]]] = [{"bearerAuth": []}]
BEARER_OR_QUERY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"queryToken": []}]
PUBLIC: list[dict[str, list[str]]] = []

SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token from `POST /api/login/` or `/api/token/refresh/`.",
    },
    "queryToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "The access token in `?token=`, for browsers' EventSource and WebSocket.",
    },
}

HEADERS: dict[str, Schema] = {
    "ETag": {
        "description": 'The task\'s version as a strong entity tag: `"<version>"`.',
        "required": True,
        "schema": {"type": "string", "pattern": '^"[1-9][0-9]*"$'},
    },
    "Location": {
        "description": "The new task's absolute URL.",
        "required": True,
        "schema": {"type": "string", "format": "uri"},
    },
    "NoStore": {
        "description": "Responses that carry tokens are never cached.",
        "required": True,
        "schema": {"type": "string", "const": "no-store"},
    },
    "StreamPosition": {
        "description": "This user's newest event id as of the list's snapshot (`0-0` if none):"
        " subscribe with it as Last-Event-ID to get every later change.",
        "required": True,
        "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
    },
    "WWWAuthenticate": {
        "required": True,
        "schema": {"type": "string", "pattern": "^Bearer "},
    },
    "RetryAfter": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    "Allow": {
        "description": "The methods this path takes.",
        "required": True,
        "schema": {"type": "string"},
    },
}


def _header(name: str) -> Schema:
    return {"$ref": f"#/components/headers/{name}"}


def _response(description: str, schema: Schema, **headers: str) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {wire: _header(name) for wire, name in headers.items()}
    return response


class _Builder:
    """Collects the component schemas of the models the paths refer to."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}

    def ref(self, model: type[BaseModel]) -> Schema:
        """A `$ref` to the model's generated schema, adding it (and its `$defs`) to components."""
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            self.schemas.setdefault(name, sub)
        self.schemas[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}

    def json(self, model: type[BaseModel], description: str, **headers: str) -> Schema:
        """A JSON response of the model, with headers named `wire name -> component`."""
        return _response(description, self.ref(model), **headers)

    def body(self, model: type[BaseModel]) -> Schema:
        return {"required": True, "content": {JSON: {"schema": self.ref(model)}}}

    def responses(self) -> dict[str, Schema]:
        """API.md's error rows."""
        detail = self.ref(ErrorDetail)
        return {
            "BadRequest": _response("Field errors.", self.ref(FieldErrors)),
            "Unauthorized": _response(
                "No, bad, expired or wrong-type token (or wrong credentials).",
                detail,
                **{"WWW-Authenticate": "WWWAuthenticate"},
            ),
            "NotFound": _response("Not a task of this user, or not a task id at all.", detail),
            "MethodNotAllowed": _response(
                "Any path answers a method it does not take with 405.", detail, Allow="Allow"
            ),
            "PreconditionFailed": _response(
                "`If-Match` does not name the current version.", detail
            ),
            "TooLarge": _response("The body is over the configured limit (1 MiB).", detail),
            "Throttled": _response("Too many attempts.", detail, **{"Retry-After": "RetryAfter"}),
            "Unavailable": _response(
                "Postgres (or, for a new stream, Redis) is unreachable; nothing was written.",
                detail,
                **{"Retry-After": "RetryAfter"},
            ),
        }


ERRORS = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "404": "NotFound",
    "412": "PreconditionFailed",
    "413": "TooLarge",
    "429": "Throttled",
    "503": "Unavailable",
}


def _op(
    op_id: str,
    summary: str,
    tag: str,
    security: list[dict[str, list[str]]],
    responses: dict[str, Schema],
    errors: str = "",
    **extra: Any,
) -> Schema:
    """An operation; `errors` lists the API.md error statuses it can answer, e.g. "401 404"."""
    for status in errors.split():
        responses[status] = {"$ref": f"#/components/responses/{ERRORS[status]}"}
    return {
        "operationId": op_id,
        "summary": summary,
        "tags": [tag],
        "security": security,
        **extra,
        "responses": responses,
    }


def _param(name: str, where: str, schema: Schema, description: str, **extra: Any) -> Schema:
    return {"name": name, "in": where, "description": description, "schema": schema, **extra}


LIST_PARAMETERS = [
    _param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "default": LIST_LIMIT_DEFAULT},
        f"Page size; above {LIST_LIMIT_MAX} it is clamped to {LIST_LIMIT_MAX}.",
    ),
    _param("offset", "query", {"type": "integer", "minimum": 0, "default": 0}, "Rows to skip."),
    _param("done", "query", {"type": "boolean"}, "Only done (or only open) tasks."),
    _param(
        "search",
        "query",
        {"type": "string"},
        "A literal substring of the title or description, case-insensitively.",
    ),
    _param(
        "ordering",
        "query",
        {
            "type": "string",
            "enum": [f"{sign}{key}" for key in ORDERINGS for sign in ("", "-")],
            "default": "-created_at",
        },
        "Sort key, `-` for descending; `title` case-insensitively; ties broken by `id`.",
    ),
]
TASK_ID = _param(
    "id",
    "path",
    {"type": "integer", "minimum": 1, "maximum": schemas.BIGINT_MAX},
    "The task's id; anything that is not one of your tasks' ids is a 404.",
    required=True,
)
IF_MATCH = _param(
    "If-Match",
    "header",
    {"type": "string"},
    'Change only if the task is at this version (`"<version>"`, or `*`); else 412.',
)
IF_NONE_MATCH = _param(
    "If-None-Match",
    "header",
    {"type": "string"},
    "304 when it names the current version (weak comparison) or is `*`.",
)
RESUME_QUERY = _param(
    "last_event_id",
    "query",
    {"type": "string", "examples": ["0-0", "42-0"]},
    "Resume after this event id (a first connect from a browser); malformed means a reset.",
)


def _auth_paths(b: _Builder) -> dict[str, Schema]:
    no_store = {"Cache-Control": "NoStore"}
    tokens = b.json(schemas.TokenPair, "A new access and refresh token.", **no_store)
    return {
        "/api/register/": {
            "post": _op(
                "register",
                "Create an account",
                "auth",
                PUBLIC,
                {"201": b.json(schemas.UserOut, "The new user.")},
                "400 413 429 503",
                requestBody=b.body(schemas.Register),
            )
        },
        "/api/login/": {
            "post": _op(
                "login",
                "Log in",
                "auth",
                PUBLIC,
                {"200": tokens},
                "400 401 413 429 503",
                requestBody=b.body(schemas.Login),
            )
        },
        "/api/token/refresh/": {
            "post": _op(
                "refreshToken",
                "Rotate a refresh token (the one sent is consumed)",
                "auth",
                PUBLIC,
                {"200": tokens},
                "400 401 413 503",
                requestBody=b.body(schemas.RefreshIn),
            )
        },
        "/api/logout/": {
            "post": _op(
                "logout",
                "Revoke the refresh token's whole family",
                "auth",
                PUBLIC,
                {
                    "204": {
                        "description": "Logged out.",
                        "headers": {"Cache-Control": _header("NoStore")},
                    }
                },
                "400 401 413 503",
                requestBody=b.body(schemas.RefreshIn),
            )
        },
        "/api/me/": {
            "get": _op(
                "me",
                "The current user",
                "auth",
                BEARER,
                {"200": b.json(schemas.UserOut, "You.")},
                "401 503",
            )
        },
    }


def _task_paths(b: _Builder) -> dict[str, Schema]:
    def task(description: str, **headers: str) -> Schema:
        return b.json(schemas.TaskOut, description, ETag="ETag", **headers)

    page = b.json(schemas.TaskPage, "A page of tasks.", **{"X-Stream-Position": "StreamPosition"})
    return {
        "/api/tasks/": {
            "get": _op(
                "listTasks",
                "List your tasks",
                "tasks",
                BEARER,
                {"200": page},
                "400 401 503",
                parameters=LIST_PARAMETERS,
            ),
            "post": _op(
                "createTask",
                "Create a task",
                "tasks",
                BEARER,
                {"201": task("The new task.", Location="Location")},
                "400 401 413 503",
                requestBody=b.body(schemas.TaskCreate),
            ),
        },
        "/api/tasks/{id}/": {
            "parameters": [TASK_ID],
            "get": _op(
                "getTask",
                "Read a task",
                "tasks",
                BEARER,
                {
                    "200": task("The task."),
                    "304": {
                        "description": "`If-None-Match` names the current version.",
                        "headers": {"ETag": _header("ETag")},
                    },
                },
                "401 404 503",
                parameters=[IF_NONE_MATCH],
            ),
            "put": _op(
                "putTask",
                "Replace a task's fields (an omitted optional field keeps its value)",
                "tasks",
                BEARER,
                {"200": task("The task as it now is.")},
                "400 401 404 412 413 503",
                parameters=[IF_MATCH],
                requestBody=b.body(schemas.TaskPut),
            ),
            "patch": _op(
                "patchTask",
                "Change some of a task's fields",
                "tasks",
                BEARER,
                {"200": task("The task as it now is.")},
                "400 401 404 412 413 503",
                parameters=[IF_MATCH],
                requestBody=b.body(schemas.TaskPatch),
            ),
            "delete": _op(
                "deleteTask",
                "Delete a task",
                "tasks",
                BEARER,
                {"204": {"description": "Deleted."}},
                "401 404 412 503",
                parameters=[IF_MATCH],
            ),
        },
    }


def _live_paths(b: _Builder) -> dict[str, Schema]:
    messages = {"oneOf": [b.ref(schemas.Event), b.ref(schemas.Reset), b.ref(schemas.Reauth)]}
    sse = {
        "description": "Server-Sent Events: a `retry:` line, then `id:`/`event:`/`data:` per"
        " event (`event` is the event's type, `reset` or `reauth`), `: ping` at least every"
        " 15 s. `x-event-data` is the schema of each `data:` line.",
        "headers": {
            "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
            "X-Accel-Buffering": {"schema": {"type": "string", "const": "no"}},
        },
        "content": {"text/event-stream": {"schema": {"type": "string"}, "x-event-data": messages}},
    }
    frames = {"oneOf": [*messages["oneOf"], b.ref(schemas.Pong), b.ref(schemas.SocketError)]}
    forbidden = _response("A cross-site `Origin`.", b.ref(ErrorDetail))
    not_upgrade = _response("Not a WebSocket handshake.", b.ref(ErrorDetail))
    return {
        "/api/stream/": {
            "get": _op(
                "stream",
                "Live events (SSE)",
                "live",
                BEARER_OR_QUERY,
                {"200": sse},
                "401 503",
                parameters=[
                    _param(
                        "Last-Event-ID",
                        "header",
                        {"type": "string", "examples": ["42-0"]},
                        "Resume after this event id (wins over `last_event_id`).",
                    ),
                    RESUME_QUERY,
                ],
            )
        },
        "/api/ws/": {
            "get": _op(
                "websocket",
                "Live events (WebSocket)",
                "live",
                BEARER_OR_QUERY,
                {
                    "101": {
                        "description": "Switching to WebSocket: each event is one text frame"
                        ' (`x-frames`); the client may send `{"type": "ping"}`.',
                        "x-frames": frames,
                    },
                    "400": not_upgrade,
                    "403": forbidden,
                },
                "401 503",
                parameters=[
                    _param(
                        "Upgrade",
                        "header",
                        {"type": "string", "const": "websocket"},
                        "",
                        required=True,
                    ),
                    _param(
                        "Origin",
                        "header",
                        {"type": "string"},
                        "Browsers only: must be the service's own origin or allow-listed.",
                    ),
                    RESUME_QUERY,
                ],
            )
        },
    }


def _ops_paths(b: _Builder) -> dict[str, Schema]:
    def plain(op_id: str, summary: str, media: str, description: str) -> Schema:
        content = {media: {"schema": {"type": "string"}}}
        return {
            "get": _op(
                op_id,
                summary,
                "ops",
                PUBLIC,
                {"200": {"description": description, "content": content}},
            )
        }

    readiness = b.ref(schemas.Readiness)
    return {
        "/healthz": {
            "get": _op(
                "healthz", "Liveness", "ops", PUBLIC, {"200": b.json(schemas.Health, "Running.")}
            )
        },
        "/readyz": {
            "get": _op(
                "readyz",
                "Readiness",
                "ops",
                PUBLIC,
                {
                    "200": _response("Postgres and Redis answer.", readiness),
                    "503": {
                        **_response("A dependency is down, or the process is draining.", readiness),
                        "headers": {
                            "Retry-After": {
                                "description": "While draining.",
                                "schema": {"type": "integer", "minimum": 0},
                            }
                        },
                    },
                },
            )
        },
        "/metrics": plain("metrics", "Prometheus metrics", "text/plain", "Prometheus text format."),
        "/api/openapi.json": {
            "get": _op(
                "openapi",
                "This document",
                "ops",
                PUBLIC,
                {"200": _response("OpenAPI 3.1.", {"type": "object"})},
            )
        },
        # `GET /` (the web client) joins the document when the route exists.
    }


def _version() -> str:
    try:
        return metadata.version("taskd")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of API.md."""
    b = _Builder()
    paths = {**_auth_paths(b), **_task_paths(b), **_live_paths(b), **_ops_paths(b)}
    responses = b.responses()
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "taskd",
            "version": _version(),
            "description": "Multi-user tasks with live updates. Every error is JSON:"
            " `{field: [messages]}` (400) or `{detail, code}`; a method a path does not take"
            " is a 405 with `Allow` (`#/components/responses/MethodNotAllowed`). GET routes"
            " also answer HEAD, except the live ones.",
        },
        "tags": [{"name": name} for name in ("auth", "tasks", "live", "ops")],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(b.schemas.items())),
            "responses": responses,
            "headers": HEADERS,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


@functools.cache
def _document_bytes() -> bytes:
    return json.dumps(build_document(), ensure_ascii=False).encode()


@public
async def openapi_json(request: web.Request) -> web.Response:
    """The document, built once per process on first use."""
    return web.Response(body=_document_bytes(), content_type=JSON)
