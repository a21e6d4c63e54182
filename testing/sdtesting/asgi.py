"""sdserve in this process: the app's lifespan and an httpx client over ASGITransport.

No port, no subprocess: a test gets a client in milliseconds (plus the model load when the
app uses the tiny pipeline). Metrics are read from sdserve's registry directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from sdserve import metrics

BASE_URL = "http://sdserve.test"


@asynccontextmanager
async def serve(app: FastAPI, *, wait_ready: bool = True, seconds: float = 120) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and yield a client to it; by default once /readyz says ready."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=seconds) as client:
            if wait_ready:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + seconds
                while (await client.get("/readyz")).status_code != 200:
                    if loop.time() > deadline:
                        raise TimeoutError((await client.get("/readyz")).text)
                    await asyncio.sleep(0.05)
            yield client


def metric(name: str, **labels: str) -> float:
    """A sample of sdserve's registry (0 when absent). Counters are process-wide: compare deltas."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0
