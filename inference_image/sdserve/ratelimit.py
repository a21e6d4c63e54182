"""Per-principal token bucket, in memory or in Redis when replicas share the limit."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("sdserve.ratelimit")


class Limiter(Protocol):
    async def take(self, key: str) -> tuple[bool, int]:
        """(allowed, seconds to wait before retrying)."""
        ...


class MemoryBuckets:
    """Buckets of this replica. One that has refilled is forgotten (a new key gets a full
    bucket): anonymous clients are limited per address, and memory must not grow with every
    address that ever called. The sweep runs when the buckets double past ``prune_at``."""

    def __init__(self, rate: float, burst: int, prune_at: int = 4096):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._prune_at = self._prune_floor = prune_at

    def _prune(self, now: float) -> None:
        self._buckets = {
            k: (tokens, last)
            for k, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate < self.burst
        }
        self._prune_at = max(self._prune_floor, 2 * len(self._buckets))

    async def take(self, key: str) -> tuple[bool, int]:
        """(allowed, seconds to wait before retrying)."""
        now = time.monotonic()
        if len(self._buckets) >= self._prune_at:
            self._prune(now)
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return True, 0
        self._buckets[key] = (tokens, now)
        return False, max(1, math.ceil((1 - tokens) / self.rate))


# Atomic refill-and-take; returns {allowed, tokens*1000}. The time is Redis's own: replicas'
# clocks may disagree, and one running ahead would see a refill the bucket never had.
_LUA = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local b = redis.call('HMGET', key, 't', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', key, 't', tokens, 'ts', now)
redis.call('EXPIRE', key, math.ceil(burst / rate) + 60)
return {allowed, math.floor(tokens * 1000)}
"""


class RedisBuckets:
    """Shared across replicas. Redis down: fall back to this replica's own buckets."""

    def __init__(self, url: str, rate: float, burst: int):
        import redis.asyncio as aioredis

        self.rate, self.burst = rate, burst
        self._redis = aioredis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._redis.register_script(_LUA)
        self._local = MemoryBuckets(rate, burst)

    async def take(self, key: str) -> tuple[bool, int]:
        try:
            allowed, tokens_milli = await self._script(keys=[f"sdserve:ratelimit:{key}"], args=[self.rate, self.burst])
        except Exception as e:  # noqa: BLE001 - any Redis failure falls back to this replica's buckets
            log.warning("redis rate limit unavailable, limiting per replica: %s", e)
            return await self._local.take(key)
        if allowed:
            return True, 0
        return False, max(1, math.ceil((1 - tokens_milli / 1000) / self.rate))


def make_limiter(settings: Settings) -> Limiter | None:
    if not settings.rate_limit_enabled:
        return None
    if settings.redis_url:
        return RedisBuckets(settings.redis_url, settings.rate_limit_rps, settings.rate_limit_burst)
    return MemoryBuckets(settings.rate_limit_rps, settings.rate_limit_burst)
