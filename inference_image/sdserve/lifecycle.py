"""Start-up and shut-down of one server: load and warm up the model on the threads that serve
it, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from . import metrics
from .state import State
from .work import ModelLoadError

log = logging.getLogger("sdserve.lifecycle")


#: Exit code after a model load failure (SDSERVE_EXIT_AFTER_LOAD_FAILURE_SECONDS).
LOAD_FAILED_EXIT_CODE = 3
#: The prefix of the termination message the operator recognises.
LOAD_FAILED = "model_load_failed"
#: After a drain out of time, the seconds the server still has, within the 15 s the operator
#: leaves between the drain (SDSERVE_DRAIN_SECONDS) and the kill (terminationGracePeriodSeconds):
#: running work that would end within them ends; what would not is dropped at its next step,
#: as what is still queued is; and the jobs dropped have them to be handed off (a write or two
#: to Redis each).
AFTER_DRAIN_SECONDS = 5.0


async def load_model(state: State) -> None:
    """Load and warm up on the batcher's threads (``QueueBase.load``); a failure leaves the
    server up, unready, and says why (on /readyz and in metrics). In Kubernetes the operator
    also asks it to write the reason to the termination log and exit, so the pod's status
    names the failure."""
    try:
        await state.batcher.load()
    except ModelLoadError as e:
        state.load_error = str(e)
        log.error("MODEL LOAD FAILED: %s (the server stays up, unready; see sdserve_model_load_failures_total)", e)
        _load_failed(state)
        return
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.exception("MODEL LOAD FAILED")
        _load_failed(state)
        return
    state.loaded = True
    p = state.pipeline
    metrics.MODEL_LOAD_SECONDS.set(p.load_seconds)
    metrics.MODEL_LOADED.set(1)
    metrics.MODEL_INFO.labels(state.settings.model_id, p.revision, p.device, str(p.dtype)).set(1)
    if not state.draining:
        metrics.READY.set(1)


def _load_failed(state: State) -> None:
    metrics.MODEL_LOAD_FAILURES.inc()
    s = state.settings
    message = f"{LOAD_FAILED}: {state.load_error}"
    if s.termination_log:
        try:
            with open(s.termination_log, "w") as f:
                f.write(message[:4000])  # the kubelet keeps at most 4096 bytes
        except OSError as e:
            log.warning("could not write the termination log %s: %s", s.termination_log, e)
    if s.exit_after_load_failure_seconds is not None:
        log.error("exiting in %.0f s so the pod's status shows the failure", s.exit_after_load_failure_seconds)
        asyncio.get_running_loop().call_later(s.exit_after_load_failure_seconds, _exit_load_failed)


def _exit_load_failed() -> None:
    logging.shutdown()
    os._exit(LOAD_FAILED_EXIT_CODE)  # nothing to drain: the model never loaded


async def start_drain(state: State) -> bool:
    """Readiness off, new requests 503, queued and running work finishes, and async jobs store
    and report their ends (drain_seconds at most, in all). Out of time, the queued work and the
    running work that would not end within ``AFTER_DRAIN_SECONDS`` are dropped (requests 503
    ``draining``, jobs handed off to other replicas), and the jobs have those seconds more to
    end or be handed off."""
    metrics.READY.set(0)
    log.info("draining: %d queued, %d in flight", state.batcher.depth, state.batcher.inflight)
    deadline = time.monotonic() + state.settings.drain_seconds
    drained = await state.batcher.drain(state.settings.drain_seconds, AFTER_DRAIN_SECONDS)
    if state.jobs is not None:
        left = deadline - time.monotonic()
        if not drained:  # out of time: what it dropped is still being handed off
            left = max(left, AFTER_DRAIN_SECONDS)
        drained = await state.jobs.drain(max(0.0, left)) and drained
    log.info("drain %s", "complete" if drained else "timed out")
    return drained
