"""The application factory: middlewares, resources in dependency order, the route table."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from taskd import keys
from taskd.auth import PUBLIC, QUERY_TOKEN, auth_ctx, auth_middleware
from taskd.config import Settings
from taskd.db import pg_pool_ctx
from taskd.errors import error_middleware
from taskd.forwarded import forwarded_middleware
from taskd.hub import end_streams, hub_ctx
from taskd.logs import add_request_id
from taskd.metrics import Metrics, observe_middleware
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


def create_app(settings: Settings) -> web.Application:
    """Build the service; tests build it exactly as production does."""
    app = web.Application(
        # Outermost first: everything after `forwarded` sees the request as the client does.
        middlewares=[
            m
            for m in (
                forwarded_middleware(settings.http),
                observe_middleware,
                error_middleware,
                auth_middleware,
            )
            if m is not None
        ],
        client_max_size=settings.http.max_body_bytes,
    )
    app[keys.SETTINGS] = settings
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
    app.on_shutdown.append(end_streams)
    add_routes(app)
    return app
