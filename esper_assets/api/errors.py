"""Errors as JSON: the one place an exception becomes an HTTP status.

Every error body is ``{"error": {"status", "code", "message", "field"?}}``. Library
errors (:class:`~esper_assets.errors.EsperError` subclasses) are mapped by
:data:`STATUS`, most specific class first; :class:`ApiError` carries its own status
and the request field it is about. Anything else is a 500 whose body says nothing
about the exception (it is logged once, with its traceback).
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from esper_assets.errors import (
    AssetConflict,
    AssetNotFound,
    ConfigError,
    CorruptValue,
    EsperError,
    InvalidInput,
    StorageError,
    TierUnavailable,
)

log = logging.getLogger(__name__)


class ApiError(EsperError):
    """A request the API refuses: its status, a short code, the field it is about."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field
        self.headers: dict[str, str] | None = (
            {"WWW-Authenticate": "Bearer"} if status == 401 else None
        )


# Most specific first: the first class an error is an instance of decides.
STATUS: tuple[tuple[type[EsperError], int, str], ...] = (
    (AssetNotFound, 404, "not_found"),
    (InvalidInput, 400, "invalid_input"),
    (AssetConflict, 409, "conflict"),
    (TierUnavailable, 503, "tier_unavailable"),
    (CorruptValue, 502, "corrupt_value"),
    (StorageError, 503, "storage_error"),
    (ConfigError, 500, "config_error"),
    (EsperError, 500, "error"),
)


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers=None
) -> JSONResponse:
    body = {"status": status, "code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def status_of(exc: EsperError) -> tuple[int, str]:
    for kind, status, code in STATUS:
        if isinstance(exc, kind):
            return status, code
    return 500, "error"  # unreachable: EsperError is the last row


async def esper_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, str(exc), exc.field, exc.headers)
    status, code = status_of(exc)  # type: ignore[arg-type]
    if status >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error_response(status, code, str(exc), getattr(exc, "field", None))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, "internal", "internal error; the server log has the details")


HANDLERS = {EsperError: esper_error, HTTPException: http_error, Exception: unexpected}
