"""Counts every response by route and status; times generation routes end to end."""

from __future__ import annotations

import time
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, routes: Collection[str], timed: Collection[str]):
        self.app = app
        self.routes = routes  # known paths keep their name; anything else is "other" (bounded labels)
        self.timed = timed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status["code"])).inc()
            if route in self.timed:
                metrics.REQUEST_DURATION.labels(route).observe(time.perf_counter() - t0)
