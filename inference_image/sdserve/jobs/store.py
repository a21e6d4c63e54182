"""Where job records live: the protocol both stores keep, this replica's memory (no Redis),
and the choice between it and Redis (``redisstore``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Protocol

from ..settings import Settings
from .record import TERMINAL, JobRecord, unless_ended
from .redisstore import RedisJobs


class JobStore(Protocol):
    async def get(self, job_id: str) -> JobRecord | None: ...

    async def put(self, record: JobRecord, spec: str | None = None) -> None:
        """Store ``record`` (for the jobs' TTL from now); ``spec``: the job's request, kept with
        it until it ends (a ``put`` of its end drops it), for the replica that takes the job up
        if its own goes. Neither is evicted under memory pressure."""
        ...

    async def update(self, job_id: str, change: Callable[[JobRecord | None], JobRecord | None]) -> bool:
        """Write what ``change`` makes of the stored record (None when there is none), looked
        at and written in one step: nothing is written between the look and the write (Redis:
        WATCH and MULTI, looking again when another write came between). A ``change`` that
        returns None writes nothing: False. Every write that depends on what is stored now
        (a cancel, a runner's progress, a take-up) goes through it; a job's first write does not."""
        ...

    async def put_unless_ended(self, record: JobRecord) -> bool:
        """``put``, unless the stored record has ended (or is gone) meanwhile: False then, and
        nothing written; a cancel asked for meanwhile is kept (``keeping_cancel``). A replica
        taking up an offered job writes so, not over a cancel."""
        ...

    async def claim(self, name: str, value: str) -> str | None:
        """Set ``name`` to ``value`` for the jobs' TTL unless it is set: None when this call set
        it, else the value already there (an Idempotency-Key's job)."""
        ...

    async def release(self, name: str) -> None:
        """Forget a claim whose job was not made."""
        ...

    async def owned(self, owner: str, before: float, limit: int) -> list[JobRecord]:
        """``owner``'s records created before ``before``, newest first, ``limit`` at most."""
        ...

    #: Whether other replicas use this store too (Redis): only then is a job handed off.
    shared: bool

    async def offer(self, job_id: str, created: float) -> None:
        """Hand a job to whichever replica takes it next."""
        ...

    async def offered(self) -> int:
        """How many jobs are offered and not taken yet."""
        ...

    async def take(self) -> tuple[str, str] | None:
        """The oldest job offered (by ``created``): its id and stored request ("" when there
        is none), gone from the offers so that no other replica takes it too; None when none
        is offered."""
        ...

    async def lapsed(self, now: float, limit: int) -> list[str]:
        """Ids of jobs whose lease ended before ``now`` (``limit`` at most): unfinished ones,
        and ended ones whose webhook is due (``JobRecord.leased``)."""
        ...

    async def reap(self, record: JobRecord) -> bool:
        """Whether this caller is the one to settle ``record``'s lapse (once per lapse, across
        replicas): its readers and every replica's look may meet it at once."""
        ...

    async def beat(self, replica: str, now: float, ttl: float) -> int:
        """Mark ``replica`` alive at ``now``; how many replicas are alive (marked within the
        last ``ttl`` seconds), this one included."""
        ...

    async def leave(self, replica: str) -> None:
        """``replica`` is no longer counted alive (it is shutting down)."""
        ...


class MemoryJobs:
    """This replica's jobs, each kept ``ttl_seconds`` after its last write, as Redis keeps
    them, and ``max_bytes`` of records at most: a record holds its images, and a store that
    kept every job for a day would grow until the pod is killed for memory (losing them all).
    Past the bound the oldest finished records go first; a queued or running one stays."""

    def __init__(self, ttl_seconds: float, max_bytes: int = 1024 * 2**20, shared: bool = False) -> None:
        """``shared``: apps in one process share it as replicas share Redis (tests)."""
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self.shared = shared
        #: Jobs offered: id -> created; requests kept: id -> spec; lapses settled: (id, lease).
        self._offered: dict[str, float] = {}
        self._specs: dict[str, str] = {}
        self._reaped: set[tuple[str, float]] = set()
        #: Replicas alive: name -> last beat.
        self._replicas: dict[str, float] = {}
        self._bytes = 0
        #: id -> (expiry, record, finished, owner), oldest write first.
        self._data: dict[str, tuple[float, str, bool, str]] = {}
        #: Idempotency keys: name -> (expiry, value), oldest first.
        self._claims: dict[str, tuple[float, str]] = {}
        #: owner -> {id: created}, for listing.
        self._by_owner: dict[str, dict[str, float]] = {}

    async def claim(self, name: str, value: str) -> str | None:
        now = time.monotonic()
        while self._claims and next(iter(self._claims.values()))[0] <= now:
            self._claims.pop(next(iter(self._claims)))
        held = self._claims.get(name)
        if held is not None:
            return held[1]
        self._claims[name] = (now + self.ttl, value)
        return None

    async def release(self, name: str) -> None:
        self._claims.pop(name, None)

    async def offer(self, job_id: str, created: float) -> None:
        self._offered[job_id] = created

    async def offered(self) -> int:
        return len(self._offered)

    async def take(self) -> tuple[str, str] | None:
        if not self._offered:
            return None
        job_id = min(self._offered, key=self._offered.__getitem__)
        del self._offered[job_id]
        return job_id, self._specs.get(job_id, "")

    async def lapsed(self, now: float, limit: int) -> list[str]:
        out = []
        for job_id, (_, raw, _, _) in list(self._data.items()):  # every record parsed: tests only
            record = JobRecord.parse(raw)
            if record.leased() and record.lease_until < now:
                out.append(job_id)
                if len(out) == limit:
                    break
        return out

    async def reap(self, record: JobRecord) -> bool:
        mark = (record.id, record.lease_until)
        if mark in self._reaped:
            return False
        self._reaped.add(mark)
        return True

    async def beat(self, replica: str, now: float, ttl: float) -> int:
        self._replicas[replica] = now
        self._replicas = {r: t for r, t in self._replicas.items() if t >= now - ttl}  # as Redis: older goes
        return len(self._replicas)

    async def leave(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    async def get(self, job_id: str) -> JobRecord | None:
        expires, raw, _, _ = self._data.get(job_id, (0.0, "", False, ""))
        return JobRecord.parse(raw) if raw and expires > time.monotonic() else None

    async def put(self, record: JobRecord, spec: str | None = None) -> None:
        now = time.monotonic()
        self._drop(record.id)  # to the end: the dict stays in order of expiry
        raw = json.dumps(asdict(record))
        self._data[record.id] = (now + self.ttl, raw, record.status in TERMINAL, record.owner)
        if record.status in TERMINAL:  # nothing left to run or hand off
            self._specs.pop(record.id, None)
            self._offered.pop(record.id, None)
        elif spec is not None:
            self._specs[record.id] = spec
        self._by_owner.setdefault(record.owner, {})[record.id] = record.created
        self._bytes += len(raw)
        while True:  # expired records go, oldest write first; the one just written stops it
            oldest = next(iter(self._data))
            if self._data[oldest][0] > now:
                break
            self._drop(oldest)
            self._specs.pop(oldest, None)  # an unfinished job's request and offer go with it
            self._offered.pop(oldest, None)
        if self._bytes > self.max_bytes:  # then the oldest finished ones, while over the bound
            for job_id in [i for i, (_, _, finished, _) in self._data.items() if finished and i != record.id]:
                self._drop(job_id)
                if self._bytes <= self.max_bytes:
                    break

    async def update(self, job_id: str, change: Callable[[JobRecord | None], JobRecord | None]) -> bool:
        record = change(await self.get(job_id))  # nothing runs between the look and the write
        if record is None:
            return False
        await self.put(record)
        return True

    async def put_unless_ended(self, record: JobRecord) -> bool:
        return await self.update(record.id, unless_ended(record))

    def _drop(self, job_id: str) -> None:
        gone = self._data.pop(job_id, None)
        if gone is not None:
            self._bytes -= len(gone[1])
            owner = gone[3]
            self._by_owner.get(owner, {}).pop(job_id, None)
            if not self._by_owner.get(owner, True):
                del self._by_owner[owner]

    async def owned(self, owner: str, before: float, limit: int) -> list[JobRecord]:
        ids = sorted(self._by_owner.get(owner, {}).items(), key=lambda item: item[1], reverse=True)
        out = []
        for job_id, created in ids:
            if created < before and (record := await self.get(job_id)) is not None:
                out.append(record)
                if len(out) == limit:
                    break
        return out


def make_store(s: Settings) -> JobStore:
    if s.cache_type == "redis" and s.redis_url:
        return RedisJobs(s.redis_url, s.job_ttl_seconds)
    return MemoryJobs(s.job_ttl_seconds, s.job_memory_bytes)
