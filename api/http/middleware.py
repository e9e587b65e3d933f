"""Pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task per request): the request's
context (``api.http.context``), request ids, rate-limit headers, problem JSON for the body
limit's 413 and for unexpected errors, the billing guarantee (no 2xx for a billable request
without its usage record), the count of refused requests, the concurrency slot held for the
whole request, and one log line per request (499 for a client that went away before its answer,
``api.http.disconnect``)."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from typing import TYPE_CHECKING

import structlog
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.body_limit import CLOSE, limited_body
from api.http.context import CONTEXT_KEY, RequestContext
from api.http.disconnect import CLIENT_CLOSED_REQUEST
from api.http.problems import problem_response
from api.http.timeout import lift_deadline, timed_out_response
from api.observability import metrics

if TYPE_CHECKING:
    from auth.identity.authn import AuthSubject

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
_INTERNAL = (500, "internal-error", "Internal server error", "an unexpected error occurred")
# The answers counted as refusals (metrics.record_rejection), by status and problem type.
_REJECTED = frozenset({401, 403, 413, 429, 503})
_NOSNIFF = (b"x-content-type-options", b"nosniff")
# A connection whose request the middleware answers in place of the app's may hold the unread
# rest of a body: it cannot carry another request.
_CLOSE = {"Connection": "close"}


class RequestContextMiddleware:
    """Gives every request its context and an id (``X-Request-ID``, also the usage record's and
    the prediction's id), its deadline (``api.http.timeout``) and its body limit
    (``api.http.body_limit``), holds its concurrency slot until its answer is sent, adds
    ``X-RateLimit-*`` headers when a limit was checked, counts refusals, and logs one line per
    request (never its body or credentials).

    One layer for all of these rather than one middleware each: every layer is one more
    coroutine that each of the request's awaits passes through, and one more ``send`` wrapper
    for each message of its response (three layers doing the same work cost ``/predict`` about
    8% more CPU, measured in process: docs/performance.md)."""

    def __init__(self, app: ASGIApp, *, timeout_seconds: float, max_body_size: int) -> None:
        self.app = app
        self.timeout_seconds = timeout_seconds
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        context = RequestContext(request_id)
        scope.setdefault("state", {})[CONTEXT_KEY] = context
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        response_started = False
        replaced_body = False
        # None: the request announces no body, so none is left unread when the answer starts.
        body = limited_body(scope, receive, self.max_body_size)

        async def send_with_headers(message: Message) -> None:
            nonlocal status, replaced_body, response_started
            if replaced_body:
                return  # the plain-text body of a response already sent as problem JSON
            if message["type"] == "http.response.start":
                if not lift_deadline(context):
                    # Past the deadline before the first byte: cut off, not answered.
                    await asyncio.sleep(0)  # delivers the cancellation
                response_started = True
                status = message["status"]
                replacement: tuple[int, str, str, str] | None = None
                if status == 413 and not _is_problem(message):
                    # Starlette's body limit answers in plain text; every error here is
                    # problem JSON.
                    replacement = _TOO_LARGE
                elif status < 400 and context.billable and not context.billed:
                    # A billable route tried to answer without a committed usage record: that
                    # is a bug, and the client gets a 503 rather than a free prediction.
                    logger.error("billable response without a usage record; answered 503")
                    replacement = _UNBILLED
                if replacement is not None:
                    replaced_body = True
                    status = replacement[0]
                    response = _instead(scope, context, replacement)
                    _count_rejection(status, context)
                    await response(scope, receive, send)
                    return
                if status in _REJECTED:
                    _count_rejection(status, context)
                headers = list(message.get("headers", []))
                if body is not None and not body.complete:
                    # The server never reads the rest: the client should stop sending it.
                    headers.append(CLOSE)
                headers.append((b"x-request-id", request_id.encode()))
                # No browser may guess a content type other than the one declared.
                headers.append(_NOSNIFF)
                limit = context.rate_limit
                if limit is not None:
                    headers.extend(limit.headers())
                message["headers"] = headers
            await send(message)

        deadline = asyncio.timeout(self.timeout_seconds)
        try:
            # The slot a key with max_in_flight takes (api.http.deps.Authenticator) is given
            # back on leaving: once the response is sent, or the request failed or was cancelled;
            # so is the claim on an Idempotency-Key (api.http.idempotency).
            async with context.in_flight, context.idempotency:
                try:
                    async with deadline:
                        context.deadline = deadline
                        await self.app(
                            scope, receive if body is None else body.receive, send_with_headers
                        )
                except TimeoutError:
                    # Another timeout that escaped the app is an error like any other.
                    if response_started or not deadline.expired():
                        raise
                    context.deadline = None  # gone: the 503 below is not cut off
                    body = None  # the 503 says Connection: close itself
                    timed_out = timed_out_response(scope, self.timeout_seconds)
                    await timed_out(scope, receive, send_with_headers)
        except ClientDisconnect:
            status = CLIENT_CLOSED_REQUEST  # nobody to answer
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        except Exception as exc:
            # Answered here, inside the request's context, rather than by Starlette's outermost
            # handler: the 500 then carries X-Request-ID, and the exception is not re-raised to
            # the server, whose log line would print its message (a driver's message can hold
            # SQL parameters, such as a key's digest).
            log_unexpected(exc)
            status = 500
            if not response_started:
                await _instead(scope, context, _INTERNAL)(scope, receive, send)
        finally:
            route = route_template(scope)
            metrics.record_request(
                route, scope.get("method", ""), status, time.perf_counter() - started
            )
            self._log(scope, context, route, status, started)

    @staticmethod
    def _log(
        scope: Scope, context: RequestContext, route: str, status: int, started: float
    ) -> None:
        log_access(scope.get("method"), route, status, started, context.subject)


def log_access(
    method: str | None,
    route: str,
    status: int,
    started: float,
    subject: AuthSubject | None,
    **extra: object,
) -> None:
    """A request's access line: who (tenant and key ids, never a credential), which route (its
    template, never the raw path with its ids), the answer and how long it took. The one line
    of every protocol: the gRPC adapter (``api.grpc.service``) logs its calls here too."""
    if not _REQUEST_LOG.isEnabledFor(logging.INFO):
        return  # under load the level is usually WARNING: skip building the event
    tenant = subject.tenant if subject is not None else None
    key_id = subject.key_id if subject is not None else None
    logger.info(
        "request",
        method=method,
        route=route,
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        tenant_id=str(tenant.id) if tenant is not None else None,
        key_id=str(key_id) if key_id is not None else None,
        **extra,
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


def _count_rejection(status: int, context: RequestContext) -> None:
    metrics.record_rejection(status, context.problem_type or "unknown")


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


def _instead(scope: Scope, context: RequestContext, problem: tuple[int, str, str, str]) -> Response:
    """The problem (status, type, title, detail) the middleware answers in place of the app's,
    with the request id and ``nosniff`` that every answer carries."""
    response: Response = problem_response(scope, *problem, _CLOSE)
    response.raw_headers += [(b"x-request-id", context.request_id.encode()), _NOSNIFF]
    return response
