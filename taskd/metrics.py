"""Prometheus metrics (one registry per app, no globals): the middleware that counts requests,
the gauges read at scrape time. `views.ops` serves them."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from taskd import db, keys, store
from taskd.errors import ApiError

log = logging.getLogger(__name__)

# Label values come from this set only: a client inventing methods must not grow the registry.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CONTENT_TYPE = CONTENT_TYPE_LATEST  # of what `scrape` returns
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Every metric the service exports; gauges of other components are read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "taskd_http_requests", "HTTP requests.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "taskd_http_request_duration_seconds",
            "Time to the response headers (streams: to their end).",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.live = Gauge("taskd_live_connections", "Open live connections.", ["kind"], registry=r)
        self.published = Gauge(
            "taskd_relay_events_published", "Events this process published (as leader).", registry=r
        )
        self.leader = Gauge(
            "taskd_relay_leader", "1 while this process is the relay leader.", registry=r
        )
        self.received = Gauge(
            "taskd_hub_events_received",
            "Events heard from Redis: only those of users streaming on this process.",
            registry=r,
        )
        self.channels = Gauge(
            "taskd_hub_channels", "Live channels subscribed (users streaming here).", registry=r
        )
        self.delivered = Gauge(
            "taskd_hub_events_delivered", "Events handed to local subscribers.", registry=r
        )
        self.hub_connected = Gauge(
            "taskd_hub_redis_connected", "1 while the hub hears every Redis master.", registry=r
        )
        self.redis_connections = Gauge(
            "taskd_redis_connections", "Redis connections held by this process.", registry=r
        )
        self.backlog = Gauge(
            "taskd_outbox_backlog",
            f"Events waiting in the outbox (counted up to {store.BACKLOG_COUNT_CAP}).",
            registry=r,
        )
        self.backlog_age = Gauge(
            "taskd_outbox_oldest_age_seconds", "Age of the oldest unpublished event.", registry=r
        )
        # Label children by their values: `labels()` validates and locks on every call.
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and its duration (method, route and status are bounded sets)."""
        counted = self._counted.get((method, route, status))
        if counted is None:
            counted = self._counted[method, route, status] = self.requests.labels(
                method, route, str(status)
            )
        timed = self._timed.get((method, route))
        if timed is None:
            timed = self._timed[method, route] = self.latency.labels(method, route)
        counted.inc()
        timed.observe(seconds)


def _route(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def count_request(request: web.Request, status: int, started: float) -> None:
    """Count a finished request by method, route and status, and its duration."""
    method = request.method if request.method in KNOWN_METHODS else "other"
    seconds = time.perf_counter() - started
    request.app[keys.METRICS].observe(method, _route(request), status, seconds)


async def _refresh(app: web.Application, metrics: Metrics) -> None:
    relay, hub = app[keys.RELAY], app[keys.HUB]
    metrics.published.set(relay.published)
    metrics.leader.set(1 if relay.is_leader else 0)
    metrics.delivered.set(hub.delivered)
    metrics.received.set(hub.received)
    metrics.channels.set(hub.channels_heard())
    metrics.hub_connected.set(1 if hub.connected else 0)
    metrics.live.labels("sse").set(hub.subscriber_count_of("sse"))
    metrics.live.labels("ws").set(hub.subscriber_count_of("ws"))
    pooled = app[keys.SHARDS].pooled_connections()
    own = hub.connections() + (1 if app[keys.CUTOFFS].subscribed else 0)
    metrics.redis_connections.set(pooled + own)  # the pool, the hub's, the cut-offs' one
    try:
        async with db.cursor(app[keys.PG_POOL]) as cur:
            backlog = await store.outbox_backlog(cur)
        metrics.backlog.set(backlog.count)
        metrics.backlog_age.set(backlog.oldest_age)
    except ApiError:
        pass  # Postgres down: the scrape still answers, with the last values


async def scrape(app: web.Application) -> bytes:
    """The registry in Prometheus text format, with other components' gauges read now."""
    metrics = app[keys.METRICS]
    await _refresh(app, metrics)
    return generate_latest(metrics.registry)
