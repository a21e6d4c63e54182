"""Async jobs: ``POST /v1/jobs`` runs a generation in the background and answers 202 at once;
``GET /v1/jobs/{id}`` gives its status, progress (step i of n) and result; ``DELETE`` cancels it
(a queued one at once, a running one at the next step under step batching); ``/events``
streams progress as server-sent events; a webhook, signed, reports the end.

Records live in Redis when the server has one (SDSERVE_CACHE_TYPE=redis), so any replica
answers for any job and a cancel reaches the replica running it (it reads the record once a
second); in memory otherwise. The replica running a job renews a lease on its record while
it runs: a record whose lease ran out (the replica died or restarted) reads as ``failed``,
so no job is left running forever or silently lost. A job belongs to the principal that made
it: another principal gets 404.

A replica that shuts down (a rolling update, a scale-down) finishes what it has queued and
running; with Redis it hands the jobs still waiting for room to the other replicas: their
requests go to the store (``offer``), and any ready replica with room takes them up, oldest
first (``take``), under the same id, so clients polling, streaming or waiting for a webhook
see the job go on. One that no replica takes up within SDSERVE_JOB_HANDOFF_SECONDS reads as
failed (``replica_lost``); without Redis there is no other replica, and it fails with
``draining`` at once. A replica that dies instead (killed, its node lost) hands nothing off:
with Redis every replica looks for jobs whose lease lapsed (``lapsed``) every few seconds; one
that never started is offered again (its request was stored with it), up to
``MAX_ATTEMPTS`` replicas in all, and one that was running fails with ``replica_lost``, its
webhook called, so a client waiting only for the webhook hears of it too.

Webhooks go only to hosts in SDSERVE_WEBHOOK_ALLOWED_HOSTS (an open webhook lets anyone make
the server call inside the cluster). The body is the job as GET shows it; the headers carry
``X-Sdserve-Timestamp`` and ``X-Sdserve-Signature: sha256=HMAC(secret, "{timestamp}.{body}")``
so a receiver can check who sent it and refuse a replay. Failed deliveries are retried with
exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from . import metrics, steps
from .encode import ImageFormat
from .errors import ApiError
from .queue import Draining, Job
from .settings import Settings
from .work import BatchKey

log = logging.getLogger("sdserve.jobs")

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WEBHOOK_ATTEMPTS = 4
#: How often a replica looks for jobs handed off by replicas shutting down.
ADOPT_POLL_SECONDS = 1.0
#: How often it looks for jobs whose replica died (their lease lapsed).
REAP_SECONDS = 5.0
#: Replicas a job that never starts may be given to (one dying under it each time) before it fails.
MAX_ATTEMPTS = 3


@dataclass
class JobRecord:
    id: str
    owner: str
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    created: float = field(default_factory=time.time)
    step: int = 0
    steps: int = 0
    images: list[str] = field(default_factory=list)
    #: response_format "url": the images' keys in object storage (``images`` stays empty), each
    #: presigned anew whenever the job is shown, so a URL is valid for its expiry from then.
    keys: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    lease_until: float = 0.0
    cancel_requested: bool = False
    preview: str | None = None  # a low-resolution PNG (base64) while it runs, when asked for
    output_format: str = "png"  # of its images (the request's output_format)
    revised_prompt: str | None = None  # what the model read of a prompt too long to read whole
    offered: float = 0.0  # when it was handed off (its replica shut down or died); 0 once one took it up
    runner: str = ""  # the replica that runs it (``Jobs.me``); none while offered
    attempts: int = 0  # the replicas that took it, the first included

    @classmethod
    def parse(cls, raw: str | bytes) -> JobRecord:
        """A stored record. Fields this version does not know are left out: during a rolling
        update, replicas of two versions share one Redis and read each other's records."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})

    def lapsed(self, now: float) -> bool:
        return self.status not in TERMINAL and self.lease_until < now

    def public(self, presign: Callable[[str], str] | None = None) -> dict[str, Any]:
        """What GET, the events and the webhook show (never the webhook's secret); ``presign``
        turns the keys of a job answered with URLs into URLs."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "image.job",
            "status": self.status,
            "created": int(self.created),
            "progress": {"step": self.step, "steps": self.steps},
        }
        if self.status == "succeeded":
            if self.keys:  # no URL where the store is no longer configured (the CR dropped it)
                urls = [presign(k) if presign else None for k in self.keys]
                data = [{"url": u, "seed": s} for u, s in zip(urls, self.seeds, strict=True)]
            else:
                data = [{"b64_json": b, "seed": s} for b, s in zip(self.images, self.seeds, strict=True)]
            if self.revised_prompt is not None:
                data = [{**d, "revised_prompt": self.revised_prompt} for d in data]
            out["result"] = {"created": int(time.time()), "data": data, "output_format": self.output_format}
        if self.error:
            out["error"] = self.error
        if self.preview and self.status not in TERMINAL:
            out["preview"] = {"b64_json": self.preview, "step": self.step}
        return out


class JobStore(Protocol):
    async def get(self, job_id: str) -> JobRecord | None: ...

    async def put(self, record: JobRecord, spec: str | None = None) -> None:
        """Store ``record`` (for the jobs' TTL from now); ``spec``: the job's request, kept with
        it until it ends (a ``put`` of its end drops it), for the replica that takes the job up
        if its own goes. Neither is evicted under memory pressure."""
        ...

    async def put_unless_ended(self, record: JobRecord) -> bool:
        """``put``, unless the stored record has ended (or is gone) meanwhile: False then, and
        nothing written. A replica taking up an offered job writes so, not over a cancel."""
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
        """Ids of unfinished jobs whose lease ended before ``now`` (``limit`` at most)."""
        ...

    async def reap(self, record: JobRecord) -> bool:
        """Whether this caller is the one to settle ``record``'s lapse (once per lapse, across
        replicas): its readers and every replica's look may meet it at once."""
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
        for job_id, (_, raw, finished, _) in list(self._data.items()):
            if not finished and JobRecord.parse(raw).lapsed(now):
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

    async def put_unless_ended(self, record: JobRecord) -> bool:
        stored = await self.get(record.id)  # no await between the look and the write
        if stored is None or stored.status in TERMINAL:
            return False
        await self.put(record)
        return True

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
    #: ``lapsed``; a lapse settled (``reap``), briefly.
    OFFERED = "sdserve:jobs:offered"
    SPEC = "sdserve:jobspec:"
    LEASES = "sdserve:jobs:leases"
    REAP = "sdserve:jobs:reap:"
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
        if record.status in TERMINAL:  # nothing left to run or hand off
            pipe.zrem(self.LEASES, record.id)
            pipe.zrem(self.OFFERED, record.id)
            pipe.delete(self.SPEC + record.id)
        else:
            pipe.zadd(self.LEASES, {record.id: record.lease_until})
            if spec is not None:
                pipe.set(self.SPEC + record.id, spec)
        # The owner's index: ids made over two TTLs ago are past (a record lives a TTL after
        # its last write, and a job does not run for a day), and an owner idle that long has no
        # record left: the index goes too.
        owner = self._owner_key(record.owner)
        pipe.zadd(owner, {record.id: record.created}, nx=True)
        pipe.zremrangebyscore(owner, "-inf", now - 2 * self.ttl)
        pipe.expire(owner, 2 * self.ttl)

    async def put_unless_ended(self, record: JobRecord) -> bool:
        """WATCH the record, look, write in a transaction: a write between the look and the
        transaction (a cancel) makes it look again."""
        from redis.exceptions import WatchError

        try:
            for _ in range(5):
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(self.PREFIX + record.id)
                    raw = await pipe.get(self.PREFIX + record.id)
                    if not raw or JobRecord.parse(raw).status in TERMINAL:
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
        return False  # written to again and again: another writer is at it

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


def unavailable(e: Exception) -> ApiError:
    log.warning("job store (redis) unavailable: %s", e)
    return ApiError(503, "job_store_unavailable", "the job store cannot be reached; retry", retry_after=5)


def make_store(s: Settings) -> JobStore:
    if s.cache_type == "redis" and s.redis_url:
        return RedisJobs(s.redis_url, s.job_ttl_seconds)
    return MemoryJobs(s.job_ttl_seconds, s.job_memory_bytes)


def check_webhook(s: Settings, url: str) -> None:
    """422 naming webhook.url unless it is http(s) to an allowed host."""
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("http", "https") or not host:
        raise ApiError(422, "invalid_value", "webhook.url must be an http or https URL", param="webhook.url")
    allowed = [h.strip().lower() for h in s.webhook_allowed_hosts.split(",") if h.strip()]
    if not any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed):
        raise ApiError(
            422,
            "webhook_host_not_allowed",
            f"webhook host {host!r} is not allowed (SDSERVE_WEBHOOK_ALLOWED_HOSTS, spec.webhooks.allowedHosts)",
            param="webhook.url",
        )


def signature(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


SPEC_VERSION = 1


def spec_of(gen: steps.Generation, urls: bool) -> str:
    """A job's request, for the replica that takes it up (``generation_of``): the validated
    generation, with an edit's input image and mask as PNG (lossless: the same pixels)."""
    import base64
    import io

    def png(image: Any) -> str | None:
        if image is None:
            return None
        out = io.BytesIO()
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()

    return json.dumps(
        {
            "v": SPEC_VERSION,
            "key": asdict(gen.key),
            "prompt": gen.prompt,
            "negative_prompt": gen.negative_prompt,
            "n": gen.n,
            "seed": gen.seed,
            "init_image": png(gen.init_image),
            "mask_image": png(gen.mask_image),
            "inputs_digest": gen.inputs_digest,
            "preview": gen.preview,
            "output": asdict(gen.output),
            "principal": gen.principal,
            "urls": urls,
        }
    )


def generation_of(spec: str) -> tuple[steps.Generation, bool]:
    """``spec_of``'s generation and ``urls``, again; ValueError for a spec this version cannot read."""
    import base64
    import io

    from PIL import Image

    try:
        d = json.loads(spec)
        if d.get("v") != SPEC_VERSION:
            raise ValueError(f"spec version {d.get('v')!r}, not {SPEC_VERSION}")
        key = {**d["key"], "loras": tuple((name, weight) for name, weight in d["key"]["loras"])}

        def image(b64: str | None) -> Any:
            if b64 is None:
                return None
            with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
                im.load()
                return im

        gen = steps.Generation(
            key=BatchKey(**key),
            prompt=d["prompt"],
            negative_prompt=d["negative_prompt"],
            n=d["n"],
            seed=d["seed"],
            init_image=image(d["init_image"]),
            mask_image=image(d["mask_image"]),
            inputs_digest=d["inputs_digest"],
            preview=d["preview"],
            output=ImageFormat(**d["output"]),
            principal=d["principal"],
        )
        return gen, bool(d["urls"])
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"cannot read the job's request: {type(e).__name__}: {e}") from e


class Jobs:
    """Runs this replica's jobs, takes up those other replicas hand off, and answers for every
    job in the store."""

    def __init__(self, state: Any, store: JobStore):
        self.state = state
        self.store = store
        self._tasks: set[asyncio.Task[None]] = set()
        self._local: dict[str, JobRecord] = {}  # the jobs this replica runs, for the in-flight gauge
        self._adopter: asyncio.Task[None] | None = None
        #: This replica, in the records of the jobs it runs: a record that names another (or
        #: none, once offered) was given to another replica while this one could not renew it.
        self.me = f"{socket.gethostname()}-{secrets.token_hex(4)}"

    def start(self) -> None:
        """Look for jobs other replicas hand off (with a shared store) from now on."""
        self._adopter = asyncio.get_running_loop().create_task(self._adopt(), name="sdserve-job-adopter")

    def _count(self) -> None:
        for status in ("queued", "running"):
            metrics.JOBS_IN_FLIGHT.labels(status).set(sum(r.status == status for r in self._local.values()))

    async def submit(
        self,
        principal: str,
        gen: steps.Generation,
        webhook: dict[str, str] | None,
        urls: bool = False,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Accept a job and start it; ``urls``: its images go to object storage and it answers
        URLs (response_format "url"), its record holding their keys instead of the images.
        ``idempotency``: (the request's Idempotency-Key, a fingerprint of what it asks for); a
        key seen before (from this principal, within the jobs' TTL) answers its first job, and
        True, instead of starting another; with another request behind it, a 422."""
        steps.admit(self.state)
        gen.principal = principal
        job_id = "job_" + secrets.token_hex(12)
        claimed = None
        if idempotency is not None:
            key, fingerprint = idempotency
            claimed = hashlib.sha256(f"{principal}\0{key}".encode()).hexdigest()
            held = await self.store.claim(claimed, f"{job_id} {fingerprint}")
            if held is not None:
                return await self._replay(principal, key, fingerprint, held), True
        try:
            record = await self._accept(job_id, principal, gen, webhook, urls)
        except BaseException:  # refused or not stored: the key stays free for a retry
            if claimed is not None:
                with contextlib.suppress(Exception):
                    await self.store.release(claimed)
            raise
        metrics.JOBS.labels("submitted").inc()
        self._launch(record, gen, urls)
        return record, False

    def _launch(self, record: JobRecord, gen: steps.Generation, urls: bool) -> None:
        self._local[record.id] = record
        self._count()
        task = asyncio.get_running_loop().create_task(self._run(record, gen, urls), name=f"sdserve-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(
        self, job_id: str, principal: str, gen: steps.Generation, webhook: dict[str, str] | None, urls: bool
    ) -> JobRecord:
        """The new job's record, stored; 429 past ``job_queue_size`` unfinished jobs."""
        limit = self.state.settings.job_queue_size
        if len(self._local) >= limit:
            metrics.REJECTED.labels("jobs_full").inc()
            raise ApiError(
                429,
                "too_many_jobs",
                f"this replica holds {limit} unfinished jobs; retry later",
                retry_after=max(1, self.state.batcher.retry_after()),
                type_="rate_limit_error",
            )
        record = JobRecord(
            id=job_id,
            owner=principal,
            steps=gen.key.denoising_steps,
            output_format=gen.output.kind,
            revised_prompt=await steps.prompt_read(self.state, gen),
            runner=self.me,
            attempts=1,
        )
        if webhook:
            record.webhook_url, record.webhook_secret = webhook["url"], webhook.get("secret") or ""
        record.lease_until = time.time() + self.state.settings.job_lease_seconds
        spec = None
        if self.store.shared:  # another replica can run it if this one dies before it starts
            # An edit's images are PNG-encoded: off the event loop.
            spec = await asyncio.to_thread(spec_of, gen, urls)
        await self.store.put(record, spec)
        return record

    async def _replay(self, principal: str, key: str, fingerprint: str, held: str) -> JobRecord:
        """The job an Idempotency-Key was first used for. Its record may be a moment from being
        written (the first request is still in ``submit``): looked for for a second or two."""
        job_id, _, first = held.partition(" ")
        if first != fingerprint:
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"Idempotency-Key {key!r} was used for another request (job {job_id}); use a new key",
                param="Idempotency-Key",
            )
        tries = 0
        while True:
            try:
                return await self.get(principal, job_id)
            except ApiError as e:
                tries += 1
                if e.status != 404 or tries >= 20:
                    raise
            await asyncio.sleep(0.1)

    async def get(self, principal: str, job_id: str) -> JobRecord:
        """The caller's job (404 for another principal's, as for one that does not exist)."""
        record = await self.store.get(job_id)
        if record is None or not hmac.compare_digest(record.owner, principal):
            raise ApiError(404, "job_not_found", f"no job {job_id!r}", param="id")
        return await self._settled(record)

    async def _settled(self, record: JobRecord) -> JobRecord:
        """A record whose lease lapsed (its replica died, or one that shut down handed it off
        and none took it up) is settled by the first to read it: a job that never started, on
        a shared store, is offered to the replicas again (``MAX_ATTEMPTS`` replicas in all);
        any other is the failed job it is (``replica_lost``), written so and its webhook called.
        Neither is written over an end stored meanwhile (a cancel): that end is the answer."""
        now = time.time()
        if record.lapsed(now) and await self.store.reap(record):
            if (
                self.store.shared
                and record.status == "queued"
                and not record.offered
                and record.attempts < MAX_ATTEMPTS
            ):
                if not await self._offer(record):
                    return (await self.store.get(record.id)) or record
                log.warning("job %s offered again: its replica stopped renewing it before it started", record.id)
                return record
            record.status = "failed"
            message = "the replica running this job stopped before it finished; submit it again"
            if record.offered:
                message = (
                    f"no replica took this job up within {self.state.settings.job_handoff_seconds:g} s of its "
                    "replica shutting down; submit it again"
                )
            record.error = {"code": "replica_lost", "message": message}
            return await self._end_elsewhere(record)
        return record

    async def page(self, principal: str, limit: int, after: str | None) -> dict[str, Any]:
        """The caller's jobs, newest first, ``limit`` a page, the next page ``after`` the last
        id of this one. Without results (images): each is one GET away."""
        before = float("inf")
        if after is not None:
            before = (await self.get(principal, after)).created
        records = await self.store.owned(principal, before, limit + 1)
        page = [await self._settled(r) for r in records[:limit]]
        views = [{k: v for k, v in r.public().items() if k not in ("result", "preview")} for r in page]
        return {
            "object": "list",
            "data": views,
            "first_id": views[0]["id"] if views else None,
            "last_id": views[-1]["id"] if views else None,
            "has_more": len(records) > limit,
        }

    async def cancel(self, principal: str, job_id: str) -> JobRecord:
        record = await self.get(principal, job_id)
        if record.status in TERMINAL:
            return record
        record.cancel_requested = True  # the replica running it reads this within a second
        if record.offered or record.lapsed(time.time()):
            # No replica holds it (handed off, or its replica gone and another settling it):
            # cancelled here. ``_take_up`` and ``_settled`` write nothing over it.
            record.status = "cancelled"
            return await self._end_elsewhere(record)
        await self.store.put(record)
        return record

    def view(self, record: JobRecord) -> dict[str, Any]:
        """A job as clients see it, a result's URLs presigned now."""
        outputs = self.state.outputs
        return record.public(outputs.presign if outputs is not None else None)

    async def _run(self, record: JobRecord, gen: steps.Generation, urls: bool) -> None:
        try:
            await self._execute(record, gen, urls)
        finally:
            self._local.pop(record.id, None)
            self._count()

    async def _execute(self, record: JobRecord, gen: steps.Generation, urls: bool) -> None:
        """Run the job, its progress and lease written once a second. An outage of the store
        (Redis restarting) does not fail it: the job runs on and writes at the next poll that
        reaches the store. If its lease ran out meanwhile and a reader was told ``replica_lost``,
        that answer stands: the job stops, as a cancelled one does, and writes nothing."""
        state = self.state
        ended_elsewhere = False
        try:
            queued: list[Job] = []  # the request path's job, once it is in the queue (not on a cache hit)

            async def poll() -> bool:
                """Progress and lease into the store; True once a cancel was asked for."""
                nonlocal ended_elsewhere
                try:
                    fresh = await self.store.get(record.id)
                except ApiError:  # unreachable for now (logged): the next poll tries again
                    return False
                if fresh is not None and self._elsewhere(fresh):
                    ended_elsewhere = True
                    return True
                if queued:  # not after a cache hit, whose result came without a queue
                    job = queued[0]
                    record.status = "running" if job.started else "queued"
                    record.step = job.item.progress
                    if job.item.preview:
                        record.preview = await asyncio.to_thread(job.item.preview_png)
                record.lease_until = time.time() + state.settings.job_lease_seconds
                record.cancel_requested = bool(fresh and fresh.cancel_requested)
                self._count()
                with contextlib.suppress(ApiError):
                    await self.store.put(record)
                return record.cancel_requested

            result = await steps.generate(state, gen, poll, queued.append, patient=True)
            if urls:
                record.keys = await self._upload(result.images, gen.output, poll)
            else:
                record.images = result.images
            record.seeds = result.seeds
            record.status, record.step = "succeeded", gen.key.denoising_steps
        except Draining:  # this replica began shutting down before the job reached its queue
            if await self._hand_off(record):
                return
            e = steps.draining_error()
            record.status, record.error = "failed", {"code": e.code, "message": e.message}
        except ApiError as e:
            if ended_elsewhere:
                log.warning(
                    "job %s was reported lost or given to another replica while this one could not renew it: stopped",
                    record.id,
                )
                return
            cancelled = e.status == 499 or record.cancel_requested
            record.status = "cancelled" if cancelled else "failed"
            record.error = None if cancelled else {"code": e.code, "message": e.message}
        except Exception as e:
            log.exception("job %s failed", record.id)
            record.status, record.error = "failed", {"code": "generation_failed", "message": f"{type(e).__name__}: {e}"}
        metrics.JOBS.labels(record.status).inc()
        if not await self._store_end(record) and record.webhook_url:
            await self._deliver(record)  # with the store unreachable too: the webhook still has the images

    def _elsewhere(self, fresh: JobRecord) -> bool:
        """Whether the stored record of a job this replica runs says it is not this replica's
        to finish: ended (reported lost, or cancelled while no replica held it), or given to
        another replica while this one could not renew its lease."""
        return fresh.status in TERMINAL or bool(fresh.offered) or fresh.runner not in ("", self.me)

    async def _upload(self, images: list[str], fmt: ImageFormat, poll: Callable[[], Awaitable[bool]]) -> list[str]:
        """A URL job's images stored, their keys. An image store that cannot be reached is
        retried for ``job_storage_retry_seconds``, the job's lease renewed every second all the
        while (a reader sees it running); then the job fails with storage_unavailable."""

        async def retried() -> list[str]:
            deadline = time.monotonic() + self.state.settings.job_storage_retry_seconds
            delay = 0.5
            while True:
                try:
                    return list(await self.state.outputs.store(images, fmt))
                except ApiError:
                    if time.monotonic() + delay > deadline:
                        raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

        keys: list[str] = await self._renewed(retried(), poll)
        return keys

    @staticmethod
    async def _renewed(aw: Awaitable[Any], poll: Callable[[], Awaitable[bool]]) -> Any:
        """``aw``'s result, the job's progress and lease written every second meanwhile (as
        while it is generated); a cancel asked for meanwhile ends the job (499)."""
        task = asyncio.ensure_future(aw)
        try:
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                if await poll():
                    raise ApiError(499, "cancelled", "the job was cancelled while its images were being stored")
            return task.result()
        finally:
            task.cancel()

    async def _store_end(self, record: JobRecord) -> bool:
        """Write a job's end, retried through a store outage for as long as its lease would have
        lasted (after that, readers see ``replica_lost``). True when a reader was told the job
        was lost in the meantime: that answer stands, and nothing is written or reported."""
        deadline = time.monotonic() + self.state.settings.job_lease_seconds
        delay = 0.1
        while True:
            try:
                fresh = await self.store.get(record.id)
                if fresh is not None and self._elsewhere(fresh):
                    log.warning("job %s was reported %s before its end could be stored", record.id, fresh.status)
                    return True
                await self.store.put(record)
                return False
            except ApiError:
                if time.monotonic() + delay > deadline:
                    log.error("could not store the end of job %s: the job store stayed unreachable", record.id)
                    return False
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def _deliver(self, record: JobRecord) -> None:
        import httpx

        assert record.webhook_url is not None
        try:  # as allowed now: another replica took the job, or the allowed hosts changed since
            check_webhook(self.state.settings, record.webhook_url)
        except ApiError as e:
            metrics.WEBHOOKS.labels("failed").inc()
            log.warning("webhook of %s not called: %s", record.id, e.message)
            return
        body = json.dumps(self.view(record)).encode()
        delay = self.state.settings.webhook_backoff_seconds
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            for attempt in range(WEBHOOK_ATTEMPTS):
                ts = str(int(time.time()))
                headers = {
                    "content-type": "application/json",
                    "x-sdserve-job-id": record.id,
                    "x-sdserve-timestamp": ts,
                    "x-sdserve-signature": signature(record.webhook_secret or "", ts, body),
                }
                try:
                    r = await client.post(record.webhook_url, content=body, headers=headers)
                    if 200 <= r.status_code < 300:
                        metrics.WEBHOOKS.labels("delivered").inc()
                        return
                    problem = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    problem = f"{type(e).__name__}: {e}"
                metrics.WEBHOOKS.labels("retried" if attempt + 1 < WEBHOOK_ATTEMPTS else "failed").inc()
                log.warning("webhook of %s, attempt %d: %s", record.id, attempt + 1, problem)
                await asyncio.sleep(delay * 2**attempt)

    async def _hand_off(self, record: JobRecord) -> bool:
        """Offer a job this replica will not run to the replicas sharing its store (its request
        was stored when it was accepted): the record, still queued, is kept for
        ``job_handoff_seconds``. False without a shared store, or when the store cannot be
        reached (the job then fails)."""
        if not self.store.shared:
            return False
        record.status, record.step, record.preview = "queued", 0, None
        try:
            fresh = await self.store.get(record.id)
            if fresh is not None and self._elsewhere(fresh):
                return True  # reported lost, cancelled or given to another meanwhile: that stands
            record.cancel_requested = bool(fresh and fresh.cancel_requested)
            if not await self._offer(record):
                return True  # ended meanwhile: that stands
        except ApiError:
            return False
        log.info("job %s handed off: this replica is shutting down before it could queue it", record.id)
        return True

    async def _offer(self, record: JobRecord) -> bool:
        """Offer a job to the replicas sharing the store (a hand-off at a drain, or a lapse of
        a job that never started): no runner, kept ``job_handoff_seconds``. False, and nothing
        written or offered, when an end was stored meanwhile."""
        record.runner, record.offered = "", time.time()
        record.lease_until = record.offered + self.state.settings.job_handoff_seconds
        if not await self.store.put_unless_ended(record):
            return False
        await self.store.offer(record.id, record.created)
        metrics.JOBS.labels("handed_off").inc()
        return True

    async def _adopt(self) -> None:
        """Every second: take up jobs handed off (their replica shut down or died), oldest first, while
        this one is ready and has room to queue them soon (fewer than half its queue waiting,
        as ``steps.enqueue_when_room`` lets in) and below ``job_queue_size`` jobs. Every
        ``REAP_SECONDS``: settle jobs whose lease lapsed (``_settled``), their replica dead."""
        reaped = time.monotonic()
        while True:
            await asyncio.sleep(ADOPT_POLL_SECONDS)
            try:
                if self.store.shared and time.monotonic() - reaped >= REAP_SECONDS:
                    reaped = time.monotonic()
                    for job_id in await self.store.lapsed(time.time(), 100):
                        if (record := await self.store.get(job_id)) is not None:
                            await self._settled(record)
                while self.store.shared and self._room_to_adopt():
                    taken = await self.store.take()
                    if taken is None:
                        break
                    await self._take_up(*taken)
                if self.store.shared:
                    metrics.JOBS_OFFERED.set(await self.store.offered())
            except ApiError:
                pass  # the store unreachable (logged): the next look tries again
            except Exception:
                log.exception("taking up handed-off jobs failed")

    def _room_to_adopt(self) -> bool:
        s, batcher = self.state.settings, self.state.batcher
        return self.state.ready and len(self._local) < s.job_queue_size and batcher.waiting < max(1, s.queue_size // 2)

    async def _take_up(self, job_id: str, spec: str) -> None:
        record = await self.store.get(job_id)
        if record is None or record.status in TERMINAL:
            return  # cancelled (or gone) while it waited for a replica
        if record.lapsed(time.time()):  # offered for longer than job_handoff_seconds: lost
            await self._settled(record)
            return
        try:
            if not spec:
                raise ValueError(
                    "its request was not stored (by a replica of an older version) or was evicted from Redis"
                )
            gen, urls = await asyncio.to_thread(generation_of, spec)  # decodes an edit's images
        except ValueError as e:  # not kept, or kept by a replica of another version (a rolling update)
            record.status, record.error = "failed", {"code": "replica_lost", "message": f"{e}; submit it again"}
            await self._end_elsewhere(record)
            return
        record.offered, record.runner, record.attempts = 0.0, self.me, record.attempts + 1
        record.lease_until = time.time() + self.state.settings.job_lease_seconds
        if not await self.store.put_unless_ended(record):
            return  # cancelled (or reported lost) since it was read: that stands
        metrics.JOBS.labels("adopted").inc()
        log.info("took up job %s, handed off when its replica shut down or died", job_id)
        self._launch(record, gen, urls)

    async def _end_elsewhere(self, record: JobRecord) -> JobRecord:
        """Store, count and report the end of a job no replica holds (cancelled or failed
        while offered, or lost), as the replica running it would; unless an end was stored
        meanwhile: that one is the answer, and is returned."""
        if not await self.store.put_unless_ended(record):
            return (await self.store.get(record.id)) or record
        metrics.JOBS.labels(record.status).inc()
        self._report(record)
        return record

    def _report(self, record: JobRecord) -> None:
        """Its webhook, if it has one, called in the background (a drain waits for it)."""
        if record.webhook_url:
            task = asyncio.get_running_loop().create_task(self._deliver(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def runs(self, job_id: str) -> bool:
        """Whether this replica runs the job (its record may be in a store the replicas share)."""
        return job_id in self._local

    async def drain(self, seconds: float) -> bool:
        """Wait until this replica's jobs have ended (result stored, webhook delivered or given
        up), ``seconds`` at most: after the model's part, a job still writes its end."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=seconds)
        return not self._tasks

    async def stop(self) -> None:
        if self._adopter is not None:
            self._adopter.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
