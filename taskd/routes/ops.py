"""The routes of operations (health, readiness, this document, metrics) and the web client."""

from __future__ import annotations

from taskd import responses
from taskd.routes.parts import STRING, Reply, Route, Schema
from taskd.views import ops, web

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
