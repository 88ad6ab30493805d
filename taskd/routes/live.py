"""The routes of live updates: Server-Sent Events and WebSocket."""

from __future__ import annotations

from taskd import responses
from taskd.routes.parts import AUTH_ERRORS, STRING, Param, Reply, Route
from taskd.views import live

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

ROUTES: tuple[Route, ...] = (
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
)
