"""Redis: the client's lifecycle and every key name the service uses."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from taskd import keys
from taskd.config import RedisSettings

log = logging.getLogger(__name__)

# Errors that mean "Redis is not answering" on a request path.
REDIS_DOWN = (RedisError, OSError, TimeoutError)


class Keys:
    """Redis key names, all under the configured namespace, spelled out only here."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def throttle(self, scope: str, ident: str, window: int) -> str:
        return f"{self.namespace}:throttle:{scope}:{window}:{ident}"

    def events(self, user_id: int) -> str:
        return f"{self.namespace}:events:{user_id}"

    def pattern(self) -> str:
        """Every key of this namespace (for tests and tooling)."""
        return f"{self.namespace}:*"


def make_redis(settings: RedisSettings) -> Redis:
    """A pooled client: bounded connections, short timeouts and at most one retry.

    RESP3 is pinned because reply shapes differ between protocols; the pool blocks (briefly)
    rather than raising when every connection is busy (redis-py issue 2517).
    """
    pool = BlockingConnectionPool.from_url(
        settings.url.get_secret_value(),
        max_connections=settings.max_connections,
        timeout=settings.timeout,
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.timeout,
        protocol=3,
        retry=Retry(NoBackoff(), 1),
    )
    return Redis(connection_pool=pool)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """One client per process; a Redis that is down at start-up is not fatal."""
    client = make_redis(app[keys.SETTINGS].redis)
    app[keys.REDIS] = client
    try:
        await client.ping()
    except REDIS_DOWN as exc:
        log.warning("redis not reachable at start-up (%s); carrying on without it", exc)
    try:
        yield
    finally:
        await client.aclose()
        await client.connection_pool.disconnect()
