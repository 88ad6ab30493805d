"""Fixed-window attempt counters in Redis (shared by replicas), per process while Redis is down."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict

from taskd.config import ThrottleSettings
from taskd.errors import Throttled
from taskd.shards import RedisClient
from taskd.streams import REDIS_DOWN, RedisKeys

log = logging.getLogger(__name__)


class Throttle:
    """Count attempts per (scope, identity) in windows of `window` seconds."""

    def __init__(self, redis: RedisClient, keys: RedisKeys, settings: ThrottleSettings) -> None:
        self._redis = redis
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
        # One round trip; no MULTI (a cluster's is slow, and one key needs none): a counter
        # that missed its EXPIRE (a crash between the two) is for a window that has passed.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, self._window + 1, nx=True)
            count, _ = await pipe.execute()
        return int(count)

    def _count_locally(self, key: str) -> int:
        count = self._local.pop(key, 0) + 1
        self._local[key] = count
        while len(self._local) > self._local_max:
            self._local.popitem(last=False)  # the least recently counted
        return count
