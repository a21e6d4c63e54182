"""Start-up and shut-down of one server: load the model in the worker thread, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from . import metrics
from .state import State
from .work import ModelLoadError

log = logging.getLogger("sdserve.lifecycle")


async def load_model(state: State) -> None:
    """Load in the worker thread; a failure leaves the server up, unready, and says why."""
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
    p = state.pipeline
    metrics.MODEL_LOAD_SECONDS.set(p.load_seconds)
    metrics.MODEL_LOADED.set(1)
    metrics.MODEL_INFO.labels(state.settings.model_id, p.revision, p.device, str(p.dtype)).set(1)
    if not state.draining:
        metrics.READY.set(1)


async def start_drain(state: State) -> bool:
    """Readiness off, new requests 503, queued and running work finishes (drain_seconds at most)."""
    metrics.READY.set(0)
    log.info("draining: %d queued, %d in flight", state.batcher.depth, state.batcher.inflight)
    drained = await state.batcher.drain(state.settings.drain_seconds)
    log.info("drain %s", "complete" if drained else "timed out")
    return drained
