"""The application factory: middlewares, resources in dependency order, routes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from taskd import keys
from taskd.auth import auth_ctx, auth_middleware
from taskd.config import Settings
from taskd.db import pg_pool_ctx
from taskd.errors import error_middleware
from taskd.hub import end_streams, hub_ctx
from taskd.metrics import Metrics, add_request_id, metrics_view, observe_middleware
from taskd.openapi import openapi_json
from taskd.relay import relay_ctx
from taskd.streams import Keys, redis_ctx
from taskd.throttle import Throttle
from taskd.views import accounts, live, ops, tasks


class Lifecycle:
    """Process state that handlers read: `draining` is set once SIGTERM starts the drain."""

    def __init__(self) -> None:
        self.draining = False


async def throttle_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    app[keys.THROTTLE] = Throttle(app[keys.REDIS], app[keys.KEYSPACE], settings.throttle)
    yield


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/register/", accounts.register)
    r.add_post("/api/login/", accounts.login)
    r.add_post("/api/token/refresh/", accounts.refresh)
    r.add_post("/api/logout/", accounts.logout)
    r.add_get("/api/me/", accounts.me)
    r.add_get("/api/tasks/", tasks.list_tasks)
    r.add_post("/api/tasks/", tasks.create_task)
    r.add_get("/api/tasks/{id}/", tasks.get_task)
    r.add_put("/api/tasks/{id}/", tasks.put_task)
    r.add_patch("/api/tasks/{id}/", tasks.patch_task)
    r.add_delete("/api/tasks/{id}/", tasks.delete_task)
    r.add_get("/api/stream/", live.sse, allow_head=False)
    r.add_get("/api/ws/", live.ws, allow_head=False)
    r.add_get("/healthz", ops.healthz)
    r.add_get("/readyz", ops.readyz)
    r.add_get("/api/openapi.json", openapi_json)
    r.add_get("/metrics", metrics_view)


def create_app(settings: Settings) -> web.Application:
    """Build the service; tests build it exactly as production does."""
    app = web.Application(
        middlewares=[observe_middleware, error_middleware, auth_middleware],
        client_max_size=settings.http.max_body_bytes,
    )
    app[keys.SETTINGS] = settings
    app[keys.LIFECYCLE] = Lifecycle()
    app[keys.KEYSPACE] = Keys(settings.redis.namespace)
    app[keys.METRICS] = Metrics()
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
