"""``Jobs``: accepts jobs, runs this replica's, hands off and takes up waiting ones, answers
for every job in the store."""

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
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from .. import metrics, steps
from ..encode import ImageFormat
from ..errors import ApiError
from ..queue import Draining, Job
from .record import TERMINAL, JobRecord, keeping_cancel
from .spec import generation_of, spec_of
from .store import JobStore
from .webhook import WEBHOOK_ATTEMPTS, WEBHOOK_TIMEOUT_SECONDS, attempt, check_webhook

log = logging.getLogger("sdserve.jobs")

#: How often a replica looks for jobs handed off by replicas shutting down.
ADOPT_POLL_SECONDS = 1.0
#: How often it looks for jobs whose replica died (their lease lapsed).
REAP_SECONDS = 5.0
#: A replica that has not said it is alive for this long is not counted in the jobs offered's shares.
ALIVE_SECONDS = 3 * ADOPT_POLL_SECONDS
#: Replicas a job may be given to (one dying under it, or handing it off, each time) before it fails.
MAX_ATTEMPTS = 3
#: Times a job whose replica died while running it is run again from its first step. A node
#: lost (a spot GPU reclaimed, a kernel fault) should not cost the client its job; a job that
#: is itself what kills its replicas (host memory, a driver fault) should not take down more
#: than one more. The next death while it runs fails it (``replica_lost``).
MAX_LOST_RUNS = 1


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
        a shared store, is offered to the replicas again (``MAX_ATTEMPTS`` replicas in all),
        and so is one that was running, to start again from its first step, once
        (``MAX_LOST_RUNS``); any other is the failed job it is (``replica_lost``), written so
        and its webhook called. Neither is written over an end stored meanwhile (a cancel):
        that end is the answer."""
        now = time.time()
        if record.lapsed(now) and await self.store.reap(record):
            running = record.status == "running"
            if (
                self.store.shared
                and not record.offered
                and record.attempts < MAX_ATTEMPTS
                and (not running or record.lost_runs < MAX_LOST_RUNS)
            ):
                when = "before it started"
                if running:
                    when = f"at step {record.step} of {record.steps}; it starts again from its first step"
                    record.status, record.step, record.preview = "queued", 0, None
                    record.lost_runs += 1
                if not await self._offer(record):
                    return (await self.store.get(record.id)) or record
                log.warning("job %s offered again: its replica stopped renewing it %s", record.id, when)
                return record
            record.status = "failed"
            message = "the replica running this job stopped before it finished; submit it again"
            if running and record.lost_runs:
                message = (
                    f"the replicas running this job stopped before it finished {record.lost_runs + 1} times; it is not "
                    "run again, as it may be what stops them (see their logs and restarts); submit it again"
                )
            elif record.offered:
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
            try:
                before = (await self.get(principal, after)).created
            except ApiError as e:  # the cursor names no job of the caller's (any more)
                raise ApiError(404, e.code, f"after: {e.message}", param="after") from None
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
        if record.offered or record.lapsed(time.time()):
            # No replica holds it (handed off, or its replica gone and another settling it):
            # cancelled here. ``_take_up`` and ``_settled`` write nothing over it.
            record.cancel_requested, record.status = True, "cancelled"
            return await self._end_elsewhere(record)
        asked: list[JobRecord] = []

        def ask(stored: JobRecord | None) -> JobRecord | None:
            """The cancel, on the record as it is stored when written (the runner reads it within
            a second), unless it ended, was handed off or lapsed since it was read."""
            if stored is None or stored.status in TERMINAL or stored.offered or stored.lapsed(time.time()):
                return None
            stored.cancel_requested = True
            asked.append(stored)
            return stored

        if await self.store.update(job_id, ask):
            return asked[-1]
        return await self.cancel(principal, job_id)  # ended, handed off or lapsed: as it is now

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
                """Progress and lease into the store, over the stored record only while it is
                this replica's (``_mine``); True once a cancel was asked for."""
                nonlocal ended_elsewhere
                if queued:  # not after a cache hit, whose result came without a queue
                    job = queued[0]
                    record.status = "running" if job.started else "queued"
                    record.step = job.item.progress
                    if job.item.preview:
                        record.preview = await asyncio.to_thread(job.item.preview_png)
                record.lease_until = time.time() + state.settings.job_lease_seconds
                self._count()
                try:
                    if not await self.store.update(record.id, self._mine(record)):
                        ended_elsewhere = True
                        return True
                except ApiError:  # unreachable for now (logged): the next poll tries again
                    return False
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
            if e.code == "draining" and await self._hand_off(record):
                return  # a drain out of time dropped it, queued or running: another replica runs it
            cancelled = e.status == 499 or record.cancel_requested
            record.status = "cancelled" if cancelled else "failed"
            record.error = None if cancelled else {"code": e.code, "message": e.message}
        except Exception as e:
            log.exception("job %s failed", record.id)
            record.status, record.error = "failed", {"code": "generation_failed", "message": f"{type(e).__name__}: {e}"}
        metrics.JOBS.labels(record.status).inc()
        self._due(record)
        if not await self._store_end(record) and record.webhook_url:
            await self._deliver(record)  # with the store unreachable too: the webhook still has the images

    def _mine(self, record: JobRecord) -> Callable[[JobRecord | None], JobRecord | None]:
        """A store ``update`` writing the record of a job this replica runs: not over one that
        says the job is not this replica's to finish (``_elsewhere``), and keeping a cancel
        asked for since the last write. A record gone (a Redis restarted empty) is written
        again."""

        def change(stored: JobRecord | None) -> JobRecord | None:
            if stored is not None and self._elsewhere(stored):
                return None
            return keeping_cancel(record, stored)

        return change

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
                if not await self.store.update(record.id, self._mine(record)):
                    fresh = await self.store.get(record.id)
                    said = fresh.status if fresh is not None else "gone"
                    log.warning("job %s was reported %s before its end could be stored", record.id, said)
                    return True
                return False
            except ApiError:
                if time.monotonic() + delay > deadline:
                    log.error("could not store the end of job %s: the job store stayed unreachable", record.id)
                    return False
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    def _due(self, record: JobRecord) -> None:
        """An end about to be written: its webhook, if it has one, due from this replica, under
        a lease that covers a POST (``_deliver``)."""
        record.webhook_due, record.webhook_attempts = bool(record.webhook_url), 0
        if record.webhook_due:
            record.runner = self.me
            record.lease_until = time.time() + self._delivery_lease()

    def _delivery_lease(self) -> float:
        return self.state.settings.job_lease_seconds + WEBHOOK_TIMEOUT_SECONDS

    async def _deliver(self, record: JobRecord) -> None:
        """POST the job's webhook (``WEBHOOK_ATTEMPTS`` in all, those another replica made
        before included), with exponential backoff between attempts. The record says the
        webhook is due until it is delivered or given up; between attempts this replica renews
        its lease on the delivery and writes the attempts made, so a replica that finds the
        lease lapsed (this one died, or shut down first) goes on from there. A host no longer
        allowed is not called."""
        s = self.state.settings
        assert record.webhook_url is not None
        try:  # as allowed now: another replica took the job, or the allowed hosts changed since
            check_webhook(s, record.webhook_url)
        except ApiError as e:
            metrics.WEBHOOKS.labels("failed").inc()
            log.warning("webhook of %s not called: %s", record.id, e.message)
            await self._delivery_ended(record)
            return
        body = json.dumps(self.view(record)).encode()
        try:
            async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_SECONDS, follow_redirects=False) as client:
                while True:
                    problem = await attempt(client, record, body)
                    record.webhook_attempts += 1
                    if problem is None:
                        metrics.WEBHOOKS.labels("delivered").inc()
                        break
                    last = record.webhook_attempts >= WEBHOOK_ATTEMPTS
                    metrics.WEBHOOKS.labels("failed" if last else "retried").inc()
                    log.warning("webhook of %s, attempt %d: %s", record.id, record.webhook_attempts, problem)
                    if last:
                        break
                    delay = s.webhook_backoff_seconds * 2 ** (record.webhook_attempts - 1)
                    if not await self._hold_delivery(record, time.time() + delay + self._delivery_lease()):
                        return  # another replica took the delivery over: it goes on from here
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:  # shut down before it ended: its lease ends now, for another replica
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._hold_delivery(record, time.time()), 2)
            raise
        await self._delivery_ended(record)

    async def _hold_delivery(self, record: JobRecord, until: float) -> bool:
        """Set this replica's lease on a delivery to end at ``until`` (past the next attempt, or
        now to give it up) and write the attempts made; False when another replica holds it
        now. With the store unreachable, the delivery goes on here."""
        record.lease_until = until
        taken = False

        def renew(stored: JobRecord | None) -> JobRecord | None:
            nonlocal taken
            if stored is None:
                return None
            if not self._delivering(stored):
                taken = True
                return None
            stored.lease_until, stored.webhook_attempts = record.lease_until, record.webhook_attempts
            return stored

        try:
            await self.store.update(record.id, renew)
        except ApiError:
            return True
        return not taken

    def _delivering(self, stored: JobRecord) -> bool:
        """Whether the stored record says this replica holds its webhook's delivery."""
        return stored.webhook_due and stored.runner == self.me

    async def _delivery_ended(self, record: JobRecord) -> None:
        """The webhook delivered or given up: no longer due (unless another replica holds it now)."""

        def ended(stored: JobRecord | None) -> JobRecord | None:
            if stored is None or not self._delivering(stored):
                return None
            stored.webhook_due, stored.webhook_attempts = False, record.webhook_attempts
            return stored

        with contextlib.suppress(ApiError):  # unreachable: another replica may call it again (at least once)
            await self.store.update(record.id, ended)

    async def _resume_delivery(self, record: JobRecord) -> None:
        """A webhook whose delivery lapsed (its replica died, or shut down, before it ended):
        this replica takes it over and goes on from the attempts made. Once per lapse across
        replicas: the take-over writes only over the lease it read (a store ``update``), so of
        the replicas that found the same lapse, the first to write takes it."""
        lapse = record.lease_until
        taken: list[JobRecord] = []

        def take(stored: JobRecord | None) -> JobRecord | None:
            if stored is None or not stored.webhook_due or stored.lease_until != lapse:
                return None  # delivered, or taken over, since it was read
            stored.runner, stored.lease_until = self.me, time.time() + self._delivery_lease()
            taken.append(stored)
            return stored

        if await self.store.update(record.id, take):
            metrics.WEBHOOKS.labels("resumed").inc()
            log.info("delivering the webhook of job %s: the replica delivering it stopped first", record.id)
            self._report(taken[-1])

    async def _hand_off(self, record: JobRecord) -> bool:
        """Offer a job this replica will not run, or not finish, to the replicas sharing its
        store (its request was stored when it was accepted; one that ran starts again from its
        first step, with its seed, if it had one): the record, queued again, is kept for
        ``job_handoff_seconds``. False without a shared store, or when the store cannot be
        reached (the job then fails)."""
        if not self.store.shared:
            return False
        record.status, record.step, record.preview = "queued", 0, None
        try:
            fresh = await self.store.get(record.id)
            if fresh is not None and self._elsewhere(fresh):
                return True  # reported lost, cancelled or given to another meanwhile: that stands
            if not await self._offer(record):  # keeping a cancel asked for since (``keeping_cancel``)
                return True  # ended meanwhile: that stands
        except ApiError:
            return False
        log.info("job %s handed off: this replica is shutting down before it could finish it", record.id)
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
        this one is ready, takes jobs up at all (``job_adopt``: not a canary) and has room to
        queue them soon (fewer than half its queue waiting, as ``steps.enqueue_when_room`` lets
        in) and below ``job_queue_size`` jobs; then report
        this replica's share of those still offered (``_share``). Every ``REAP_SECONDS``: settle
        jobs whose lease lapsed (``_settled``), their replica dead, and take over the webhooks
        whose delivery lapsed (``_resume_delivery``)."""
        reaped = time.monotonic()
        while True:
            await asyncio.sleep(ADOPT_POLL_SECONDS)
            try:
                if self.store.shared and time.monotonic() - reaped >= REAP_SECONDS:
                    reaped = time.monotonic()
                    for job_id in await self.store.lapsed(time.time(), 100):
                        if (record := await self.store.get(job_id)) is None:
                            continue
                        if record.delivery_lapsed(time.time()):
                            await self._resume_delivery(record)
                        else:
                            await self._settled(record)
                while self.store.shared and self._room_to_adopt():
                    taken = await self.store.take()
                    if taken is None:
                        break
                    await self._take_up(*taken)
                if self.store.shared:
                    await self._share(await self.store.offered())
            except ApiError:
                pass  # the store unreachable (logged): the next look tries again
            except Exception:
                log.exception("taking up handed-off jobs failed")

    async def _share(self, offered: int) -> None:
        """Jobs offered and not taken up are demand no replica's queue holds: each live replica
        adds its share (offered / live replicas) to its queue depth, so the sum over the pods,
        which the autoscaler reads (an HPA's average times the pods, KEDA's sum), counts each
        once. A draining replica is on its way out (an HPA no longer counts a terminating pod):
        it leaves the count and adds nothing."""
        metrics.JOBS_OFFERED.set(offered)
        batcher = self.state.batcher
        if self.state.draining or not self.state.settings.job_adopt:  # takes none up: no share
            await self.store.leave(self.me)
            batcher.offered_share = 0.0
        else:
            alive = await self.store.beat(self.me, time.time(), ALIVE_SECONDS)
            batcher.offered_share = offered / max(1, alive)
        batcher.depth_changed()

    def _room_to_adopt(self) -> bool:
        s, batcher = self.state.settings, self.state.batcher
        if not (s.job_adopt and self.state.ready):
            return False
        return len(self._local) < s.job_queue_size and batcher.waiting < max(1, s.queue_size // 2)

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
        if (error := self._unservable(gen)) is not None:
            record.status, record.error = "failed", error
            await self._end_elsewhere(record)
            return
        record.offered, record.runner, record.attempts = 0.0, self.me, record.attempts + 1
        record.lease_until = time.time() + self.state.settings.job_lease_seconds
        if not await self.store.put_unless_ended(record):
            return  # cancelled (or reported lost) since it was read: that stands
        metrics.JOBS.labels("adopted").inc()
        log.info("took up job %s, handed off when its replica shut down or died", job_id)
        self._launch(record, gen, urls)

    def _unservable(self, gen: steps.Generation) -> dict[str, Any] | None:
        """Why this replica cannot run a handed-off job as it was accepted, if it cannot (the
        job's error): a rolling update since changed the model the job named, or removed an
        adapter it names. Run here, it would run on another model, or fail inside diffusers
        with a message about its internals. A job that named no model runs on the current one."""
        s = self.state.settings
        if gen.model and gen.model not in s.model_names:
            message = (
                f"this job asked for model {gen.model!r}; the service now serves "
                f"{s.served_models} (its model changed since the job was accepted): "
                "submit it again naming the model served now, or none"
            )
            return {"code": "model_not_found", "param": "model", "message": message}
        known = {a.name for a in s.loras}
        if missing := sorted(name for name, _ in gen.key.loras if name not in known):
            message = (
                f"this job names LoRA adapters the service no longer loads: {', '.join(map(repr, missing))} "
                "(removed since the job was accepted); submit it again without them, or add them back"
            )
            return {"code": "unknown_lora", "param": "loras", "message": message}
        return None

    async def _end_elsewhere(self, record: JobRecord) -> JobRecord:
        """Store, count and report the end of a job no replica holds (cancelled or failed
        while offered, or lost), as the replica running it would; unless an end was stored
        meanwhile: that one is the answer, and is returned."""
        self._due(record)
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
