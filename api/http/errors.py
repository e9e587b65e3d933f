"""The exception handlers that turn every error into RFC 9457 problem JSON (built by
``api.http.problems``), and the problem models OpenAPI shows; no stack trace, secret or key ever
reaches a client."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from slowapi.errors import RateLimitExceeded
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api.http.middleware import log_unexpected
from api.http.problems import problem_response
from auth.db import classify_database_error
from auth.errors import (
    Conflict,
    DependencyUnavailable,
    InvalidRequest,
    ModelgateError,
    NotFound,
)
from auth.limits.limiter import KeyRateLimitExceeded
from ml import InvalidFeatures, ModelNotFound, ModelUnavailable

logger = structlog.get_logger(__name__)


class Problem(BaseModel):
    """An RFC 9457 problem; ``type`` is a relative URI reference naming the problem."""

    type: str = Field(examples=["quota-exceeded"])
    title: str
    status: int
    detail: str
    request_id: str | None = None


class ValidationProblem(Problem):
    """A 422 problem with the offending fields."""

    errors: list[dict[str, Any]]


def _from_error(request: Request, error: ModelgateError) -> JSONResponse:
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    extra: dict[str, Any] = {}
    if error.status_code == 422:
        # Every 422 names what was wrong, whether the schema or a service refused it.
        loc = list(error.loc) if isinstance(error, InvalidRequest) else []
        extra["errors"] = [{"loc": loc, "msg": error.detail, "type": "value_error"}]
    return problem_response(
        request.scope, error.status_code, error.type, error.title, error.detail, headers, **extra
    )


async def _modelgate_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ModelgateError):
        raise exc
    return _from_error(request, exc)


async def _model_error(request: Request, exc: Exception) -> JSONResponse:
    mapped: ModelgateError
    if isinstance(exc, ModelNotFound):
        mapped = NotFound(str(exc))
    elif isinstance(exc, InvalidFeatures):
        mapped = InvalidRequest(str(exc))
    else:
        mapped = DependencyUnavailable(str(exc) or "model unavailable", retry_after=5)
    return _from_error(request, mapped)


async def _rate_limited(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RateLimitExceeded):
        raise exc
    headers = {}
    if isinstance(exc, KeyRateLimitExceeded):
        headers["Retry-After"] = str(exc.status.retry_after)
    return problem_response(
        request.scope,
        429,
        "rate-limited",
        "Too many requests",
        f"rate limit exceeded: {exc.detail}",
        headers,
    )


def _safe_validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Pydantic echoes the offending input; it could be a secret, so it is dropped.
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    return problem_response(
        request.scope,
        422,
        "validation-error",
        "Invalid request",
        "the request does not match the expected schema",
        errors=_safe_validation_errors(exc),
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    if isinstance(exc.__cause__, ClientDisconnect):
        # FastAPI's 400 for a body it could not read because the client went away while
        # sending it: not the client's invalid JSON but its departure (499, api.http.disconnect).
        raise exc.__cause__
    headers = dict(exc.headers or {})
    if exc.status_code == 400:
        # The framework could not parse the body at all (bytes that are not UTF-8 JSON): as
        # invalid as a body that parses to the wrong shape, and answered the same way.
        return _from_error(
            request, InvalidRequest("the request body is not valid JSON", loc=("body",))
        )
    if exc.status_code == 405:
        # Starlette lists the methods of the first route that matched the path; a path served
        # by several routes (GET and POST) supports all of theirs.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    slug = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(
        exc.status_code, "http-error"
    )
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    return problem_response(request.scope, exc.status_code, slug, detail, detail, headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        path_regex = getattr(route, "path_regex", None)
        if path_regex is not None and path_regex.match(request.url.path):
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _outage(request: Request, exc: Exception, detail: str) -> JSONResponse:
    # The driver's message may include SQL with parameters: log the class only.
    logger.warning(detail, error=type(exc).__name__)
    return _from_error(request, DependencyUnavailable(detail, retry_after=2))


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, PoolTimeout):
        return _outage(request, exc, "database unavailable")
    if not isinstance(exc, DBAPIError):
        raise exc
    kind = classify_database_error(exc)
    # Only the class is logged: a driver's message can quote the parameter it refused.
    if kind == "data":
        logger.warning("database refused a value", error=type(exc).__name__)
        return _from_error(request, InvalidRequest("a value is out of the range this field holds"))
    if kind == "conflict":
        logger.warning("database constraint refused a write", error=type(exc).__name__)
        return _from_error(request, Conflict("the request conflicts with existing data"))
    if kind == "bug":
        raise exc
    return _outage(request, exc, "database unavailable")


async def _overflow(request: Request, exc: Exception) -> JSONResponse:
    # Every value is bounded where it is parsed, so this is a bound missing somewhere (SQLite
    # raises it for an integer past 64 bits): still the value's fault, and worth a log line.
    log_unexpected(exc)
    return _from_error(request, InvalidRequest("a number is out of the range this field holds"))


async def _connection_error(request: Request, exc: Exception) -> JSONResponse:
    # Raised below the drivers (a refused or timed-out socket): which dependency is unknown.
    return _outage(request, exc, "a dependency is unavailable")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem JSON."""
    app.add_exception_handler(ModelgateError, _modelgate_error)
    app.add_exception_handler(ModelNotFound, _model_error)
    app.add_exception_handler(ModelUnavailable, _model_error)
    app.add_exception_handler(InvalidFeatures, _model_error)
    app.add_exception_handler(RateLimitExceeded, _rate_limited)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)
    # A refused or timed-out connection to a dependency is an outage, not a bug.
    app.add_exception_handler(OSError, _connection_error)
    app.add_exception_handler(OverflowError, _overflow)
    # Anything else is answered 500 by RequestContextMiddleware, inside the request's context.


PROBLEM_DESCRIPTIONS = {
    401: "Missing or invalid credential",
    403: "Credential lacks the required scope, or tenant suspended",
    404: "Not found",
    409: "Conflict",
    413: "Request body too large",
    422: "Invalid request",
    429: "Rate limit or monthly quota exceeded",
    500: "Unexpected error (never a stack trace)",
    503: "A dependency (database, Redis, model) is unavailable",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problems particular to a route (api.http.openapi adds
    those every credential, parameter or body can cause)."""
    return {
        status: {
            "model": ValidationProblem if status == 422 else Problem,
            "description": PROBLEM_DESCRIPTIONS.get(status, "Error"),
        }
        for status in statuses
    }
