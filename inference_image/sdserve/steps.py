"""The request path, one function per step, each importable and testable alone:

authenticate -> rate_limit -> validate -> cached -> enqueue -> wait -> encode

``generate()`` composes them for a validated ``Generation``; the routes only translate
their request bodies into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .auth import AuthError
from .cache import cache_key
from .encode import PNG, ImageFormat, encode_b64
from .errors import ApiError
from .queue import Draining, Job, QueueFull, cancel
from .state import State
from .work import BatchKey, Item, OutOfMemory

DISCONNECT_POLL_SECONDS = 1.0
#: How often the async job whose turn it is looks for room in the queue.
JOB_ROOM_POLL_SECONDS = 0.1


@dataclass
class Generation:
    """A validated generation request, whichever route it came from."""

    key: BatchKey
    prompt: str
    negative_prompt: str | None
    n: int
    seed: int | None
    #: Edits: the input image and mask (at the key's size), and a digest of the uploaded bytes.
    init_image: Any = None
    mask_image: Any = None
    inputs_digest: str | None = None
    #: Async jobs: low-resolution previews while denoising.
    preview: bool = False
    #: How the images are encoded (the Images API's output_format and output_compression).
    output: ImageFormat = PNG
    #: Who asked (async jobs take turns by principal: sdserve.queue.JobGate).
    principal: str = "anonymous"
    #: The model the request named (``model``), if it named one: a job taken up by a replica
    #: that no longer serves that name (the CR's model changed) fails instead of running on
    #: another model.
    model: str | None = None


@dataclass
class Result:
    images: list[str]
    seeds: list[int]
    cached: bool
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0


def batch_key(
    state: State,
    width: int,
    height: int,
    steps: int | None,
    guidance: float | None,
    scheduler: str,
    loras: tuple[tuple[str, float], ...] = (),
) -> BatchKey:
    """The key requests batch on, with the server's defaults filled in.

    "default" is resolved here: the cache key and batch grouping see the scheduler that runs.
    """
    s = state.settings
    return BatchKey(
        width,
        height,
        steps or s.steps_default,
        float(s.default_guidance_scale if guidance is None else guidance),
        s.scheduler if scheduler == "default" else scheduler,
        loras=loras,
    )


def negative_prompt(state: State, given: str | None) -> str | None:
    """A request's negative prompt: its own ("" for none), else the server's default
    (SDSERVE_DEFAULT_NEGATIVE_PROMPT, CR spec.defaults.negativePrompt)."""
    return given if given is not None else state.settings.default_negative_prompt


def lora_set(state: State, lora: str | None, loras: dict[str, float] | None) -> tuple[tuple[str, float], ...]:
    """The adapters a request names (``lora``: one at its default weight; ``loras``: name ->
    weight), sorted by name; 422 naming the field for an adapter the server does not have."""
    known = {a.name: a.weight for a in state.settings.loras}
    chosen: dict[str, float] = {}
    for field_, names in (("lora", {lora: None} if lora else {}), ("loras", loras or {})):
        for name, weight in names.items():
            if name not in known:
                have = ", ".join(sorted(known)) or "none"
                raise ApiError(422, "unknown_lora", f"no LoRA adapter {name!r} (this server has: {have})", param=field_)
            w = known[name] if weight is None else float(weight)
            if not -4 <= w <= 4:
                raise ApiError(422, "invalid_value", f"weight of {name!r} must be within -4..4", param=field_)
            chosen[name] = w
    return tuple(sorted(chosen.items()))


async def authenticate(state: State, authorization: str | None, x_api_key: str | None) -> str:
    """The principal behind the credentials; 401/403 when there is none."""
    try:
        return await state.auth.authenticate(authorization, x_api_key)
    except AuthError as e:
        headers = None
        if e.status == 401:  # RFC 6750: the scheme to use, and what was wrong when something was sent
            challenge = 'Bearer realm="sdserve"'
            if e.code != "missing_credentials":
                challenge += ', error="invalid_token"'
            headers = {"WWW-Authenticate": challenge}
        raise ApiError(e.status, e.code, e.message, type_="authentication_error", headers=headers) from None


async def rate_limit(state: State, principal: str, client_host: str | None) -> str:
    """429 with Retry-After once the principal's (or the anonymous client's) bucket is empty."""
    if state.limiter is not None:
        key = principal if principal != "anonymous" else (client_host or "unknown")
        allowed, wait = await state.limiter.take(key)
        if not allowed:
            metrics.RATE_LIMITED.inc()
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit of {state.settings.rate_limit_rps}/s exceeded",
                retry_after=wait,
                type_="rate_limit_error",
            )
    return principal


def validate(state: State, gen: Generation, problems: list[tuple[str, str]]) -> None:
    """422 naming the first field over a limit, or for a task the model does not serve; 400 for
    blocked prompt content."""
    if problems:
        field_, _ = problems[0]
        raise ApiError(422, "invalid_value", "; ".join(f"{f}: {m}" for f, m in problems), param=field_)
    if gen.key.task not in state.pipeline.tasks:  # an inpainting model's UNet needs a mask
        model = state.settings.model_id
        if gen.key.task == "img2img":
            message = f"{model} is an inpainting model: an edit needs a mask"
        else:
            message = f"{model} is an inpainting model: it serves POST /v1/images/edits with an image and a mask"
        raise ApiError(422, "unsupported_task", message, param="mask" if gen.key.task == "img2img" else None)
    reason = state.blocklist.check(gen.prompt, gen.negative_prompt)
    if reason:
        metrics.PROMPTS_REJECTED.labels(reason).inc()
        raise ApiError(400, reason, "the prompt contains blocked content", param="prompt")


async def prompt_read(state: State, gen: Generation) -> str | None:
    """What the text encoder reads of the prompt when it cannot read all of it (the Images
    API's revised_prompt), counted; None when it reads it whole. Off the event loop."""
    used = await asyncio.to_thread(state.pipeline.prompt_used, gen.prompt)
    if used is not None:
        metrics.PROMPTS_TRUNCATED.inc()
    return used


def draining_error() -> ApiError:
    metrics.REJECTED.labels("draining").inc()
    return ApiError(503, "draining", "this replica is shutting down; retry", retry_after=1)


def admit(state: State) -> None:
    """503 while draining or before the model is loaded."""
    if state.draining:
        raise draining_error()
    if not state.loaded:
        metrics.REJECTED.labels("not_ready").inc()
        raise ApiError(503, "model_not_ready", state.load_error or "the model is still loading", retry_after=10)


def result_key(state: State, gen: Generation, seed: int) -> str:
    """The request and what else shapes the images served for it: replicas that share a Redis
    cache, or one that outlives a change of the CR, must not serve images made another way: in
    another dtype or quantization, with another file behind an adapter's name, or without the
    content check that is now on. (torch.compile and channels_last change only rounding.)"""
    s = state.settings
    sources = {a.name: [a.source, a.weight_name] for a in s.loras}
    encoding = {"output": part} if (part := gen.output.cache_part()) else {}
    return cache_key(
        s.model_id,
        state.pipeline.revision,
        {
            **encoding,
            "serving": {
                "dtype": str(state.pipeline.dtype),
                "quantization": s.quantization,
                "content_check": (s.safety_checker or "model") if s.nsfw_check else None,
                "adapters": {name: sources.get(name) for name, _ in gen.key.loras},
            },
            "prompt": gen.prompt,
            "negative_prompt": gen.negative_prompt,
            "n": gen.n,
            "seed": seed,
            "width": gen.key.width,
            "height": gen.key.height,
            "steps": gen.key.steps,
            "guidance_scale": gen.key.guidance_scale,
            "scheduler": gen.key.scheduler,
            "task": gen.key.task,
            "loras": [list(pair) for pair in gen.key.loras],
            "strength": gen.key.strength,
            "inputs": gen.inputs_digest,
        },
    )


async def cached(state: State, key: str, gen: Generation, seed: int) -> Result | None:
    hit = await state.cache.get(key)
    if hit is None:
        metrics.CACHE_MISSES.inc()
        return None
    metrics.CACHE_HITS.inc()
    return Result(images=json.loads(hit), seeds=[seed + i for i in range(gen.n)], cached=True)


def enqueue(state: State, gen: Generation, seed: int) -> Job:
    """Into the bounded queue: 429 with Retry-After when it is full."""
    try:
        item = Item(
            gen.prompt,
            gen.negative_prompt,
            gen.n,
            seed,
            init_image=gen.init_image,
            mask_image=gen.mask_image,
            preview=gen.preview,
        )
        return state.batcher.submit(gen.key, item)
    except QueueFull as e:
        raise ApiError(
            429, "queue_full", "the queue is full; retry later", retry_after=e.retry_after, type_="rate_limit_error"
        ) from None
    except Draining:  # drain began while the cache was consulted
        raise draining_error() from None


async def enqueue_when_room(
    state: State, gen: Generation, seed: int, disconnected: Callable[[], Awaitable[bool]]
) -> Job:
    """An async job (sdserve.jobs) waits for room instead of failing with a 429: it queues once
    fewer than half of ``queue_size`` requests are queued, so interactive requests keep the
    other half, and jobs queue one at a time, taking turns by principal and in the order they
    came within one (``JobGate``).
    Waiting, it counts in sdserve_queue_depth (the autoscaler sees the demand); ``disconnected``
    (the job's poll: lease renewed, a cancel noticed) runs every second. A drain that begins
    before it queues raises ``Draining``: the job has not started, and another replica may
    take it up (``sdserve.jobs.Jobs``)."""
    batcher = state.batcher
    room = max(1, state.settings.queue_size // 2)
    batcher.waiting += 1
    batcher.depth_changed()
    turn = state.job_gate.turn(gen.principal)
    checked = time.monotonic()
    try:
        while True:
            room_now = turn.done() and batcher.depth < room
            if room_now or time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:
                checked = time.monotonic()
                if await disconnected():  # a cancel since the last look: it never reaches the queue
                    raise ApiError(499, "client_closed_request", "cancelled while waiting for room in the queue")
            if batcher.draining:
                raise Draining
            if room_now and batcher.depth < room:  # still, after that look at the job store
                return enqueue(state, gen, seed)
            if turn.done():  # this job's turn: look for room again shortly
                await asyncio.sleep(JOB_ROOM_POLL_SECONDS)
            else:  # another job's turn: wait for this one's
                await asyncio.wait({turn}, timeout=DISCONNECT_POLL_SECONDS)
    finally:
        batcher.waiting -= 1
        batcher.depth_changed()
        state.job_gate.leave(turn)


async def wait(state: State, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> None:
    """Until the job is done; its client leaving or the timeout cancels it if it has not started."""
    deadline = time.monotonic() + state.settings.timeout_seconds
    while not job.future.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            cancel(job, "timeout")
            raise ApiError(504, "timeout", f"not done within {state.settings.timeout_seconds:g}s", type_="server_error")
        # Wake once a second to notice a departed client; the result itself wakes us at once.
        await asyncio.wait({job.future}, timeout=min(DISCONNECT_POLL_SECONDS, remaining))
        if not job.future.done() and await disconnected():
            cancel(job, "client_disconnected")
            raise ApiError(499, "client_closed_request", "client disconnected")
    if job.future.cancelled():
        if job.item.dropped == "drain_timeout":  # dropped by a drain out of time, queued or running
            raise draining_error()
        raise ApiError(504, "timeout", "request was cancelled")
    exc = job.future.exception()
    if isinstance(exc, OutOfMemory):
        raise ApiError(503, "out_of_memory", str(exc) + "; retry with a smaller size", retry_after=5)
    if exc is not None:
        raise ApiError(500, "generation_failed", f"{type(exc).__name__}: {exc}")


async def encode(job: Job, fmt: ImageFormat = PNG) -> list[str]:
    """PNG (or JPEG, WebP) + base64 off the event loop; 400 when the content check withheld an image."""
    images = job.item.images
    if any(im is None for im in images):
        raise ApiError(400, "nsfw_content", "the generated image was withheld by the content check")
    t0 = time.perf_counter()
    encoded = await asyncio.to_thread(encode_b64, images, fmt)
    metrics.ENCODE_DURATION.observe(time.perf_counter() - t0)
    return encoded


def cache_later(state: State, job: Job, key: str, fmt: ImageFormat) -> None:
    """A seeded request given up on (its client left, or out of time) whose request batch runs
    on for the others has its images made all the same: once they are, they go to the cache, so
    the client's retry of the same request (an SDK retries a timeout with the same body) is a
    hit instead of a second run. Nothing is cached for a request that did not run to its end."""
    if job.future.done():  # cancelled before it ran, stopped at a step, or failed
        return

    async def store() -> None:
        with contextlib.suppress(ApiError):  # withheld by the content check: nothing to cache
            encoded = await encode(job, fmt)
            await state.cache.set(key, json.dumps(encoded).encode())
            metrics.CACHED_AFTER_DROP.inc()

    def done(future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        task = asyncio.get_running_loop().create_task(store(), name="sdserve-cache-later")
        state.caching.add(task)
        task.add_done_callback(state.caching.discard)

    job.future.add_done_callback(done)


async def generate(
    state: State,
    gen: Generation,
    disconnected: Callable[[], Awaitable[bool]],
    queued: Callable[[Job], None] | None = None,
    patient: bool = False,
) -> Result:
    """A validated request from admission to encoded images (seeded requests through the cache).
    ``queued`` (an async job or a streamed request, which report progress) is told the job
    once it is in the queue; a ``patient`` one (an async job) waits for room instead of a 429
    (``enqueue_when_room``)."""
    admit(state)
    key = None
    if gen.seed is not None:
        seed = gen.seed
        key = result_key(state, gen, seed)
        hit = await cached(state, key, gen, seed)
        if hit is not None:
            return hit
    else:
        seed = secrets.randbelow(2**32)
    job = await enqueue_when_room(state, gen, seed, disconnected) if patient else enqueue(state, gen, seed)
    if queued is not None:
        queued(job)
    try:
        await wait(state, job, disconnected)
    except ApiError:
        if key is not None:
            cache_later(state, job, key, gen.output)
        raise
    done = time.monotonic()
    encoded = await encode(job, gen.output)
    if key is not None:
        await state.cache.set(key, json.dumps(encoded).encode())
    started = job.started or done
    return Result(
        images=encoded,
        seeds=[seed + i for i in range(gen.n)],
        cached=False,
        queue_seconds=started - job.enqueued,
        inference_seconds=done - started,
    )
