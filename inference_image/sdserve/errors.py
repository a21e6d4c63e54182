"""Errors a client sees: one JSON shape (the OpenAI error body), a 4xx naming the field."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


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
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def error_response(e: ApiError) -> JSONResponse:
    headers = dict(e.headers)
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    body = {"error": {"message": e.message, "type": e.type, "code": e.code, "param": e.param}}
    return JSONResponse(body, status_code=e.status, headers=headers)


async def api_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return error_response(e)


async def validation_error(request: Request, e: Exception) -> JSONResponse:
    """A body FastAPI could not parse: 422 with the first bad field as ``param``."""
    assert isinstance(e, RequestValidationError)
    errors = e.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its loc is a character position, not a field
        where = first["loc"][-1] if len(first["loc"]) > 1 else 0
        ctx = first.get("ctx")
        reason = (ctx.get("error") if isinstance(ctx, dict) else None) or first["msg"]
        message = f"the body is not valid JSON: {reason} at character {where}"
        return error_response(ApiError(422, "invalid_json", message))
    loc = [str(p) for p in first["loc"] if p != "body"]
    param = loc[-1] if loc else None
    message = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in errors
    )
    body = {
        "error": {"message": message, "type": "invalid_request_error", "code": "invalid_value", "param": param},
        # NaN or Infinity in the body (Python's JSON parser takes them) is echoed as a string:
        # a response body must be valid JSON.
        "detail": json.loads(json.dumps(errors, default=str), parse_constant=str),
    }
    return JSONResponse(body, status_code=422)


#: Starlette's own refusals (no such route, a method the route does not take), by status.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def http_error(request: Request, e: Exception) -> JSONResponse:
    """What the router refuses before any route runs, in the same shape as every other error
    (FastAPI's default is ``{"detail": ...}``), its headers (a 405's ``Allow``) kept."""
    assert isinstance(e, HTTPException)
    where = f"{request.method} {request.url.path}"
    headers = dict(e.headers or {})
    if e.status_code == 404:
        message = f"no such endpoint: {where}"
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; it takes {headers.get('Allow', '')}".rstrip()
    else:
        message = f"{where}: {e.detail}"
    code = HTTP_CODES.get(e.status_code, "invalid_request")
    return error_response(ApiError(e.status_code, code, message, headers=headers))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
