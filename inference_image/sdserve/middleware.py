"""The ASGI layers around the routes: ``RequestLog`` gives each request an id and logs it once
it is answered; ``MetricsMiddleware`` counts every response by route and status and times
generation routes end to end; ``BodyLimit`` refuses a request body over the limit (413) before
it is read."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .errors import ApiError, error_response

#: The id of the request being handled, in every log line of its handling (``RequestIdFilter``);
#: tasks started meanwhile (an async job) keep it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("sdserve_request_id", default="-")
#: An id a client or proxy sends is kept when it is a plain token (it goes into logs and headers).
_GIVEN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Probes and scrapes, every few seconds each: not in the access log.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

access_log = logging.getLogger("sdserve.access")


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` on every record (``-`` outside a request), for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


#: Where a streamed answer (sdserve.stream) records how it ended, after its 200 went out.
OUTCOME = "sdserve_outcome"


def outcome(scope: Scope, sent: int) -> int:
    """The status a request is counted and logged with: the one sent, or for a stream that
    failed or lost its client after its 200, the status a plain request would have had (so
    error-ratio alerts see a streamed failure)."""
    code = scope.get("state", {}).get(OUTCOME)
    return int(code) if code is not None else sent


class RequestLog:
    """Each request gets an id, the client's or proxy's ``X-Request-ID`` when it is a plain
    token, else a new one; it is answered in ``X-Request-ID`` and carried by the log lines of
    the request's handling. Every request but probes and scrapes is logged once, when its
    answer has been sent: method, path, status, seconds and id (logger ``sdserve.access``)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _GIVEN_ID.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in QUIET_PATHS:
                access_log.info(
                    "%s %s %d %.3fs",
                    scope["method"],
                    scope["path"],
                    outcome(scope, status["code"]),
                    time.perf_counter() - t0,
                    extra={"request_id": request_id},
                )
            REQUEST_ID.reset(token)


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
            code = outcome(scope, status["code"])
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(code)).inc()
            if route in self.timed:
                metrics.REQUEST_DURATION.labels(route).observe(time.perf_counter() - t0)


class BodyLimit:
    """413 for a request body over ``max_bytes``: at once when its Content-Length says so, or
    as soon as that many bytes of a body without one arrived. The routes would otherwise read a
    body whole (an upload into memory) before they could judge its size."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> ApiError:
        return ApiError(413, "request_too_large", f"the request body is over {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await error_response(self._refusal())(scope, receive, send)
        received, over, started = 0, False, False

        async def limited() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True  # the route sees its client gone; the 413 below is the answer
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the route's own answer to a body it could not read
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await error_response(self._refusal())(scope, receive, send)
