"""Streamed generations, as the OpenAI Images API streams them (``stream: true`` on
``POST /v1/images/generations``): server-sent events, ``image_generation.partial_image`` up to
``partial_images`` times while the first image is denoised, then one
``image_generation.completed`` per image, in order.

A partial image is the first image's latent preview (``sdserve.preview``: one pixel per latent
pixel, no VAE decode) at evenly spaced steps; a request with too few steps, or steps taken
faster than they are watched, gets fewer. The request is admitted before the stream starts, so
what a plain request is refused with (a 422, a 429 with Retry-After, a 503) comes as the same
HTTP error; what goes wrong after the 200 comes as an ``error`` event, which the OpenAI SDK
raises as an APIError. A client that goes away cancels its request (under step batching it
leaves the batch at the next step), as a plain request's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from . import steps
from .errors import ApiError
from .middleware import OUTCOME
from .queue import Job, cancel
from .state import State

log = logging.getLogger("sdserve.stream")

#: How often the stream looks at the first image's progress for the next partial image.
WATCH_SECONDS = 0.05


def marks(denoising_steps: int, partial_images: int) -> list[int]:
    """The steps after which the partial images are sent: evenly spaced, before the last (whose
    image the completed event carries), each once."""
    spaced = (j * denoising_steps // (partial_images + 1) for j in range(1, partial_images + 1))
    return sorted({m for m in spaced if 1 <= m < denoising_steps})


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def respond(state: State, request: Request, gen: steps.Generation, partial_images: int) -> StreamingResponse:
    """Admit the request, then stream it. How it ends goes in the request's state (``OUTCOME``):
    the metrics and the access log count a failed stream as the error it is, not its 200."""
    loop = asyncio.get_running_loop()
    queued: asyncio.Future[Job] = loop.create_future()
    gone = False

    async def disconnected() -> bool:
        return gone

    gen.preview = partial_images > 0
    task = loop.create_task(steps.generate(state, gen, disconnected, queued.set_result))
    either: set[asyncio.Future[Any]] = {task, queued}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]  # refused before it was queued: an HTTP error
    revised = await steps.prompt_read(state, gen)
    size = f"{gen.key.width}x{gen.key.height}"
    common = {"size": size, "quality": "auto", "background": "opaque"}

    async def events() -> AsyncIterator[str]:
        nonlocal gone
        job = queued.result() if queued.done() else None  # None: a cached result, no queue
        try:
            if job is not None:
                due = marks(gen.key.denoising_steps, partial_images)
                sent = 0
                while due and not task.done():
                    progress = job.item.progress
                    preview = await asyncio.to_thread(job.item.preview_png) if progress >= due[0] else None
                    if preview is not None:
                        while due and progress >= due[0]:  # marks passed since the last look: one image
                            due.pop(0)
                        yield event(
                            "image_generation.partial_image",
                            {
                                "type": "image_generation.partial_image",
                                "b64_json": preview,
                                "created_at": int(time.time()),
                                "output_format": "png",  # a preview is PNG, whatever the images are
                                "partial_image_index": sent,
                                **common,
                            },
                        )
                        sent += 1
                    await asyncio.wait({task}, timeout=WATCH_SECONDS)
            try:
                result = await task
            except ApiError as e:
                setattr(request.state, OUTCOME, e.status)
                error = {"code": e.code, "message": e.message, "type": e.type, "param": e.param}
                yield event("error", {"type": "error", "error": error})
                return
            except Exception as e:  # not an ApiError: a bug, told as a plain request's 500 would be
                log.exception("a streamed generation failed")
                setattr(request.state, OUTCOME, 500)
                message = f"{type(e).__name__}: {e}"
                error = {"code": "generation_failed", "message": message, "type": "server_error", "param": None}
                yield event("error", {"type": "error", "error": error})
                return
            for index, (b64, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
                completed = {
                    "type": "image_generation.completed",
                    "b64_json": b64,
                    "created_at": int(time.time()),
                    "output_format": gen.output.kind,
                    **common,
                    "index": index,
                    "seed": seed,
                }
                if revised is not None:
                    completed["revised_prompt"] = revised
                yield event("image_generation.completed", completed)
        finally:
            if not task.done():  # the client went away: its request goes too
                setattr(request.state, OUTCOME, 499)
                gone = True
                if job is not None:
                    cancel(job, "client_disconnected")
                task.add_done_callback(_quiet)

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _quiet(task: asyncio.Task[Any]) -> None:
    """A stream's request that ended after its client left: its error (499) is nobody's."""
    with contextlib.suppress(BaseException):
        task.exception()
