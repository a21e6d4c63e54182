"""The HTTP routes. Each one turns its body into a ``steps.Generation`` (or answers from
state) and lets ``steps`` do the work; dependencies are typed with ``Annotated``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException

from . import metrics, steps, stream
from .edits import Upload, edit_inputs
from .errors import ApiError
from .jobs import TERMINAL, check_webhook
from .lifecycle import start_drain
from .schemas import (
    ErrorResponse,
    Extensions,
    GenerateRequest,
    GenerateResponse,
    JobEditRequest,
    JobRequest,
    OpenAIEditRequest,
    OpenAIEditsRequest,
    OpenAIGenerationsRequest,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImageResponse,
    Timings,
    limit_problems,
    parse_size,
)
from .state import State
from .work import BatchKey

router = APIRouter()
EditBody = TypeVar("EditBody", bound=OpenAIEditRequest)

#: An Idempotency-Key header (the IETF draft's: a string; here printable ASCII, 255 at most).
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

#: How soon a job's event stream ended by a draining replica should reconnect (SSE ``retry``).
RECONNECT_MS = 1000

#: Routes whose end-to-end latency is the request-duration histogram.
GENERATION_ROUTES = frozenset({"/v1/images/generations", "/v1/images/edits", "/generate"})

#: What any route may answer in the error shape (413: a body over the limit, sdserve.middleware).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 503, 504)
}

#: The generation routes' answers: the JSON body, or with ``stream: true`` the events.
STREAMED: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "content": {
            "text/event-stream": {
                "schema": {"type": "string"},
                "example": 'event: image_generation.completed\ndata: {"type": "image_generation.completed", ...}\n\n',
            }
        },
        "description": "JSON, or with stream: true server-sent events (see the API docs' Streaming).",
    },
}


def get_state(request: Request) -> State:
    state: State = request.app.state.sd
    return state


StateDep = Annotated[State, Depends(get_state)]


async def authenticated(
    state: StateDep,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> str:
    return await steps.authenticate(state, authorization, x_api_key)


async def rate_limited(state: StateDep, request: Request, principal: Annotated[str, Depends(authenticated)]) -> str:
    return await steps.rate_limit(state, principal, request.client.host if request.client else None)


Principal = Annotated[str, Depends(authenticated)]
LimitedPrincipal = Annotated[str, Depends(rate_limited)]


def check_openai(state: State, body: OpenAIImageRequest | OpenAIEditRequest) -> None:
    """The Images API fields every route checks alike: the response format and the model."""
    if body.response_format == "url" and state.outputs is None:
        raise ApiError(
            422,
            "unsupported_value",
            "response_format 'url' needs object storage (spec.outputs.s3, SDSERVE_S3_BUCKET); use b64_json",
            param="response_format",
        )
    if body.model and body.model not in state.settings.model_names:
        served = state.settings.served_models
        raise ApiError(404, "model_not_found", f"this server serves {served}, not {body.model!r}", param="model")


def key_for(state: State, width: int, height: int, body: Extensions) -> BatchKey:
    """The batch key of a request body, its LoRA adapters resolved."""
    return steps.batch_key(
        state,
        width,
        height,
        body.num_inference_steps,
        body.guidance_scale,
        body.scheduler,
        steps.lora_set(state, body.lora, body.loras),
    )


async def openai_images(
    state: State, r: steps.Result, gen: steps.Generation, response_format: str
) -> OpenAIImageResponse:
    """The answer of the Images API: base64 images, or presigned URLs of stored ones; each
    with ``revised_prompt`` when the model read only part of the prompt."""
    revised = await steps.prompt_read(state, gen)
    if response_format == "url":
        urls = await state.outputs.urls(r.images, gen.output)
        data = [OpenAIImage(url=u, seed=seed, revised_prompt=revised) for u, seed in zip(urls, r.seeds, strict=True)]
    else:
        data = [
            OpenAIImage(b64_json=b, seed=seed, revised_prompt=revised)
            for b, seed in zip(r.images, r.seeds, strict=True)
        ]
    return OpenAIImageResponse(created=int(time.time()), data=data, output_format=gen.output.kind)


def openai_generation(state: State, body: OpenAIImageRequest) -> steps.Generation:
    """A validated generation from an OpenAI Images API body (also the body of a job)."""
    s = state.settings
    check_openai(state, body)
    size = parse_size(body.size) if body.size not in (None, "auto") else state.default_size
    if size is None:
        raise ApiError(422, "invalid_value", f"size must be WIDTHxHEIGHT, got {body.size!r}", param="size")
    key = key_for(state, size[0], size[1], body)
    negative = steps.negative_prompt(state, body.negative_prompt)
    gen = steps.Generation(key, body.prompt, negative, body.n, body.seed, output=body.image_format(), model=body.model)
    problems = limit_problems(
        s,
        prompt=body.prompt,
        negative=negative,
        width=size[0],
        height=size[1],
        n=body.n,
        steps=key.steps,
        width_field="size",
        height_field="size",
        n_field="n",
    )
    steps.validate(state, gen, problems)
    return gen


@router.post("/v1/images/generations", response_model=OpenAIImageResponse, responses=STREAMED, tags=["images"])
async def images_generations(
    body: OpenAIGenerationsRequest, request: Request, state: StateDep, principal: LimitedPrincipal
) -> Any:
    """The OpenAI Images API; ``stream: true`` answers server-sent events (``sdserve.stream``)."""
    return await answer(state, request, openai_generation(state, body), body)


async def answer(
    state: State, request: Request, gen: steps.Generation, body: OpenAIGenerationsRequest | OpenAIEditsRequest
) -> Any:
    """A generation or an edit answered: one JSON body, or a stream of events."""
    if body.stream:
        if body.response_format == "url":
            raise ApiError(
                422,
                "invalid_value",
                "a streamed generation sends its images in its events: response_format must be b64_json",
                param="response_format",
            )
        return await stream.respond(state, request, gen, body.partial_images)
    if body.partial_images:
        raise ApiError(422, "invalid_value", "partial_images needs stream: true", param="partial_images")
    r = await steps.generate(state, gen, request.is_disconnected)
    return await openai_images(state, r, gen, body.response_format)


@router.post("/v1/jobs", status_code=202, responses=ERRORS, tags=["jobs"])
async def submit_job(request: Request, state: StateDep, principal: LimitedPrincipal) -> JSONResponse:
    """A generation or an edit run in the background: 202 with the job's id; poll it, stream its
    events, cancel it, or be called back (a signed webhook) when it ends. JSON: a generations
    body plus ``webhook``; multipart: an edits form plus ``webhook`` (JSON in a form field)."""
    body: JobRequest | JobEditRequest
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        gen, body = await edit_generation(state, request, JobEditRequest)
    else:
        try:
            body = JobRequest.model_validate(await request.json())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        except json.JSONDecodeError as e:
            message = f"the body is not valid JSON: {e.msg} at character {e.pos}; send JSON or a multipart form"
            raise ApiError(422, "invalid_json", message) from None
        except ValueError:  # not UTF-8
            raise ApiError(422, "invalid_json", "the body must be JSON (UTF-8) or a multipart form") from None
        gen = openai_generation(state, body)  # a JobRequest is a generations body
    if body.webhook is not None:
        check_webhook(state.settings, body.webhook.url)
    webhook = body.webhook.model_dump() if body.webhook else None
    gen.preview = body.preview
    urls = body.response_format == "url"
    idempotency = None
    if key := request.headers.get("idempotency-key"):
        if not IDEMPOTENCY_KEY.match(key):
            raise ApiError(
                422,
                "invalid_value",
                "Idempotency-Key must be 1-255 printable ASCII characters",
                param="Idempotency-Key",
            )
        seed = gen.seed if gen.seed is not None else -1  # an unseeded retry is the same request too
        asked = [steps.result_key(state, gen, seed), urls, webhook and webhook["url"], gen.preview]
        idempotency = (key, hashlib.sha256(json.dumps(asked).encode()).hexdigest())
    record, replayed = await state.jobs.submit(principal, gen, webhook, urls=urls, idempotency=idempotency)
    headers = {"Location": f"/v1/jobs/{record.id}"} | ({"Idempotent-Replayed": "true"} if replayed else {})
    return JSONResponse(state.jobs.view(record), status_code=202, headers=headers)


@router.get("/v1/jobs", responses=ERRORS, tags=["jobs"])
async def list_jobs(
    state: StateDep,
    principal: Principal,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    """The caller's jobs, newest first (``after``: the last id of the page before); each without
    its images: ``GET /v1/jobs/{id}`` has them."""
    return await state.jobs.page(principal, limit, after)


@router.get("/v1/jobs/{job_id}", responses=ERRORS, tags=["jobs"])
async def get_job(job_id: str, state: StateDep, principal: Principal) -> dict[str, Any]:
    return state.jobs.view(await state.jobs.get(principal, job_id))


@router.delete("/v1/jobs/{job_id}", responses=ERRORS, tags=["jobs"])
async def cancel_job(job_id: str, state: StateDep, principal: Principal) -> dict[str, Any]:
    """Cancel: a queued job at once, a running one at its next step (step batching) or when its
    batch ends (request batching; its result is dropped)."""
    return state.jobs.view(await state.jobs.cancel(principal, job_id))


@router.get("/v1/jobs/{job_id}/events", responses=ERRORS, tags=["jobs"])
async def job_events(job_id: str, request: Request, state: StateDep, principal: Principal) -> StreamingResponse:
    """Server-sent events: ``progress`` whenever the status or step changes, then ``done``
    with the job as GET shows it (``error`` if the record is gone meanwhile). An outage of the
    job store keeps the stream open: it asks again every second. A draining replica ends the
    stream of a job another replica runs with a ``retry`` hint: the client's EventSource
    reconnects through the Service to a replica that stays, and this one's shutdown does not
    wait for that job."""
    await state.jobs.get(principal, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last = None
        while not await request.is_disconnected():
            try:
                record = await state.jobs.get(principal, job_id)
            except ApiError as e:
                if e.status >= 500:  # the job store is unreachable for now (logged): ask again
                    await asyncio.sleep(1.0)
                    continue
                error = {"code": e.code, "message": e.message}  # gone meanwhile (past its TTL)
                yield f"event: error\ndata: {json.dumps({'error': error})}\n\n"
                return
            view = state.jobs.view(record)
            if record.status in TERMINAL:
                yield f"event: done\ndata: {json.dumps(view)}\n\n"
                return
            if state.draining and not state.jobs.runs(job_id):
                yield f"retry: {RECONNECT_MS}\n\n"
                return
            now = (view["status"], view["progress"]["step"])
            if now != last:
                last = now
                event = {k: view[k] for k in ("id", "status", "progress", "preview") if k in view}
                yield f"event: progress\ndata: {json.dumps(event)}\n\n"
            await asyncio.sleep(0.25)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.post(
    "/v1/images/edits",
    response_model=OpenAIImageResponse,
    responses=STREAMED,
    tags=["images"],
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", "prompt"],
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            "mask": {"type": "string", "format": "binary"},
                            **OpenAIEditsRequest.model_json_schema()["properties"],
                        },
                    }
                }
            }
        }
    },
)
async def images_edits(request: Request, state: StateDep, principal: LimitedPrincipal) -> Any:
    """Image-to-image without a mask, inpainting with one; multipart as the OpenAI SDK sends it;
    ``stream: true`` answers server-sent events (``sdserve.stream``)."""
    gen, body = await edit_generation(state, request, OpenAIEditsRequest)
    return await answer(state, request, gen, body)


async def edit_generation(state: State, request: Request, model: type[EditBody]) -> tuple[steps.Generation, EditBody]:
    """A validated edit from a multipart form (the edits route's, or a job's)."""
    s = state.settings
    try:
        form = await request.form()
    except HTTPException as e:  # Starlette's 400 for a body that does not parse as the form it says it is
        raise ApiError(
            400, "invalid_multipart", f"the body is not a valid multipart/form-data form: {e.detail}"
        ) from None
    uploads: dict[str, Upload] = {}
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        field_ = "image" if name == "image[]" else name
        if isinstance(value, StarletteUpload):
            if field_ not in ("image", "mask"):
                raise ApiError(422, "invalid_value", f"{field_} cannot be a file", param=field_)
            if field_ in uploads:
                raise ApiError(422, "invalid_value", f"one {field_} per request", param=field_)
            uploads[field_] = Upload(field_, await value.read())
        elif field_ in ("image", "mask"):
            raise ApiError(422, "invalid_value", f"{field_} must be a file", param=field_)
        else:
            fields[field_] = value
    if "image" not in uploads:
        raise ApiError(422, "missing", "image is required", param="image")
    for name in ("loras", "webhook"):  # objects in a form: JSON
        if isinstance(fields.get(name), str):
            try:
                fields[name] = json.loads(fields[name])
            except ValueError:
                raise ApiError(422, "invalid_value", f"{name} must be a JSON object", param=name) from None
    try:
        body = model.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    check_openai(state, body)
    size = parse_size(body.size) if body.size else None
    if body.size and size is None:
        raise ApiError(422, "invalid_value", f"size must be WIDTHxHEIGHT, got {body.size!r}", param="size")
    # Decoding and resizing take a while (a 16-megapixel upload): off the event loop.
    inputs = await asyncio.to_thread(edit_inputs, uploads["image"], uploads.get("mask"), size, s.max_upload_bytes)
    task = "inpaint" if inputs.mask is not None else "img2img"
    strength = body.strength if body.strength is not None else (1.0 if task == "inpaint" else 0.8)
    key = key_for(state, inputs.width, inputs.height, body)
    key = replace(key, task=task, strength=strength)
    negative = steps.negative_prompt(state, body.negative_prompt)
    gen = steps.Generation(
        key,
        body.prompt,
        negative,
        body.n,
        body.seed,
        inputs.image,
        inputs.mask,
        inputs.digest,
        output=body.image_format(),
        model=body.model,
    )
    side_field = "size" if size else "image"
    problems = limit_problems(
        s,
        prompt=body.prompt,
        negative=negative,
        width=inputs.width,
        height=inputs.height,
        n=body.n,
        steps=key.steps,
        width_field=side_field,
        height_field=side_field,
        n_field="n",
    )
    if key.denoising_steps < 1:  # diffusers would run no step and fail inside the pipeline
        problems.append(("strength", f"{strength} of {key.steps} steps is no denoising step; raise it or the steps"))
    steps.validate(state, gen, problems)
    return gen, body


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS, tags=["images"])
async def generate(
    body: GenerateRequest, request: Request, state: StateDep, principal: LimitedPrincipal
) -> GenerateResponse:
    t0 = time.perf_counter()
    default_w, default_h = state.default_size
    width, height = body.width or default_w, body.height or default_h
    key = key_for(state, width, height, body)
    negative = steps.negative_prompt(state, body.negative_prompt)
    gen = steps.Generation(key, body.prompt, negative, body.num_images, body.seed)
    problems = limit_problems(
        state.settings,
        prompt=body.prompt,
        negative=negative,
        width=width,
        height=height,
        n=body.num_images,
        steps=key.steps,
        width_field="width",
        height_field="height",
        n_field="num_images",
    )
    steps.validate(state, gen, problems)
    r = await steps.generate(state, gen, request.is_disconnected)
    return GenerateResponse(
        image=r.images[0],
        images=r.images,
        seeds=r.seeds,
        model=state.settings.model_id,
        revision=state.pipeline.revision,
        cached=r.cached,
        timings=Timings(
            queue_seconds=r.queue_seconds,
            inference_seconds=r.inference_seconds,
            total_seconds=time.perf_counter() - t0,
        ),
    )


@router.get("/v1/models", tags=["models"])
async def models(state: StateDep, principal: Principal) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": state.settings.model_id,
                "object": "model",
                "created": int(state.started),
                "owned_by": "sdop",
                "revision": state.pipeline.revision,
                # other names a request's model may give (a canary's: the stable model's)
                "aliases": state.settings.model_names[1:],
                "ready": state.ready,
                # generate, img2img, inpaint; an inpainting model: inpaint alone (once loaded)
                "tasks": list(state.pipeline.tasks),
                # what a request gets for what it does not name
                "defaults": {
                    "size": "{}x{}".format(*state.default_size),
                    "steps": state.settings.steps_default,
                    "guidance_scale": state.settings.default_guidance_scale,
                    "negative_prompt": state.settings.default_negative_prompt,
                },
            }
        ],
    }


@router.get("/healthz", tags=["health"], response_model=None)
async def healthz(state: StateDep) -> dict[str, str] | JSONResponse:
    # Liveness: the event loop answers, the batcher runs and no model call hangs (QueueBase.problem).
    # Never waits on the model.
    problem = state.problem
    if problem is not None:
        return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], response_model=None)
async def readyz(state: StateDep) -> dict[str, str] | JSONResponse:
    # Unready as soon as /healthz fails too: traffic leaves a hung replica before its restart.
    problem = state.problem
    if state.ready and problem is None:
        return {"status": "ready", "model": state.settings.model_id, "revision": state.pipeline.revision}
    if state.draining:
        reason = "draining"
    elif state.load_error:
        reason = "model_load_failed"
    else:
        reason = "unhealthy" if problem is not None else "loading"
    message = {"model_load_failed": state.load_error, "unhealthy": problem}.get(reason) or reason
    return JSONResponse({"status": "not_ready", "reason": reason, "message": message}, status_code=503)


@router.get("/metrics", tags=["health"])
async def metrics_endpoint() -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/drain", tags=["admin"])
async def drain(request: Request, state: StateDep) -> dict[str, Any]:
    """Called by the preStop hook from inside the pod: stop taking work, finish what is queued.
    Not through a proxy: with a trusted one the client address is what X-Forwarded-For says."""
    proxied = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    if proxied or request.client is None or request.client.host not in ("127.0.0.1", "::1"):
        raise ApiError(403, "forbidden", "drain is only accepted from the pod itself (its preStop hook)")
    drained = await start_drain(state)
    return {"drained": drained, "queued": state.batcher.depth}
