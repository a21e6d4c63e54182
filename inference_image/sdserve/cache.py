"""Result cache for seeded requests: in-memory LRU or Redis.

The key is a hash of the model, its revision and the canonical request (seed included):
the same key always means the same images. A Redis that is down never fails a request:
the server serves without the cache, logs once per outage and sets
sdserve_cache_backend_up to 0, and tries again after a back-off.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .settings import Settings

from . import metrics

log = logging.getLogger("sdserve.cache")


def cache_key(model: str, revision: str, request: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"model": model, "revision": revision, "request": request}, sort_keys=True, separators=(",", ":")
    )
    return "sdserve:result:" + hashlib.sha256(canonical.encode()).hexdigest()


class Cache(Protocol):
    """Where seeded results are kept: bytes by key. Never raises for a backend outage."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...


class NoCache:
    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes) -> None:
        return None

    async def close(self) -> None:
        return None


class MemoryCache(NoCache):
    """Least recently used entries go past ``max_entries`` or ``max_bytes`` of values; a value
    larger than ``max_bytes`` alone is not kept."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._data: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        metrics.CACHE_UP.set(1)

    async def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        self._bytes += len(value) - len(self._data.pop(key, b""))
        self._data[key] = value
        while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
            self._bytes -= len(self._data.popitem(last=False)[1])


class RedisCache(NoCache):
    RETRY_SECONDS = 5.0

    def __init__(self, url: str, ttl_seconds: int, timeout: float = 0.5):
        import redis.asyncio as aioredis

        self.ttl = ttl_seconds
        self._redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._down_since: float | None = None
        metrics.CACHE_UP.set(1)

    def _usable(self) -> bool:
        return self._down_since is None or time.monotonic() - self._down_since >= self.RETRY_SECONDS

    def _failed(self, e: Exception) -> None:
        metrics.CACHE_ERRORS.inc()
        metrics.CACHE_UP.set(0)
        if self._down_since is None:
            log.warning("redis cache unavailable, serving without the cache: %s", e)
        self._down_since = time.monotonic()

    def _ok(self) -> None:
        if self._down_since is not None:
            log.info("redis cache is back")
        self._down_since = None
        metrics.CACHE_UP.set(1)

    async def get(self, key: str) -> bytes | None:
        if not self._usable():
            return None
        try:
            value = await self._redis.get(key)
        except Exception as e:  # noqa: BLE001 - any backend failure means "no cache"
            self._failed(e)
            return None
        self._ok()
        return value if value is None or isinstance(value, bytes) else value.encode()

    async def set(self, key: str, value: bytes) -> None:
        if not self._usable():
            return
        try:
            await self._redis.set(key, value, ex=self.ttl)
        except Exception as e:  # noqa: BLE001 - any backend failure means "no cache"
            self._failed(e)
            return
        self._ok()

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:  # noqa: BLE001 - closing a dead connection at shutdown is not an error
            pass


def make_cache(settings: Settings) -> Cache:
    if settings.cache_type == "memory":
        return MemoryCache(settings.cache_max_entries, settings.cache_max_bytes)
    if settings.cache_type == "redis" and settings.redis_url:  # Settings requires the URL for redis
        return RedisCache(settings.redis_url, settings.cache_ttl_seconds)
    return NoCache()
