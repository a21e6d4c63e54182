"""The HTTP API. Request path: auth -> rate limit -> validation -> result cache -> queue ->
batcher -> worker -> encode -> response, one function each, with metrics at every step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics
from .auth import Authenticator, AuthError
from .cache import cache_key, make_cache
from .encode import png_b64
from .pipeline import BatchKey, Item, ModelLoadError, OutOfMemory, Pipeline
from .queue import Batcher, Draining, QueueFull, cancel
from .ratelimit import make_limiter
from .safety import Blocklist
from .schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImageResponse,
    Timings,
    limit_problems,
    parse_size,
)
from .settings import Settings

log = logging.getLogger("sdserve.app")

ROUTES = {
    "/v1/images/generations",
    "/generate",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin/drain",
    "/docs",
    "/openapi.json",
}
GENERATION_ROUTES = {"/v1/images/generations", "/generate"}
DISCONNECT_POLL_SECONDS = 1.0


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        type_: str | None = None,
    ):
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retry_after = retry_after
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    body = {"error": {"message": e.message, "type": e.type, "code": e.code, "param": e.param}}
    return JSONResponse(body, status_code=e.status, headers=headers)


@dataclass
class State:
    settings: Settings
    pipeline: Pipeline
    batcher: Batcher | None = None
    cache: Any = None
    auth: Authenticator | None = None
    limiter: Any = None
    blocklist: Blocklist | None = None
    loaded: bool = False
    load_error: str | None = None
    load_task: asyncio.Task | None = None
    started: float = field(default_factory=time.time)

    @property
    def draining(self) -> bool:
        return self.batcher is not None and self.batcher.draining

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining


@dataclass
class Generation:
    """A validated generation request, whichever route it came from."""

    key: BatchKey
    prompt: str
    negative_prompt: str | None
    n: int
    seed: int | None


@dataclass
class Result:
    images: list[str]
    seeds: list[int]
    cached: bool
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0


class MetricsMiddleware:
    """Counts every response by route and status; times generation routes end to end."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status["code"])).inc()
            if route in GENERATION_ROUTES:
                metrics.REQUEST_DURATION.labels(route).observe(time.perf_counter() - t0)


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None) -> FastAPI:
    settings = settings or Settings()
    state = State(settings=settings, pipeline=pipeline or Pipeline(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s = state.settings
        state.batcher = Batcher(
            state.pipeline, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms, queue_size=s.queue_size
        )
        state.batcher.start()
        state.cache = make_cache(s)
        state.auth = Authenticator(s)
        state.limiter = make_limiter(s)
        state.blocklist = Blocklist.from_file(s.blocklist_file)
        metrics.READY.set(0)
        metrics.MODEL_LOADED.set(0)
        state.load_task = asyncio.create_task(_load_model(state))
        yield
        metrics.READY.set(0)
        state.load_task.cancel()
        await state.batcher.stop()
        await state.cache.close()

    app = FastAPI(
        title="sdserve",
        version="0.1.0",
        description="Stable Diffusion inference server (sdop). OpenAI-compatible Images API plus /generate.",
        lifespan=lifespan,
    )
    app.state.sd = state
    app.add_middleware(MetricsMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first["loc"] if p != "body"]
        param = loc[-1] if loc else None
        message = "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body')}: {err['msg']}" for err in errors)
        body = {
            "error": {"message": message, "type": "invalid_request_error", "code": "invalid_value", "param": param},
            "detail": json.loads(json.dumps(errors, default=str)),
        }
        return JSONResponse(body, status_code=422)

    # ---- request path steps -----------------------------------------------------------
    async def authenticate(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> str:
        try:
            return await state.auth.authenticate(authorization, x_api_key)
        except AuthError as e:
            raise ApiError(e.status, e.code, e.message, type_="authentication_error")

    async def rate_limit(request: Request, principal: str = Depends(authenticate)) -> str:
        if state.limiter is not None:
            key = principal if principal != "anonymous" else (request.client.host if request.client else "unknown")
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

    def check(gen: Generation, problems: list[tuple[str, str]]) -> None:
        if problems:
            field_, msg = problems[0]
            raise ApiError(422, "invalid_value", "; ".join(f"{f}: {m}" for f, m in problems), param=field_)
        reason = state.blocklist.check(gen.prompt, gen.negative_prompt)
        if reason:
            metrics.PROMPTS_REJECTED.labels(reason).inc()
            raise ApiError(400, reason, "the prompt contains blocked content", param="prompt")

    def draining() -> ApiError:
        metrics.REJECTED.labels("draining").inc()
        return ApiError(503, "draining", "this replica is shutting down; retry", retry_after=1)

    async def run(gen: Generation, request: Request) -> Result:
        if state.draining:
            raise draining()
        if not state.loaded:
            metrics.REJECTED.labels("not_ready").inc()
            raise ApiError(503, "model_not_ready", state.load_error or "the model is still loading", retry_after=10)
        seed = gen.seed
        key = None
        if seed is not None:
            key = cache_key(
                state.settings.model_id,
                state.pipeline.revision,
                {
                    "prompt": gen.prompt,
                    "negative_prompt": gen.negative_prompt,
                    "n": gen.n,
                    "seed": seed,
                    "width": gen.key.width,
                    "height": gen.key.height,
                    "steps": gen.key.steps,
                    "guidance_scale": gen.key.guidance_scale,
                    "scheduler": gen.key.scheduler,
                },
            )
            hit = await state.cache.get(key)
            if hit is not None:
                metrics.CACHE_HITS.inc()
                return Result(images=json.loads(hit), seeds=[seed + i for i in range(gen.n)], cached=True)
            metrics.CACHE_MISSES.inc()
        else:
            seed = secrets.randbelow(2**32)
        item = Item(gen.prompt, gen.negative_prompt, gen.n, seed)
        try:
            job = state.batcher.submit(gen.key, item)
        except QueueFull as e:
            raise ApiError(
                429, "queue_full", "the queue is full; retry later", retry_after=e.retry_after, type_="rate_limit_error"
            )
        except Draining:  # drain began while the cache was consulted
            raise draining()
        await wait_for_job(job, request)
        done = time.monotonic()
        images = job.future.result().images
        if any(im is None for im in images):
            raise ApiError(400, "nsfw_content", "the generated image was withheld by the content check")
        t0 = time.perf_counter()
        encoded = await asyncio.to_thread(png_b64, images)
        metrics.ENCODE_DURATION.observe(time.perf_counter() - t0)
        if key is not None:
            await state.cache.set(key, json.dumps(encoded).encode())
        return Result(
            images=encoded,
            seeds=[seed + i for i in range(gen.n)],
            cached=False,
            queue_seconds=(job.started or done) - job.enqueued,
            inference_seconds=done - (job.started or done),
        )

    async def wait_for_job(job, request: Request) -> None:
        deadline = time.monotonic() + state.settings.timeout_seconds
        while not job.future.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cancel(job, "timeout")
                raise ApiError(
                    504, "timeout", f"not done within {state.settings.timeout_seconds:g}s", type_="server_error"
                )
            # Wake once a second to notice a departed client; the result itself wakes us at once.
            await asyncio.wait({job.future}, timeout=min(DISCONNECT_POLL_SECONDS, remaining))
            if not job.future.done() and await request.is_disconnected():
                cancel(job, "client_disconnected")
                raise ApiError(499, "client_closed_request", "client disconnected")
        if job.future.cancelled():
            raise ApiError(504, "timeout", "request was cancelled")
        exc = job.future.exception()
        if isinstance(exc, OutOfMemory):
            raise ApiError(503, "out_of_memory", str(exc) + "; retry with a smaller size", retry_after=5)
        if exc is not None:
            raise ApiError(500, "generation_failed", f"{type(exc).__name__}: {exc}")

    def key_for(width: int, height: int, steps: int | None, guidance: float | None, scheduler: str) -> BatchKey:
        s = state.settings
        # "default" resolved here: the cache key and batch grouping see the scheduler that runs.
        return BatchKey(
            width,
            height,
            steps or s.default_steps,
            float(s.default_guidance_scale if guidance is None else guidance),
            s.scheduler if scheduler == "default" else scheduler,
        )

    # ---- routes ---------------------------------------------------------------------
    errors = {
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
        504: {"model": ErrorResponse},
    }

    @app.post("/v1/images/generations", response_model=OpenAIImageResponse, responses=errors, tags=["images"])
    async def images_generations(body: OpenAIImageRequest, request: Request, principal: str = Depends(rate_limit)):
        if body.response_format != "b64_json":
            raise ApiError(
                422,
                "unsupported_value",
                "response_format 'url' is not supported; use b64_json",
                param="response_format",
            )
        if body.model and body.model != state.settings.model_id:
            raise ApiError(
                404,
                "model_not_found",
                f"this server serves {state.settings.model_id!r}, not {body.model!r}",
                param="model",
            )
        size = parse_size(body.size) if body.size != "auto" else (512, 512)
        if size is None:
            raise ApiError(422, "invalid_value", f"size must be WIDTHxHEIGHT, got {body.size!r}", param="size")
        gen = Generation(
            key_for(size[0], size[1], body.num_inference_steps, body.guidance_scale, body.scheduler),
            body.prompt,
            body.negative_prompt,
            body.n,
            body.seed,
        )
        check(
            gen,
            limit_problems(
                state.settings,
                prompt=body.prompt,
                negative=body.negative_prompt,
                width=size[0],
                height=size[1],
                n=body.n,
                steps=gen.key.steps,
                width_field="size",
                height_field="size",
                n_field="n",
            ),
        )
        r = await run(gen, request)
        return OpenAIImageResponse(
            created=int(time.time()), data=[OpenAIImage(b64_json=b, seed=s) for b, s in zip(r.images, r.seeds)]
        )

    @app.post("/generate", response_model=GenerateResponse, responses=errors, tags=["images"])
    async def generate(body: GenerateRequest, request: Request, principal: str = Depends(rate_limit)):
        t0 = time.perf_counter()
        gen = Generation(
            key_for(body.width, body.height, body.num_inference_steps, body.guidance_scale, body.scheduler),
            body.prompt,
            body.negative_prompt,
            body.num_images,
            body.seed,
        )
        check(
            gen,
            limit_problems(
                state.settings,
                prompt=body.prompt,
                negative=body.negative_prompt,
                width=body.width,
                height=body.height,
                n=body.num_images,
                steps=gen.key.steps,
                width_field="width",
                height_field="height",
                n_field="num_images",
            ),
        )
        r = await run(gen, request)
        return GenerateResponse(
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

    @app.get("/v1/models", tags=["models"])
    async def models(principal: str = Depends(authenticate)):
        return {
            "object": "list",
            "data": [
                {
                    "id": state.settings.model_id,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "sdop",
                    "revision": state.pipeline.revision,
                    "ready": state.ready,
                }
            ],
        }

    @app.get("/healthz", tags=["health"])
    async def healthz():
        # Liveness: the event loop answers. Never waits on the model.
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz():
        if state.ready:
            return {"status": "ready", "model": state.settings.model_id, "revision": state.pipeline.revision}
        reason = "draining" if state.draining else ("model_load_failed" if state.load_error else "loading")
        return JSONResponse(
            {"status": "not_ready", "reason": reason, "message": state.load_error or reason}, status_code=503
        )

    @app.get("/metrics", tags=["health"])
    async def metrics_endpoint():
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/drain", tags=["admin"])
    async def drain(request: Request):
        """Called by the preStop hook from inside the pod: stop taking work, finish what is queued."""
        if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
            raise ApiError(403, "forbidden", "drain is only accepted from localhost")
        drained = await start_drain(state)
        return {"drained": drained, "queued": state.batcher.depth}

    return app


async def start_drain(state: State) -> bool:
    metrics.READY.set(0)
    log.info("draining: %d queued, %d in flight", state.batcher.depth, state.batcher.inflight)
    drained = await state.batcher.drain(state.settings.drain_seconds)
    log.info("drain %s", "complete" if drained else "timed out")
    return drained


async def _load_model(state: State) -> None:
    try:
        await asyncio.to_thread(state.pipeline.load)
    except ModelLoadError as e:
        state.load_error = str(e)
        metrics.MODEL_LOAD_FAILURES.inc()
        log.error("MODEL LOAD FAILED: %s (the server stays up, unready; see sdserve_model_load_failures_total)", e)
        return
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        metrics.MODEL_LOAD_FAILURES.inc()
        log.exception("MODEL LOAD FAILED")
        return
    state.loaded = True
    metrics.MODEL_LOAD_SECONDS.set(state.pipeline.load_seconds)
    metrics.MODEL_LOADED.set(1)
    metrics.MODEL_INFO.labels(
        state.settings.model_id, state.pipeline.revision, state.pipeline.device, str(state.pipeline.dtype)
    ).set(1)
    if not state.draining:
        metrics.READY.set(1)
