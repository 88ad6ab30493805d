"""The application factory: middlewares, resources in dependency order, the route table."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from taskd import keys
from taskd.auth import PUBLIC, QUERY_TOKEN, auth_ctx, authenticate
from taskd.config import Settings
from taskd.cutoffs import cutoffs_ctx
from taskd.db import pg_pool_ctx
from taskd.errors import render_error
from taskd.forwarded import client_view
from taskd.hub import end_streams, hub_ctx
from taskd.keepalive import keepalive_ctx
from taskd.logs import add_request_id, bind_request_id, request_id
from taskd.metrics import Metrics, count_request
from taskd.openapi import document_bytes
from taskd.relay import relay_ctx
from taskd.routes import ROUTES, Route
from taskd.streams import RedisKeys, redis_ctx
from taskd.throttle import Throttle


class Lifecycle:
    """Process state that handlers read: `draining` is set once SIGTERM starts the drain."""

    def __init__(self) -> None:
        self.draining = False


async def throttle_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    app[keys.THROTTLE] = Throttle(app[keys.REDIS], app[keys.KEYSPACE], settings.throttle)
    yield


def _marked(route: Route) -> Handler:
    """The route's handler, marked for the auth middleware as the table says. A partial per
    route, so that the mark belongs to the route, not to a view function that another route
    could share; aiohttp still sees a coroutine function, and no coroutine frame is added."""
    handler = functools.partial(route.handler)
    setattr(handler, PUBLIC, route.auth == "public")
    setattr(handler, QUERY_TOKEN, route.auth == "bearer or query")
    return handler


def add_routes(app: web.Application) -> None:
    """Every route of `routes.ROUTES`, in its order."""
    for route in ROUTES:
        if route.method == "GET":
            app.router.add_get(route.path, _marked(route), allow_head=route.head)
        else:
            app.router.add_route(route.method, route.path, _marked(route))


def request_middleware(settings: Settings) -> Middleware:
    """The one middleware every request passes: the client's view of it (`forwarded`), its
    id (`logs`), authentication (`auth`), errors rendered as JSON (`errors`), counting
    (`metrics`). One, because each middleware costs every request a coroutine frame, and
    every live connection its memory for as long as the connection lasts."""
    as_the_client_sees_it = client_view(settings.http)

    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        if as_the_client_sees_it is not None:
            request = as_the_client_sees_it(request)
        token = bind_request_id(request)
        started = time.perf_counter()
        status = 500  # unless an answer comes (a cancelled request has none)
        try:
            try:
                if (pending := authenticate(request)) is not None:
                    await pending  # the cut-off cache could not vouch: Postgres decides
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:  # a redirect is an answer, which aiohttp sends
                    status = exc.status
                    raise
                response = render_error(request, exc)
            except Exception as exc:
                response = render_error(request, exc)
            status = response.status
            return response
        finally:
            count_request(request, status, started)
            request_id.reset(token)

    return handle


def create_app(settings: Settings, processes: int = 1) -> web.Application:
    """Build the service; tests build it exactly as production does. `processes`: how many
    serving processes share this machine's CPUs (`taskd serve --workers`)."""
    app = web.Application(
        middlewares=[request_middleware(settings)],
        client_max_size=settings.http.max_body_bytes,
    )
    app[keys.SETTINGS] = settings
    app[keys.PROCESSES] = processes
    app[keys.LIFECYCLE] = Lifecycle()
    app[keys.KEYSPACE] = RedisKeys(settings.redis.namespace)
    app[keys.METRICS] = Metrics()
    app[keys.OPENAPI] = document_bytes()
    app.on_response_prepare.append(add_request_id)
    # Started in this order, stopped in reverse.
    app.cleanup_ctx.append(pg_pool_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(auth_ctx)
    app.cleanup_ctx.append(throttle_ctx)
    app.cleanup_ctx.append(relay_ctx)
    app.cleanup_ctx.append(hub_ctx)
    app.cleanup_ctx.append(keepalive_ctx)
    app.cleanup_ctx.append(cutoffs_ctx)
    app.on_shutdown.append(end_streams)
    add_routes(app)
    return app
