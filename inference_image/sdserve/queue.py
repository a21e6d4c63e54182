"""Bounded request queue and dynamic batcher.

The event loop only enqueues jobs and awaits their futures. One batcher task takes the
oldest job, gathers queued jobs with the same BatchKey until ``max_batch_size`` images or
``max_wait_ms``, and hands the batch to the single worker thread that owns the model.
Jobs whose client left or timed out are dropped before they reach the model; a running batch
whose clients have all left ends at its next step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import metrics
from .work import BatchKey, ImagePipeline, Interrupted, Item, OutOfMemory

log = logging.getLogger("sdserve.queue")

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


class Draining(Exception):
    pass


@dataclass(eq=False)
class Job:
    """A request in a queue. Jobs are distinct by identity (two equal requests are two jobs)."""

    key: BatchKey
    item: Item
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    #: Step batching: a started job can still be cancelled (it leaves at the next step).
    preemptible: bool = False

    @property
    def cancelled(self) -> bool:
        return self.future.done()


class JobGate:
    """Turns among async jobs waiting for room in the queue (``sdserve.steps.enqueue_when_room``):
    one holds the turn at a time; it passes round robin over the principals that have a job
    waiting, in arrival order within each, so one tenant's thousand jobs do not hold another's
    single job back until they are all queued."""

    def __init__(self) -> None:
        #: principal -> its waiting jobs' futures; the dict's order is the round's.
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._held = False

    def turn(self, principal: str) -> asyncio.Future[None]:
        """A future done when it is this job's turn; ``leave`` it in any case."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._held:
            self._held = True
            future.set_result(None)
        else:
            self._waiting.setdefault(principal, collections.deque()).append(future)
        return future

    def leave(self, future: asyncio.Future[None]) -> None:
        """Done waiting: a turn held passes on; one not given yet is withdrawn."""
        if future.done() and not future.cancelled():
            self._pass()
        else:
            future.cancel()  # skipped when the turn comes to it

    def _pass(self) -> None:
        while self._waiting:
            principal = next(iter(self._waiting))
            queue = self._waiting.pop(principal)
            future = queue.popleft()
            if queue:
                self._waiting[principal] = queue  # to the end of the round
            if not future.cancelled():
                future.set_result(None)
                return
        self._held = False


class QueueBase:
    """What both batching policies share: the bounded queue of jobs, submission with 429 when
    full and 503 while draining, the jobs taken from it and not finished (in flight), the
    schedule task, the worker threads, and the drain."""

    #: Step batching drops a started job alone, at its next step; a request batch runs on while any
    #: request in it is wanted (``cancel``).
    PREEMPTIBLE = False
    TASK_NAME = "sdserve-batcher"

    def __init__(self, pipeline: ImagePipeline, *, max_batch_size: int, queue_size: int):
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self._pending: collections.deque[Job] = collections.deque()
        #: Jobs taken from the queue whose futures are not done: being admitted, denoised (in a
        #: batch or stepped) or decoded. A job leaves when its future is done.
        self._taken: set[Job] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._threads: list[concurrent.futures.ThreadPoolExecutor] = []
        #: The thread that owns the model: loading, warm-up and every UNet call run on it.
        self._worker = self._thread("sdserve-gpu")
        self.draining = False
        #: Serving calls running on the model's threads (thread id -> when the call began), for
        #: ``problem``: a batch, a step, an admission, a decode. Loading and warm-up are not timed
        #: (the startup probe covers them).
        self._calls: dict[int, float] = {}
        self._stopping = False
        self._reported: object = None
        #: Async jobs waiting for room before they enter the queue (``sdserve.steps.enqueue_when_room``):
        #: not in the queue, but demand the autoscaler must see.
        self.waiting = 0
        #: This replica's share of the async jobs handed off that no replica has taken up yet
        #: (``sdserve.jobs.service.Jobs._share``): demand too.
        self.offered_share = 0.0

    def _thread(self, name: str) -> concurrent.futures.ThreadPoolExecutor:
        """A one-thread executor, shut down with the queue."""
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._threads.append(executor)
        return executor

    async def load(self) -> None:
        """Load the model, then warm it up, on the threads that will serve it.

        The thread matters on a GPU: PyTorch keeps cuDNN's autotuned kernel choices
        (``cudnn.benchmark``) in a per-thread cache, so a warm-up on any other thread leaves the
        first request of every shape to tune again, seconds of extra latency each. The shapes
        are the pipeline's (``warmup_shapes``); how each is run is the policy's (``_warm``)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, self.pipeline.load)
        for key, n in self.pipeline.warmup_shapes():
            item = Item("warm-up", None, n, 0)
            if key.task != "generate":  # an edit's input image (and mask), grey
                from PIL import Image

                item.init_image = Image.new("RGB", (key.width, key.height), (128, 128, 128))
                item.mask_image = Image.new("L", (key.width, key.height), 255) if key.task == "inpaint" else None
            await self._warm(loop, key, item)

    async def _warm(self, loop: asyncio.AbstractEventLoop, key: BatchKey, item: Item) -> None:
        raise NotImplementedError

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        """On a model thread: ``fn(*args)``, with its start kept while it runs."""
        me = threading.get_ident()
        self._calls[me] = time.monotonic()
        try:
            return fn(*args)
        finally:
            del self._calls[me]

    def _serve(self, executor: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """A serving call on one of the model's threads (timed for ``problem``)."""
        return asyncio.get_running_loop().run_in_executor(executor, functools.partial(self._timed, fn), *args)

    def call_age(self, began: float | None = None) -> float:
        """Seconds the oldest model call running now has run (``began``: its start, when known);
        0 when none runs (sdserve_model_call_age_seconds)."""
        if began is None:
            began = min(list(self._calls.values()), default=None)
        return 0.0 if began is None else time.monotonic() - began

    def problem(self, stall_seconds: float) -> str | None:
        """Why this server cannot serve although its event loop answers (/healthz fails, so the
        kubelet restarts the pod): the schedule task ended, or one model call has run for longer
        than ``stall_seconds`` (a hung GPU or driver). None while it can. Logged once per cause."""
        problem: str | None = None
        cause: object = None  # what is logged once: the stopped task, or one stalled call by its start
        if self._task is not None and self._task.done() and not self._stopping:
            error = None if self._task.cancelled() else self._task.exception()
            problem, cause = f"the batcher stopped: {error!r}", self._task
        else:
            began = min(list(self._calls.values()), default=None)
            age = self.call_age(began)
            if age > stall_seconds:
                problem = f"a model call has run for {age:.0f} s, over SDSERVE_STALL_SECONDS ({stall_seconds:g} s)"
                cause = began
        if cause is not None and cause != self._reported:
            log.error("unhealthy (liveness fails): %s", problem)
        self._reported = cause
        return problem

    async def on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the model's thread (benchmarks time the pipeline where it serves)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _loop(self) -> None:
        raise NotImplementedError

    def retry_after(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.TASK_NAME)
        metrics.MODEL_CALL_AGE.set_function(self.call_age)  # read at each scrape
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The schedule task should run until ``stop``: say at once if it raised."""
        if not task.cancelled() and task.exception() is not None:
            log.error("the batcher stopped", exc_info=task.exception())

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - a crash of the task was logged when it happened (_ended)
                pass
        for executor in self._threads:
            executor.shutdown(wait=True, cancel_futures=True)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def depth_changed(self) -> None:
        """sdserve_queue_depth, which the autoscaler reads: queued requests, the async jobs
        waiting for room to queue, and this replica's share of the jobs handed off."""
        metrics.QUEUE_DEPTH.set(len(self._pending) + self.waiting + self.offered_share)

    @property
    def inflight(self) -> int:
        """Requests taken from the queue and not finished (sdserve_inflight_requests)."""
        return len(self._taken)

    @property
    def idle(self) -> bool:
        return not self._taken and all(j.cancelled for j in self._pending)

    def _began(self, jobs: list[Job]) -> None:
        """Jobs taken from the queue start: queue wait observed, in flight until their futures
        are done (whichever way: result, error, or cancel at a step boundary)."""
        now = time.monotonic()
        for job in jobs:
            job.started = now
            metrics.QUEUE_WAIT.observe(now - job.enqueued)
            self._taken.add(job)
        metrics.INFLIGHT.set(self.inflight)

    def submit(self, key: BatchKey, item: Item) -> Job:
        if self.draining:
            raise Draining()
        if item.n > self.max_batch_size:
            raise ValueError("n exceeds the batch size")  # validated before; defensive
        if len(self._pending) >= self.queue_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise QueueFull(self.retry_after())
        job = Job(key, item, asyncio.get_running_loop().create_future(), preemptible=self.PREEMPTIBLE)
        self._pending.append(job)
        self.depth_changed()
        job.future.add_done_callback(functools.partial(self._done, job))
        self._wakeup.set()
        return job

    def _done(self, job: Job, _future: asyncio.Future) -> None:
        """A job's future is done: it leaves the queue or the jobs in flight at once. A queued
        job whose client left (or whose time ran out) no longer counts against ``queue_size``,
        the depth the autoscaler reads, or Retry-After. Runs on the event loop (a done-callback),
        as does everything else that changes the queue."""
        if job.started is None:
            if job in self._pending:
                self._pending.remove(job)
                self.depth_changed()
        elif job in self._taken:
            self._taken.discard(job)
            metrics.INFLIGHT.set(self.inflight)

    async def drain(self, seconds: float, finish_within: float = 0.0) -> bool:
        """Refuse new work and wait until queued and running work is done, ``seconds`` at most.
        Out of time, what is still queued is dropped (``cancel``), and so is running work that
        would not end within ``finish_within`` seconds more (the time the process has left):
        it stops at its next step. Each then fails with ``draining`` (a 503 its client may retry
        elsewhere, or an async job's hand-off: ``sdserve.steps.wait``) instead of being cut off
        when the process exits. Running work that will end in time ends."""
        self.draining = True
        deadline = time.monotonic() + seconds
        # Polled: "idle" changes in several places (a batch ends, a queued job is cancelled).
        while not self.idle and time.monotonic() < deadline:  # noqa: ASYNC110 - see the line above
            await asyncio.sleep(0.05)
        for job in list(self._pending):
            cancel(job, "drain_timeout")
        for job in list(self._taken):
            left = self._seconds_left(job)
            if left > finish_within:
                log.warning("drain out of time: a running request dropped, %.1f s from its end", left)
                cancel(job, "drain_timeout")
        return self.idle

    def _seconds_left(self, job: Job) -> float:
        """Roughly how long a running job has left (0 once denoised: it is being decoded), at
        its own pace so far: the time since it started over the steps it took (with step
        batching, that counts the steps it waited while other groups stepped). Before its
        first step ends, that step has taken at least what has passed, and so will each one
        after it; and the policy's estimate of a whole run (``_expected_seconds``) holds."""
        steps, done = job.key.denoising_steps, job.item.progress
        if done >= steps or job.started is None:
            return 0.0
        elapsed = time.monotonic() - job.started
        if done:
            return elapsed / done * (steps - done)
        return max(self._expected_seconds(job) - elapsed, elapsed * (steps - 1))

    def _expected_seconds(self, job: Job) -> float:
        """A running job's whole time, as the policy's running estimates have it."""
        raise NotImplementedError


class Batcher(QueueBase):
    def __init__(self, pipeline: ImagePipeline, *, max_batch_size: int, max_wait_ms: int, queue_size: int):
        super().__init__(pipeline, max_batch_size=max_batch_size, queue_size=queue_size)
        self.max_wait = max_wait_ms / 1000.0
        self._batch_seconds = 1.0  # running estimate of one batch, for Retry-After

    def retry_after(self) -> int:
        """Seconds until the queue has room again, roughly: the batches ahead times their cost."""
        batches_ahead = max(1, self.depth // max(1, self.max_batch_size))
        return max(1, int(batches_ahead * self._batch_seconds + 0.999))

    async def _warm(self, loop: asyncio.AbstractEventLoop, key: BatchKey, item: Item) -> None:
        await loop.run_in_executor(self._worker, self.pipeline.run, key, [item])

    def _drop_cancelled(self) -> None:
        if any(j.cancelled for j in self._pending):
            self._pending = collections.deque(j for j in self._pending if not j.cancelled)
            self.depth_changed()

    def _take(self) -> list[Job]:
        """The oldest job and every compatible queued job that fits, oldest first."""
        self._drop_cancelled()
        if not self._pending:
            return []
        key = self._pending[0].key
        batch: list[Job] = []
        size = 0
        keep: collections.deque[Job] = collections.deque()
        for job in self._pending:
            if job.key == key and size + job.item.n <= self.max_batch_size:
                batch.append(job)
                size += job.item.n
            else:
                keep.append(job)
        self._pending = keep
        self.depth_changed()
        return batch

    def _compatible_images(self) -> int:
        if not self._pending:
            return 0
        key = self._pending[0].key
        return sum(j.item.n for j in self._pending if j.key == key and not j.cancelled)

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Fill the batch: wait up to max_wait from the oldest job's arrival.
            deadline = self._pending[0].enqueued + self.max_wait if self._pending else 0
            while self._compatible_images() < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            await self._run(batch)

    def _expected_seconds(self, job: Job) -> float:
        return self._batch_seconds

    async def _run(self, batch: list[Job]) -> None:
        self._began(batch)
        images = sum(j.item.n for j in batch)
        metrics.BATCH_SIZE.observe(images)
        t0 = time.perf_counter()
        whole = True  # ran to its end (or failed): its time is a batch's, for Retry-After
        try:
            await self._serve(self._worker, self.pipeline.run, batch[0].key, [j.item for j in batch])
        except OutOfMemory:
            # The batch was split down to single images and one still did not fit.
            # Retry one at a time so that only the request that cannot fit fails.
            await self._run_singly(batch)
        except Interrupted:  # every request in it was dropped: it stopped at a step boundary
            whole = False
            for job in batch:
                _dropped(job)
        except Exception as e:  # the worker never dies; the batch's requests fail
            log.exception("batch of %d failed", images)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
        else:
            for job in batch:
                if not job.future.done():
                    job.future.set_result(job.item)
            metrics.IMAGES.inc(images)
        finally:
            elapsed = time.perf_counter() - t0
            metrics.INFERENCE_DURATION.observe(elapsed)
            if whole:
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed

    async def _run_singly(self, batch: list[Job]) -> None:
        for job in batch:
            if job.future.done():
                continue
            try:
                await self._serve(self._worker, self.pipeline.run, job.key, [job.item])
                job.future.set_result(job.item)
                metrics.IMAGES.inc(job.item.n)
            except Interrupted:
                _dropped(job)
            except Exception as e:  # noqa: BLE001 - the worker never dies; this request fails alone
                if not job.future.done():
                    job.future.set_exception(e)


def cancel(job: Job, reason: str) -> None:
    """The client is gone, out of time, or a drain out of time drops the job: one not started
    leaves the queue at once; a running one, with step batching, leaves the batch at the next
    step; with request batching its batch runs on for the others, and ends at its next step
    once every request in it is dropped (``Batcher._run``)."""
    if job.future.done() or job.item.dropped:
        return
    job.item.dropped = reason
    if job.started is None or job.preemptible:
        _dropped(job)


def _dropped(job: Job) -> None:
    """A dropped job ends (``cancel``, or its request batch ended at a step boundary): its
    future cancelled, counted by its reason."""
    if not job.future.done():
        job.future.cancel()
        metrics.CANCELLED.labels(job.item.dropped or "unknown").inc()
