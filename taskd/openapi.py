"""The OpenAPI 3.1 document of the route table; schemas are generated from `schemas` models."""

from __future__ import annotations

import functools
import json
import re
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from taskd.responses import ErrorDetail, FieldErrors
from taskd.routes import JSON, PATH_PARAMETERS, ROUTES, Auth, Param, Reply, Route, Schema
from taskd.schemas import EVENT_ID_PATTERN

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
PLACEHOLDER = re.compile(r"{(\w+)}")

SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "public": [],
    "bearer": [{"bearerAuth": []}],
    "bearer or query": [{"bearerAuth": []}, {"queryToken": []}],
}
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
    "ListETag": {
        "description": "A weak tag of the page: the stream position it reflects and a digest of"
        " the query (send it back in `If-None-Match` for a 304 while nothing changed).",
        "required": True,
        "schema": {"type": "string", "pattern": '^W/"[0-9]+-[0-9a-f]{16}"$'},
    },
    "IdempotencyReplayed": {
        "description": "This is the recorded answer to an earlier request with the same"
        " `Idempotency-Key`; nothing was written.",
        "schema": {"type": "string", "const": "true"},
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

RETRY_AFTER = {"Retry-After": "RetryAfter"}
# API.md's error rows: components that operations refer to by status (405 applies to any path).
ERRORS: dict[int, tuple[str, Reply]] = {
    400: ("BadRequest", Reply("Field errors.", FieldErrors)),
    401: (
        "Unauthorized",
        Reply(
            "No, bad, expired or wrong-type token (or wrong credentials).",
            ErrorDetail,
            headers={"WWW-Authenticate": "WWWAuthenticate"},
        ),
    ),
    404: ("NotFound", Reply("Not a task of this user, or not a task id at all.", ErrorDetail)),
    405: (
        "MethodNotAllowed",
        Reply(
            "Any path answers a method it does not take with 405.",
            ErrorDetail,
            headers={"Allow": "Allow"},
        ),
    ),
    409: (
        "Conflict",
        Reply("A request with this `Idempotency-Key` is still running.", ErrorDetail),
    ),
    412: (
        "PreconditionFailed",
        Reply("`If-Match` does not name the current version.", ErrorDetail),
    ),
    413: ("TooLarge", Reply("The body is over the configured limit (1 MiB).", ErrorDetail)),
    422: (
        "IdempotencyKeyReused",
        Reply("This `Idempotency-Key` was used for another method, path or body.", ErrorDetail),
    ),
    429: ("Throttled", Reply("Too many attempts.", ErrorDetail, headers=RETRY_AFTER)),
    503: (
        "Unavailable",
        Reply(
            "Postgres (or, for a new stream, Redis) is unreachable; nothing was written.",
            ErrorDetail,
            headers=RETRY_AFTER,
        ),
    ),
}


def _param(param: Param) -> Schema:
    out: Schema = {
        "name": param.name,
        "in": param.where,
        "description": param.description,
        "schema": param.schema,
    }
    if param.required:
        out["required"] = True
    return out


class _Builder:
    """Renders the table, collecting the component schemas of the models it refers to."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}

    def ref(self, model: type[BaseModel]) -> Schema:
        """A `$ref` to the model's generated schema, adding it (and its `$defs`) to components."""
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            self.schemas.setdefault(name, sub)
        self.schemas[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}

    def reply(self, reply: Reply) -> Schema:
        """A response object; `extension` sits in the media type, or the response if bodiless."""
        out: Schema = {"description": reply.description}
        if reply.headers:
            out["headers"] = {
                wire: {"$ref": f"#/components/headers/{h}"} if isinstance(h, str) else h
                for wire, h in reply.headers.items()
            }
        schema = self.ref(reply.model) if reply.model is not None else reply.schema
        where = out
        if schema is not None:
            where = {"schema": schema}
            out["content"] = {reply.media: where}
        if reply.extension is not None:
            name, models = reply.extension
            where[name] = {"oneOf": [self.ref(model) for model in models]}
        return out

    def operation(self, route: Route) -> Schema:
        responses = {str(status): self.reply(reply) for status, reply in route.replies.items()}
        for status in route.errors:
            responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
        op: Schema = {
            "operationId": route.op_id,
            "summary": route.summary,
            "tags": [route.tag],
            "security": SECURITY[route.auth],
        }
        if route.params:
            op["parameters"] = [_param(p) for p in route.params]
        if route.body is not None:
            body = {JSON: {"schema": self.ref(route.body)}}
            op["requestBody"] = {"required": True, "content": body}
        op["responses"] = responses
        return op


def _version() -> str:
    try:
        return metadata.version("taskd")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in `routes.ROUTES`."""
    b = _Builder()
    paths: dict[str, Schema] = {}
    for route in ROUTES:
        item = paths.setdefault(route.path, {})
        if names := PLACEHOLDER.findall(route.path):
            item["parameters"] = [_param(PATH_PARAMETERS[name]) for name in names]
        item[route.method.lower()] = b.operation(route)
    responses = {name: b.reply(reply) for name, reply in ERRORS.values()}
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
        "tags": [{"name": tag} for tag in dict.fromkeys(route.tag for route in ROUTES)],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(b.schemas.items())),
            "responses": responses,
            "headers": HEADERS,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as served, built once per process."""
    return json.dumps(build_document(), ensure_ascii=False).encode()
