"""What a route of the table is made of, and the pieces several routes share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp.typedefs import Handler
from pydantic import BaseModel

from taskd import schemas
from taskd.views import web

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
