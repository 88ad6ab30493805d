"""Fixed-window attempt counters in Redis (shared by replicas), per process while Redis is down."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict

from taskd.config import ThrottleSettings
from taskd.errors import Throttled
from taskd.shards import REDIS_DOWN, RedisClient
from taskd.streams import RedisKeys, Script

log = logging.getLogger(__name__)


# One attempt counted: the window's counter, set to expire with its window when created.
COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class Throttle:
    """Count attempts per (scope, identity) in windows of `window` seconds."""

    def __init__(self, redis: RedisClient, keys: RedisKeys, settings: ThrottleSettings) -> None:
        self._count = Script(redis, COUNT)
        self._keys = keys
        self._window = settings.window
        self._local: OrderedDict[str, int] = OrderedDict()
        self._local_max = settings.local_max_keys

    async def hit(self, scope: str, ident: str, limit: int) -> None:
        """Count one attempt; `Throttled` with the seconds left when over `limit`."""
        now = time.time()
        window = int(now // self._window)
        key = self._keys.throttle(scope, ident, window)
        try:
            count = await self._count_in_redis(key)
        except REDIS_DOWN as exc:
            log.warning("throttle falls back to per-process counters: %s", exc)
            count = self._count_locally(key)
        if count > limit:
            raise Throttled(max(1, math.ceil((window + 1) * self._window - now)))

    async def _count_in_redis(self, key: str) -> int:
        # One command, atomic, on any Redis (a cluster's MULTI is slow, and its pipelines
        # bypass the bound on connections in use).
        return int(await self._count(keys=[key], args=[self._window + 1]))

    def _count_locally(self, key: str) -> int:
        count = self._local.pop(key, 0) + 1
        self._local[key] = count
        while len(self._local) > self._local_max:
            self._local.popitem(last=False)  # the least recently counted
        return count
