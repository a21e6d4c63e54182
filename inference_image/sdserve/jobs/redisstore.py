"""Job records in the Redis the replicas share."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ..errors import ApiError
from .record import TERMINAL, JobRecord, unless_ended

log = logging.getLogger("sdserve.jobs")


class RedisJobs:
    """Records as Redis keys without an expiry, their expiry times in one sorted set. A Redis
    that evicts only keys with an expiry under memory pressure (``volatile-lru``: the managed
    Redis's policy) then evicts result-cache entries and rate-limit buckets, never an accepted
    job; with no such key left, a write fails (a retryable 503) instead. Each write deletes
    records past their time (``CLEANUP`` at most), whichever replica made them."""

    PREFIX = "sdserve:job:"
    EXPIRY = "sdserve:jobs:expiry"
    CLAIM = "sdserve:jobkey:"
    #: Idempotency claims, like records, have no Redis expiry (under memory pressure an evicted
    #: claim would let a retry make a second job): their expiry times are kept here, and each
    #: claim deletes those past it (``CLEANUP`` at most).
    CLAIMS = "sdserve:jobkeys:expiry"
    #: ``claim``: SET NX and its expiry, or the value held, in one step.
    CLAIM_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return false
end
return redis.call('GET', KEYS[1])
"""
    #: One sorted set per owner (its name hashed): job ids by creation time, for listing. An id
    #: whose record has gone is dropped from it when a listing meets it, or two TTLs after it
    #: was made; the set expires two TTLs after the owner's last write (it may be evicted under
    #: memory pressure before then: a listing then misses jobs, their records stay).
    OWNER = "sdserve:jobs:owner:"
    #: Jobs handed off (``offer``), by creation time; each unfinished job's request, like its
    #: record without a Redis expiry (deleted with it); unfinished jobs by lease end, for
    #: ``lapsed`` (and ended ones whose webhook is being delivered); a lapse settled (``reap``),
    #: briefly.
    OFFERED = "sdserve:jobs:offered"
    SPEC = "sdserve:jobspec:"
    LEASES = "sdserve:jobs:leases"
    REAP = "sdserve:jobs:reap:"
    #: Replicas alive, by last beat (``beat``).
    REPLICAS = "sdserve:replicas"
    CLEANUP = 100
    shared = True
    #: ``take``: pop the oldest offer and read its request in one step (a script runs atomically).
    TAKE = """
local popped = redis.call('ZPOPMIN', KEYS[1])
if #popped == 0 then return false end
local spec = redis.call('GET', ARGV[1] .. popped[1])
return {popped[1], spec or ''}
"""

    def __init__(self, url: str, ttl_seconds: int):
        import redis.asyncio as aioredis

        self.ttl = ttl_seconds
        self._redis = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    async def get(self, job_id: str) -> JobRecord | None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self.PREFIX + job_id)
                pipe.zscore(self.EXPIRY, job_id)
                raw, expires = await pipe.execute()
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e
        return self._live(raw, expires)

    @staticmethod
    def _live(raw: bytes | str | None, expires: float | None) -> JobRecord | None:
        """A stored record, unless there is none or it is past its time (not yet cleaned up)."""
        if not raw or (expires is not None and expires < time.time()):
            return None
        return JobRecord.parse(raw)

    async def put(self, record: JobRecord, spec: str | None = None) -> None:
        now = time.time()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                self._write(pipe, record, now, spec)
                await pipe.execute()
            expired = await self._redis.zrangebyscore(self.EXPIRY, "-inf", now, start=0, num=self.CLEANUP)
            if expired:
                ids = [i.decode() for i in expired if isinstance(i, bytes)]  # ids, as bytes
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.delete(*(self.PREFIX + i for i in ids), *(self.SPEC + i for i in ids))
                    pipe.zrem(self.EXPIRY, *ids)
                    pipe.zrem(self.OFFERED, *ids)
                    pipe.zrem(self.LEASES, *ids)
                    await pipe.execute()
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e

    def _write(self, pipe: Any, record: JobRecord, now: float, spec: str | None = None) -> None:
        """A record's writes, into a transaction: the record, its expiry, its lease and request
        (or, ended, its lease, offer and request gone), its owner's index."""
        pipe.set(self.PREFIX + record.id, json.dumps(asdict(record)))
        pipe.zadd(self.EXPIRY, {record.id: now + self.ttl})
        if record.leased():  # running, or its webhook being delivered: ``lapsed`` finds it
            pipe.zadd(self.LEASES, {record.id: record.lease_until})
        else:
            pipe.zrem(self.LEASES, record.id)
        if record.status in TERMINAL:  # nothing left to run or hand off
            pipe.zrem(self.OFFERED, record.id)
            pipe.delete(self.SPEC + record.id)
        elif spec is not None:
            pipe.set(self.SPEC + record.id, spec)
        # The owner's index: ids made over two TTLs ago are past (a record lives a TTL after
        # its last write, and a job does not run for a day), and an owner idle that long has no
        # record left: the index goes too.
        owner = self._owner_key(record.owner)
        pipe.zadd(owner, {record.id: record.created}, nx=True)
        pipe.zremrangebyscore(owner, "-inf", now - 2 * self.ttl)
        pipe.expire(owner, 2 * self.ttl)

    async def update(self, job_id: str, change: Callable[[JobRecord | None], JobRecord | None]) -> bool:
        """WATCH the record, look, write what ``change`` makes of it in a transaction: a write
        between the look and the transaction (a cancel, the runner's progress) makes it look
        again. A ``change`` that returns None writes nothing: False."""
        from redis.exceptions import WatchError

        key = self.PREFIX + job_id
        try:
            for _ in range(5):
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    expires = await pipe.zscore(self.EXPIRY, job_id)
                    record = change(self._live(raw, expires))
                    if record is None:
                        return False
                    pipe.multi()
                    self._write(pipe, record, time.time())
                    try:
                        await pipe.execute()
                        return True
                    except WatchError:
                        continue
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e
        raise unavailable(RuntimeError(f"job {job_id} was written to again and again meanwhile"))

    async def put_unless_ended(self, record: JobRecord) -> bool:
        return await self.update(record.id, unless_ended(record))

    def _owner_key(self, owner: str) -> str:
        return self.OWNER + hashlib.sha256(owner.encode()).hexdigest()

    async def owned(self, owner: str, before: float, limit: int) -> list[JobRecord]:
        key = self._owner_key(owner)
        out: list[JobRecord] = []
        try:
            while len(out) < limit:
                rows: Any = await self._redis.zrevrangebyscore(
                    key, f"({before}", "-inf", start=0, num=limit, withscores=True
                )
                if not rows:
                    break
                gone = []
                for raw_id, created in rows:
                    job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                    record = await self.get(job_id)
                    if record is None:
                        gone.append(job_id)
                    elif len(out) < limit:
                        out.append(record)
                    before = float(created)
                if gone:
                    await self._redis.zrem(key, *gone)
        except ApiError:
            raise
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e
        return out

    async def claim(self, name: str, value: str) -> str | None:
        """SET NX, its expiry (the jobs' TTL) kept in ``CLAIMS``: atomic across replicas, and
        never evicted. Claims past their time go first (this one, if it is)."""
        now = time.time()
        try:
            past: Any = await self._redis.zrangebyscore(self.CLAIMS, "-inf", now, start=0, num=self.CLEANUP)
            if past:
                names = [p.decode() if isinstance(p, bytes) else str(p) for p in past]
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.delete(*(self.CLAIM + n for n in names))
                    pipe.zrem(self.CLAIMS, *names)
                    await pipe.execute()
            held: Any = await self._redis.eval(
                self.CLAIM_SCRIPT, 2, self.CLAIM + name, self.CLAIMS, value, now + self.ttl, name
            )
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e
        if not held:
            return None
        return held.decode() if isinstance(held, bytes) else str(held)

    async def release(self, name: str) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.CLAIM + name)
                pipe.zrem(self.CLAIMS, name)
                await pipe.execute()
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e

    async def offer(self, job_id: str, created: float) -> None:
        try:
            await self._redis.zadd(self.OFFERED, {job_id: created})
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e

    async def offered(self) -> int:
        try:
            return int(await self._redis.zcard(self.OFFERED))
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e

    async def take(self) -> tuple[str, str] | None:
        try:
            taken: Any = await self._redis.eval(self.TAKE, 1, self.OFFERED, self.SPEC)
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e
        if not taken:
            return None
        job_id, spec = (v.decode() if isinstance(v, bytes) else str(v) for v in taken)
        return job_id, spec

    async def lapsed(self, now: float, limit: int) -> list[str]:
        try:
            ids: Any = await self._redis.zrangebyscore(self.LEASES, "-inf", f"({now}", start=0, num=limit)
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def reap(self, record: JobRecord) -> bool:
        """SET NX of the record's id and lease end: one caller per lapse, whichever replica. A
        minute is enough: settled, the record has another lease end or has ended; a settling
        that failed (Redis went away) is taken up again after it."""
        try:
            return bool(await self._redis.set(f"{self.REAP}{record.id}:{record.lease_until}", 1, nx=True, ex=60))
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e

    async def beat(self, replica: str, now: float, ttl: float) -> int:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(self.REPLICAS, {replica: now})
                pipe.zremrangebyscore(self.REPLICAS, "-inf", f"({now - ttl}")
                pipe.zcard(self.REPLICAS)
                *_, alive = await pipe.execute()
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e
        return int(alive)

    async def leave(self, replica: str) -> None:
        try:
            await self._redis.zrem(self.REPLICAS, replica)
        except Exception as e:  # any Redis failure is the same retryable 503
            raise unavailable(e) from e


def unavailable(e: Exception) -> ApiError:
    log.warning("job store (redis) unavailable: %s", e)
    return ApiError(503, "job_store_unavailable", "the job store cannot be reached; retry", retry_after=5)
