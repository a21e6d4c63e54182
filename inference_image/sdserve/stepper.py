"""Step-level continuous batching (SDSERVE_BATCHING=step): requests join and leave the
running batch between denoising steps.

The event loop owns the schedule; the model runs in two threads:
- the worker thread: text encoding of a newly admitted request (``pipeline.begin``) and one
  UNet step for every running image (``pipeline.step``), whatever its timestep, step count,
  guidance scale or scheduler;
- the decode thread: the VAE decode (and content check) of a finished request
  (``pipeline.finish``), off the denoising loop, so the next step does not wait for it.

Schedule, in arrival order across groups: requests stepped together must share a latent
shape (width x height) and LoRA adapters, their group. At each step boundary the oldest
request, running or queued, is the lead: its group takes the step. Queued requests of the
lead's group join in arrival order while they fit the budget (latent pixels summed over the
group's images, and ``max_batch_size`` images); a queued request of another group is passed
over, and the younger requests that passed it are paused (kept, not stepped) once it is the
oldest. So no request waits for a younger one, and a request queued behind another shape
still joins the running batch instead of waiting for that shape's whole run.
A request whose client leaves (or whose time runs out, or that a drain out of time drops)
is dropped at the next step, running, paused or queued. An out-of-memory step is split
(``pipeline.step``); an image that does not fit alone fails its request with OutOfMemory and
the budget shrinks to what fit (growing back after ``REGROW_AFTER_STEPS`` steps without
another). Edits are stepped like generations: they start from the noised input image at a
later timestep, and inpainting puts the unmasked part back after each step (on an
inpainting model's UNet, the mask and the masked image go into every forward instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from . import metrics
from .queue import Job, QueueBase
from .work import BatchKey, ImagePipeline, Item, OutOfMemory

log = logging.getLogger("sdserve.stepper")

#: Latent pixels of one 512x512 image (the unit of the default budget).
LATENT_512 = 64 * 64
#: Steps without running out of memory after which a shrunk budget grows back by one 512x512
#: image, up to the configured one: an out-of-memory can be transient (a large decode on the
#: decode thread at the same moment), and a budget that only shrinks would keep the lower
#: throughput until a restart.
REGROW_AFTER_STEPS = 500


def latent_pixels(key: BatchKey) -> int:
    return (key.width // 8) * (key.height // 8)


@dataclass(eq=False)
class Running:
    """A request in the running batch: its images' states, stepped together with the others."""

    job: Job
    states: list[Any]


class StepBatcher(QueueBase):
    PREEMPTIBLE = True
    TASK_NAME = "sdserve-stepper"

    def __init__(self, pipeline: ImagePipeline, *, max_batch_size: int, queue_size: int, budget: int = 0):
        super().__init__(pipeline, max_batch_size=max_batch_size, queue_size=queue_size)
        self.budget = self._full_budget = budget or max_batch_size * LATENT_512
        self._steps_since_oom = 0
        self._running: list[Running] = []
        self._decoder = self._thread("sdserve-decode")
        self._step_seconds = 0.05  # running estimate of one step boundary, for Retry-After

    def retry_after(self) -> int:
        """Seconds until the queue has room, roughly: the steps of the requests ahead."""
        steps = sum(j.key.denoising_steps for j in self._pending) / max(1, self.max_batch_size)
        return max(1, int(steps * self._step_seconds + 0.999))

    async def _warm(self, loop: asyncio.AbstractEventLoop, key: BatchKey, item: Item) -> None:
        """A request's whole path as a step-batched one: admission, steps, decode (on its thread)."""
        states = await loop.run_in_executor(self._worker, self.pipeline.begin, key, item)
        while not all(self.pipeline.finished(s) for s in states):
            await loop.run_in_executor(self._worker, self.pipeline.step, states)
        await loop.run_in_executor(self._decoder, self.pipeline.finish, states)

    def _expected_seconds(self, job: Job) -> float:
        """Its steps at the current step time, once per group running (the groups take turns
        at the step boundaries): on the long side."""
        groups = len({self._shape(r.job) for r in self._running}) or 1
        return job.key.denoising_steps * self._step_seconds * groups

    # ---- the schedule -------------------------------------------------------------------
    @staticmethod
    def _shape(job: Job) -> tuple[Any, ...]:
        """What requests stepped together must share: the latent size and the LoRA adapters."""
        return job.key.width, job.key.height, job.key.loras

    def _lead(self) -> Job | None:
        """The oldest request, running or queued: its group takes the next step."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        head = self._pending[0] if self._pending else None
        running = min((r.job for r in self._running), key=lambda j: j.enqueued, default=None)
        if running is None or (head is not None and head.enqueued < running.enqueued):
            return head
        return running

    def _group(self, lead: Job) -> list[Running]:
        shape = self._shape(lead)
        return [r for r in self._running if self._shape(r.job) == shape]

    @staticmethod
    def _cost(group: list[Running]) -> int:
        return sum(latent_pixels(r.job.key) * len(r.states) for r in group)

    def _joining(self, lead: Job) -> list[Job]:
        """Queued requests that join the lead's group at this step boundary, in arrival order."""
        group = self._group(lead)
        cost, images = self._cost(group), sum(len(r.states) for r in group)
        out: list[Job] = []
        for job in self._pending:
            if job.cancelled or self._shape(job) != self._shape(lead):
                continue  # another group: it goes when it is the oldest
            pixels = latent_pixels(job.key) * job.item.n
            if (group or out) and (cost + pixels > self.budget or images + job.item.n > self.max_batch_size):
                break  # arrival order within the group: nobody younger overtakes it
            out.append(job)
            cost, images = cost + pixels, images + job.item.n
        return out

    async def _admit(self, lead: Job) -> None:
        for job in self._joining(lead):
            if job.cancelled:  # its client left while an earlier one was admitted
                continue
            self._start(job)
            try:
                states = await self._serve(self._worker, self.pipeline.begin, job.key, job.item)
            except Exception as e:
                log.exception("admitting a request failed")
                if not job.future.done():
                    job.future.set_exception(e)
                continue
            self._running.append(Running(job, states))

    def _start(self, job: Job) -> None:
        """Take a job out of the queue: in flight from here until its future is done."""
        self._pending.remove(job)
        self.depth_changed()
        self._began([job])

    def _drop_gone(self) -> None:
        """Requests whose client left or whose time ran out leave the batch at this step boundary."""
        gone = [r for r in self._running if r.job.future.done()]
        if gone:
            self._running = [r for r in self._running if not r.job.future.done()]

    async def _loop(self) -> None:
        while True:
            self._drop_gone()
            lead = self._lead()
            if lead is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._admit(lead)
            self._drop_gone()
            group = self._group(lead)
            if not group:
                continue
            await self._step(group)

    async def _step(self, batch: list[Running]) -> None:
        states = [s for r in batch for s in r.states]
        metrics.BATCH_SIZE.observe(len(states))
        t0 = time.perf_counter()
        try:
            await self._serve(self._worker, self.pipeline.step, states)
        except OutOfMemory:
            self._steps_since_oom = 0
            await self._step_singly(batch)
        except Exception as e:
            log.exception("a step of %d images failed", len(states))
            for r in batch:
                if not r.job.future.done():
                    r.job.future.set_exception(e)
            self._running = [r for r in self._running if r not in batch]
            return
        else:
            self._regrow()
        finally:
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * (time.perf_counter() - t0)
        for r in batch:
            r.job.item.progress += 1
            if r in self._running and all(self.pipeline.finished(s) for s in r.states):
                self._running.remove(r)
                self._decode(r)

    async def _step_singly(self, batch: list[Running]) -> None:
        """The split step still ran out of memory: step each request alone, fail the one that
        does not fit, and keep the budget at what did. The halves that fitted before the failure
        have stepped already: their states may take this step's successor now (harmless), but
        a state that took its last step is not stepped again (it has no timestep left)."""
        for r in batch:
            todo = [s for s in r.states if not self.pipeline.finished(s)]
            if not todo:
                continue
            try:
                await self._serve(self._worker, self.pipeline.step, todo)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                if not r.job.future.done():
                    r.job.future.set_exception(e)
                self._running.remove(r)
        fits = max(LATENT_512 // 4, self._cost([r for r in batch if r in self._running]))
        if fits < self.budget:
            log.warning("out of memory: step budget %d -> %d latent pixels", self.budget, fits)
            self.budget = fits

    def _regrow(self) -> None:
        self._steps_since_oom += 1
        if self.budget < self._full_budget and self._steps_since_oom >= REGROW_AFTER_STEPS:
            grown = min(self._full_budget, self.budget + LATENT_512)
            log.info(
                "%d steps without running out of memory: step budget %d -> %d", REGROW_AFTER_STEPS, self.budget, grown
            )
            self.budget, self._steps_since_oom = grown, 0

    def _decode(self, r: Running) -> None:
        fut = self._serve(self._decoder, self.pipeline.finish, r.states)

        def done(f: asyncio.Future[Any]) -> None:
            job = r.job
            if job.future.done():
                return
            if f.cancelled():
                job.future.cancel()
                return
            exc = f.exception()
            if exc is not None:
                job.future.set_exception(exc)
                return
            job.item.images = f.result()
            metrics.IMAGES.inc(job.item.n)
            metrics.INFERENCE_DURATION.observe(time.monotonic() - (job.started or job.enqueued))
            job.future.set_result(job.item)

        fut.add_done_callback(done)
