"""Everything one server process holds: settings, the model, the queue and the request-path parts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .auth import Authenticator
from .cache import Cache, make_cache
from .queue import Batcher, JobGate
from .ratelimit import Limiter, make_limiter
from .safety import Blocklist, WatchedBlocklist, blocklist_from
from .settings import Settings
from .stepper import StepBatcher
from .work import ImagePipeline


def make_batcher(s: Settings, pipeline: ImagePipeline) -> Batcher | StepBatcher:
    """SDSERVE_BATCHING: request-level batches, or step-level continuous batching."""
    if s.batching == "step":
        return StepBatcher(pipeline, max_batch_size=s.max_batch_size, queue_size=s.queue_size, budget=s.step_budget)
    return Batcher(pipeline, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms, queue_size=s.queue_size)


@dataclass
class State:
    settings: Settings
    pipeline: ImagePipeline
    batcher: Batcher | StepBatcher
    cache: Cache
    auth: Authenticator
    limiter: Limiter | None
    blocklist: Blocklist | WatchedBlocklist
    loaded: bool = False
    load_error: str | None = None
    load_task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.time)
    #: Async jobs (sdserve.jobs.Jobs), set by the app: they run through the request-path steps.
    jobs: Any = None
    #: URL outputs (sdserve.outputs.S3Outputs) when an S3 bucket is configured.
    outputs: Any = None
    #: Async jobs waiting for room in the queue take turns through it (sdserve.steps.enqueue_when_room).
    job_gate: JobGate = field(default_factory=JobGate)
    #: Images of requests whose client left, made anyway, on their way to the cache (steps.cache_later).
    caching: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(cls, settings: Settings, pipeline: ImagePipeline) -> State:
        s = settings
        return cls(
            settings=s,
            pipeline=pipeline,
            batcher=make_batcher(s, pipeline),
            cache=make_cache(s),
            auth=Authenticator(s),
            limiter=make_limiter(s),
            blocklist=blocklist_from(s.blocklist_file),
        )

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) of a request that names no size (SDSERVE_DEFAULT_SIZE, "auto": the model's)."""
        return self.settings.default_width_height(self.pipeline.native_size)

    @property
    def draining(self) -> bool:
        return self.batcher.draining

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining

    @property
    def problem(self) -> str | None:
        """Why this replica cannot serve although it answers (QueueBase.problem); None when it can."""
        return self.batcher.problem(self.settings.stall_limit)
