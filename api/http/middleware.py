"""Pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task per request): request ids,
rate-limit headers, problem JSON for the body limit's 413 and for unexpected errors, the billing
guarantee (no 2xx for a billable request without its usage record), the count of refused
requests, the release of the request's concurrency slot, and one log line per request."""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.inference.metering import BILLABLE, BILLED
from api.observability import metrics
from auth.identity.authn import AuthSubject
from auth.limits.concurrency import Slot, release_detached
from auth.limits.limiter import RateLimitStatus

logger = structlog.get_logger("modelgate.request")
_REQUEST_LOG = logging.getLogger("modelgate.request")
# Responses the middleware answers in place of the app's: status, type, title, detail.
_TOO_LARGE = (
    413,
    "payload-too-large",
    "Request body too large",
    "the request body exceeds the size limit",
)
_UNBILLED = (503, "service-unavailable", "Service unavailable", "usage could not be recorded")
# Refusals counted per status and problem type (AppState.rejections).
_REJECTED = frozenset({401, 403, 429, 503})
# The state key under which the error handlers leave the problem type of their answer.
PROBLEM_TYPE = "problem_type"
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_INTERNAL = (500, "internal-error", "Internal server error", "an unexpected error occurred")


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-ID``, also the usage record's and the prediction's
    id), adds ``X-RateLimit-*`` headers when a limit was checked, and logs one line per request
    (never its body or credentials)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        response_started = False
        replaced_body = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, replaced_body, response_started
            if replaced_body:
                return  # the plain-text body of a response already sent as problem JSON
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                replacement: tuple[int, str, str, str] | None = None
                if status == 413 and not _is_problem(message):
                    # Starlette's body limit answers in plain text; every error here is
                    # problem JSON.
                    replacement = _TOO_LARGE
                elif status < 400 and state.get(BILLABLE) and not state.get(BILLED):
                    # A billable route tried to answer without a committed usage record: that
                    # is a bug, and the client gets a 503 rather than a free prediction.
                    logger.error("billable response without a usage record; answered 503")
                    replacement = _UNBILLED
                if replacement is not None:
                    replaced_body = True
                    status = replacement[0]
                    state[PROBLEM_TYPE] = replacement[1]
                    _count_rejection(scope, status, state)
                    await _send_problem(send, request_id, replacement)
                    return
                if status in _REJECTED:
                    _count_rejection(scope, status, state)
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                # No browser may guess a content type other than the one declared.
                headers.append(_NOSNIFF)
                limit: RateLimitStatus | None = state.get("rate_limit")
                if limit is not None:
                    headers.extend(limit.headers())
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # Answered here, inside the request's context, rather than by Starlette's outermost
            # handler: the 500 then carries X-Request-ID, and the exception is not re-raised to
            # the server, whose log line would print its message (a driver's message can hold
            # SQL parameters, such as a key's digest).
            log_unexpected(exc)
            status = 500
            if not response_started:
                await _send_problem(send, request_id, _INTERNAL)
        finally:
            slot: Slot | None = state.get("inflight")
            if slot is not None:
                # Once the response is sent, or the request failed or was cancelled.
                await release_detached(slot)
            route = route_template(scope)
            metrics.record_request(
                route, scope.get("method", ""), status, time.perf_counter() - started
            )
            self._log(scope, route, status, started)

    @staticmethod
    def _log(scope: Scope, route: str, status: int, started: float) -> None:
        """The request's access line: who (tenant and key ids, never a credential), which route
        (its template, never the raw path with its ids), the answer and how long it took."""
        if not _REQUEST_LOG.isEnabledFor(logging.INFO):
            return  # under load the level is usually WARNING: skip building the event
        subject: AuthSubject | None = scope["state"].get("subject")
        tenant = subject.tenant if subject is not None else None
        key_id = subject.key_id if subject is not None else None
        logger.info(
            "request",
            method=scope.get("method"),
            route=route,
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            tenant_id=str(tenant.id) if tenant is not None else None,
            key_id=str(key_id) if key_id is not None else None,
        )


# The route of a request the router matched to no route (a 404 of its own, a redirect).
UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (``/api/v1/admin/keys/{key_id}/revoke``),
    or ``unmatched``: a bounded set of values, free of ids and of whatever a client puts in a
    path. Read once the app has answered. FastAPI keeps the route a router included under a
    prefix in its own scope entry, with the full template; ``scope["route"]`` holds the route
    as declared, without the prefixes of the routers that include it."""
    included = scope.get("fastapi", {}).get("effective_route_context")
    template = getattr(included, "path_format", None)
    if isinstance(template, str) and template:
        return template
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED


def _count_rejection(scope: Scope, status: int, state: dict[str, Any]) -> None:
    problem_type = state.get(PROBLEM_TYPE) or "unknown"
    metrics.record_rejection(status, problem_type)
    app_state = getattr(scope["app"].state, "modelgate", None) if "app" in scope else None
    if app_state is not None:
        app_state.rejections.count(status, problem_type)


def log_unexpected(exc: BaseException) -> None:
    """Log an unexpected error without its message or locals: its type and where it was raised
    (file, line, function of each frame) are enough to find the bug, and nothing a client sent
    or a driver echoed (SQL parameters, a digest) can reach the log that way."""
    frames = [
        f"{frame.filename}:{frame.lineno} in {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)
    ]
    logger.error("unhandled error", error=type(exc).__name__, frames=frames[-8:])


def _is_problem(message: Message) -> bool:
    return any(
        name == b"content-type" and value.startswith(b"application/problem+json")
        for name, value in message.get("headers", [])
    )


async def _send_problem(send: Send, request_id: str, problem: tuple[int, str, str, str]) -> None:
    """Answer with a problem JSON response (status, type, title, detail) in place of the app's."""
    status, type_, title, detail = problem
    body = json.dumps(
        {
            "type": type_,
            "title": title,
            "status": status,
            "detail": detail,
            "request_id": request_id,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
                _NOSNIFF,
                (b"connection", b"close"),
                *([(b"retry-after", b"1")] if status in (429, 503) else []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
