"""Which Redis holds what: one instance (`[redis] url`), or the masters of a Redis Cluster
(`[redis] cluster_nodes`). Every user's keys share one hash tag (`RedisKeys`), so a user's
stream and live channel always sit on one node; this module names that node, and makes the
plain connections that must talk to one node (the relay's pipelines, the hub's readers, the
control channels' subscriptions)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from taskd.config import RedisSettings

log = logging.getLogger(__name__)

Node = tuple[str, int]  # (host, port)

# Errors that mean "Redis is not answering" (a cluster client that reaches no node, or finds
# no master for a slot, raises RedisClusterException, not a RedisError).
REDIS_DOWN = (RedisError, RedisClusterException, OSError, TimeoutError)

# Replies that mean "ask again, elsewhere or later": the slot moved (MOVED, ASK), the cluster
# is failing over (CLUSTERDOWN, MASTERDOWN, TRYAGAIN), a demoted master (READONLY). (redis-py
# keeps the reply's code in the exception's type, not in its text.)
RETRY_REPLIES = (AskError, TryAgainError, ClusterError, ReadOnlyError)


def retryable(error: Exception) -> bool:
    """Whether a command that failed so should simply be sent again, after the slot map is
    read again: a redirect, a failover under way, or a node that did not answer."""
    if isinstance(error, ResponseError):
        return isinstance(error, RETRY_REPLIES)
    return isinstance(error, REDIS_DOWN)


class BoundedCluster(RedisCluster):
    """redis-py's cluster client, waiting for a connection instead of failing: its node pools
    raise MaxConnectionsError when full (redis-py issue 2517), so at most `max_connections`
    commands of this process are under way at once, and the rest queue here."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slots = asyncio.Semaphore(kwargs["max_connections"])

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._slots:
            return await super().execute_command(*args, **kwargs)


RedisClient = Redis | RedisCluster


def _credentials(settings: RedisSettings) -> dict[str, Any]:
    """What a cluster node connection takes from `url`: user, password and TLS."""
    url = urlsplit(settings.url.get_secret_value())
    return {
        "username": unquote(url.username) if url.username else None,
        "password": unquote(url.password) if url.password else None,
        "ssl": url.scheme == "rediss",
    }


def _node(text: str) -> Node:
    host, _, port = text.strip().rpartition(":")
    return host.strip("[]"), int(port)


def make_redis(settings: RedisSettings) -> RedisClient:
    """The process's pooled client: bounded connections, short timeouts, at most one retry.

    RESP3 is pinned because reply shapes differ between protocols. Both wait (briefly) for
    a connection rather than raise when every one is busy.
    """
    common: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "protocol": 3,
        "retry": Retry(NoBackoff(), 1),
        "client_name": f"taskd:{settings.namespace}",  # CLIENT LIST shows whose connections
    }
    if settings.cluster_nodes:
        return BoundedCluster(
            startup_nodes=[ClusterNode(*_node(n)) for n in settings.cluster_nodes],
            max_connections=settings.max_connections,
            # A master that is down must not stop the others' users (the cluster runs with
            # cluster-require-full-coverage no).
            require_full_coverage=False,
            **common,
            **_credentials(settings),
        )
    pool = BlockingConnectionPool.from_url(
        settings.url.get_secret_value(),
        max_connections=settings.max_connections,
        timeout=settings.timeout,
        **common,
    )
    return Redis(connection_pool=pool)


class Shards:
    """The node of each key, from the cluster's slot map (refreshed on demand), or the one
    instance. Plain per-node clients are made here so that their options stay in one place."""

    def __init__(self, settings: RedisSettings, client: RedisClient) -> None:
        self._settings = settings
        self._client = client
        self._rotation = itertools.count()
        url = urlsplit(settings.url.get_secret_value())  # once: the relay asks per event
        self._single_node: Node = (url.hostname or "127.0.0.1", url.port or 6379)
        self._refreshed = -float("inf")  # time.monotonic() of the last slot map re-read

    @property
    def timeout(self) -> float:
        return self._settings.timeout

    @property
    def clustered(self) -> bool:
        return isinstance(self._client, RedisCluster)

    def _cluster(self) -> RedisCluster:
        assert isinstance(self._client, RedisCluster)
        return self._client

    async def refresh(self) -> None:
        """Re-read the slot map (after a failover, a MOVED or a lost connection), at most
        once per `timeout`: redis-py reconnects every pooled connection on each re-read, and
        while a master is down the hub and the relay would ask for one several times a second."""
        if not self.clustered:
            return
        now = time.monotonic()
        if now - self._refreshed < self._settings.timeout:
            return
        self._refreshed = now
        await self._cluster().nodes_manager.initialize()

    async def ready(self) -> None:
        """Read the slot map once, if it was never read."""
        if self.clustered and not self._cluster().nodes_manager.slots_cache:
            await self.refresh()

    def node_of(self, key: str) -> Node:
        """The master holding `key` (SlotNotCoveredError when no node serves its slot)."""
        if not self.clustered:
            return self._single()
        node = self._cluster().get_node_from_key(key)
        assert node is not None
        return node.host, int(node.port)

    def masters(self) -> list[Node]:
        if not self.clustered:
            return [self._single()]
        return sorted((n.host, int(n.port)) for n in self._cluster().get_primaries())

    def _single(self) -> Node:
        return self._single_node

    def direct(self, node: Node, role: str, *, read_timeout: float | None) -> Redis:
        """A one-connection client to `node` (the url's own options on a single instance).
        `read_timeout` None: for a connection that waits on Pub/Sub, whose reader bounds each
        wait itself. No retries: the caller reconnects and knows what it may have missed."""
        options: dict[str, Any] = {
            "protocol": 3,
            "socket_timeout": read_timeout,
            "socket_connect_timeout": self._settings.timeout,
            "socket_keepalive": True,
            "single_connection_client": True,
            "retry": Retry(NoBackoff(), 0),
            "client_name": f"taskd:{self._settings.namespace}:{role}",
        }
        if not self.clustered:
            return Redis.from_url(self._settings.url.get_secret_value(), **options)
        host, port = node
        return Redis(host=host, port=port, **options, **_credentials(self._settings))

    def pooled_connections(self) -> int:
        """Connections the process's pooled client holds (on every node of a cluster)."""
        if isinstance(self._client, RedisCluster):
            # redis-py has no public count for a cluster node's pool.
            return sum(len(getattr(n, "_connections", ())) for n in self._client.get_nodes())
        return sum(count for count, _ in self._client.connection_pool.get_connection_count())

    def any_node(self) -> Node:
        """A node for a cluster-wide (classic) Pub/Sub channel: any node relays those to
        all. Each call names the next configured node, so a reconnect tries another."""
        if not self.clustered:
            return self._single()
        nodes = self._settings.cluster_nodes
        return _node(nodes[next(self._rotation) % len(nodes)])
