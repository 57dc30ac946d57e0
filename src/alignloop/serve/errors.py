"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status
that says whose fault it is and ``param`` naming the field; a 5xx means a bug or a failed forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignloop.errors import AlignloopError
import sqlalchemy as sa

from alignloop.feedback.database import database_error
from alignloop.feedback.store import IdempotencyConflict, Invalid, NotAuthorized, NotFound, StoreError, Unavailable
from alignloop.serve.schemas import ErrorBody

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503)}  # the statuses the docs list
RETRY_AFTER_S = 2  # what a 503 from an unreachable database tells the client to wait


class ApiError(Exception):
    """An error the client caused, answered as ``status`` with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def error_body(message: str, type: str, param: str | None = None) -> dict:
    """OpenAI's error shape, for responses and for an error inside a stream."""
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


def error_response(status: int, message: str, type: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param), status, headers=headers)


def store_error_status(e: StoreError) -> tuple[int, str, str | None]:
    """HTTP status, error type and field of a store's refusal."""
    param = getattr(e, "field", None)
    if isinstance(e, NotFound):
        return 404, "not_found_error", param
    if isinstance(e, Invalid):
        return 422, "invalid_request_error", param
    if isinstance(e, IdempotencyConflict):
        return 409, "conflict_error", param
    if isinstance(e, NotAuthorized):
        return 401, "authentication_error", param
    if isinstance(e, Unavailable):
        return 503, "service_unavailable_error", param
    return 503, "server_error", param


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error the routes, the validation and the store raise in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error") or first.get("msg")
            return error_response(400, f"the body is not valid JSON: {detail}", "invalid_request_error", "body")
        param = _field_name(first.get("loc", ()))
        message = "; ".join(f"{_field_name(err.get('loc', ())) or 'body'}: {err.get('msg')}" for err in errors[:5])
        return error_response(422, message, "invalid_request_error", param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                              headers=getattr(e, "headers", None))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, e: StoreError) -> JSONResponse:
        status, kind, param = store_error_status(e)
        if isinstance(e, IdempotencyConflict):
            param = "Idempotency-Key"  # the header of POST /v1/feedback
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return error_response(status, str(e), kind, param, headers)

    @app.exception_handler(sa.exc.DBAPIError)
    async def database_failed(request: Request, e: sa.exc.DBAPIError) -> JSONResponse:
        """A read that met a dropped connection (the pool replaces it for the next request)."""
        return await store_error(request, database_error(e))

    @app.exception_handler(AlignloopError)
    async def alignloop_error(request: Request, e: AlignloopError) -> JSONResponse:
        return error_response(400, str(e), "invalid_request_error")


def _field_name(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "role")`` → ``messages[0].role``."""
    name = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not name:
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name
