"""Operations: liveness, readiness, Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from taskd import db, keys, store
from taskd.errors import ApiError
from taskd.metrics import CONTENT_TYPE, scrape
from taskd.shards import REDIS_DOWN

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """200 while the process runs."""
    return web.json_response({"status": "ok"})


async def _postgres_ok(app: web.Application) -> bool:
    try:
        async with db.cursor(app[keys.PG_POOL]) as cur:
            await store.ping(cur)
        return True
    except ApiError:
        return False


async def _redis_ok(app: web.Application) -> bool:
    try:
        return bool(await app[keys.REDIS].ping())
    except REDIS_DOWN:
        return False


async def readyz(request: web.Request) -> web.Response:
    """200 when Postgres and Redis answer and the hub tails; 503 otherwise and while draining."""
    if request.app[keys.LIFECYCLE].draining:
        return web.json_response(
            {"status": "draining", "checks": {}}, status=503, headers={"Retry-After": "1"}
        )
    postgres, redis = await asyncio.gather(_postgres_ok(request.app), _redis_ok(request.app))
    checks = {"postgres": postgres, "redis": redis, "live": request.app[keys.HUB].connected}
    status = 200 if all(checks.values()) else 503
    return web.json_response(
        {"status": "ok" if status == 200 else "unavailable", "checks": checks}, status=status
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (this process only)."""
    return web.Response(body=await scrape(request.app), headers={"Content-Type": CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document of the route table (built by `create_app`, which knows the table)."""
    return web.Response(body=request.app[keys.OPENAPI], content_type="application/json")
