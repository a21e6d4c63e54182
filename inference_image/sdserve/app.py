"""The FastAPI application: the routes (``routes``), the request steps (``steps``), the
error shape (``errors``) and the lifespan that starts the batcher and loads the model.

Request path: auth -> rate limit -> validation -> result cache -> queue -> batcher ->
worker -> encode -> response, with metrics at every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from . import errors, metrics
from .jobs import Jobs, make_store
from .lifecycle import load_model
from .middleware import BodyLimit, MetricsMiddleware, RequestLog
from .outputs import make_outputs
from .routes import GENERATION_ROUTES, router
from .settings import Settings
from .state import State
from .work import ImagePipeline


def create_app(settings: Settings | None = None, pipeline: ImagePipeline | None = None) -> FastAPI:
    """One server: ``pipeline`` defaults to the diffusers pipeline the settings describe."""
    settings = settings or Settings()
    if pipeline is None:
        from .pipeline import Pipeline

        pipeline = Pipeline(settings)
    state = State.build(settings, pipeline)
    state.jobs = Jobs(state, make_store(settings))
    state.outputs = make_outputs(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        state.jobs.start()
        metrics.READY.set(0)
        metrics.MODEL_LOADED.set(0)
        state.load_task = asyncio.create_task(load_model(state))
        yield
        metrics.READY.set(0)
        state.load_task.cancel()
        await state.jobs.stop()
        await state.batcher.stop()
        if state.caching:  # images of requests given up on, on their way to the cache
            await asyncio.wait(state.caching, timeout=5)
        await state.cache.close()

    app = FastAPI(
        title="sdserve",
        version="0.1.0",
        description="Stable Diffusion inference server (sdop). OpenAI-compatible Images API plus /generate.",
        lifespan=lifespan,
    )
    app.state.sd = state
    app.include_router(router)
    errors.install(app)
    # The router's own routes: FastAPI may keep an included router as one opaque entry.
    paths = {r.path for r in (*app.routes, *router.routes) if isinstance(r, (APIRoute, Route))}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, routes=paths, timed=GENERATION_ROUTES)  # outside BodyLimit: counts 413s
    app.add_middleware(RequestLog)  # the outermost: every answer has an id and a log line
    return app


__all__ = ["create_app"]
