"""Every typed application and request key, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from taskd.config import Settings

if TYPE_CHECKING:
    from taskd.app import Lifecycle
    from taskd.auth import Passwords, Tokens
    from taskd.cutoffs import Cutoffs
    from taskd.hub import Hub
    from taskd.keepalive import Keepalive
    from taskd.metrics import Metrics
    from taskd.relay import Doorbell, Relay
    from taskd.shards import RedisClient, Shards
    from taskd.streams import RedisKeys, StreamReader
    from taskd.throttle import Throttle

SETTINGS = web.AppKey("settings", Settings)
PROCESSES = web.AppKey("processes", int)  # serving processes sharing this machine's CPUs
KEYSPACE: web.AppKey[RedisKeys] = web.AppKey("keyspace")  # Redis key names, namespaced
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
PG_POOL: web.AppKey[Any] = web.AppKey("pg_pool")  # aiopg.Pool: aiopg ships no type stubs
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")  # one instance or a cluster
SHARDS: web.AppKey[Shards] = web.AppKey("shards")  # which node holds a key
PASSWORDS: web.AppKey[Passwords] = web.AppKey("passwords")
TOKENS: web.AppKey[Tokens] = web.AppKey("tokens")
CUTOFFS: web.AppKey[Cutoffs] = web.AppKey("cutoffs")  # each user's token generation, cached
THROTTLE: web.AppKey[Throttle] = web.AppKey("throttle")
DOORBELL: web.AppKey[Doorbell] = web.AppKey("doorbell")
RELAY: web.AppKey[Relay] = web.AppKey("relay")
HUB: web.AppKey[Hub] = web.AppKey("hub")
KEEPALIVE: web.AppKey[Keepalive] = web.AppKey("keepalive")  # the ping sweep of live connections
STREAM_READER: web.AppKey[StreamReader] = web.AppKey("stream_reader")  # users' history
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
OPENAPI = web.AppKey("openapi", bytes)  # the served document; the table it describes names views

USER_ID = web.RequestKey("user_id", int)
REQUEST_ID = web.RequestKey("request_id", str)
TOKEN_EXPIRES = web.RequestKey("token_expires", int)  # the access token's `exp` (Unix time)
TOKEN_GENERATION = web.RequestKey("token_generation", int)  # the access token's `gen`
