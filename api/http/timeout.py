"""The per-request deadline (``MODELGATE_REQUEST_TIMEOUT_SECONDS``).

A request that runs longer is cancelled and answered 503 ``service-unavailable`` with
``Retry-After`` (problem JSON; 503 rather than 504, which says that a gateway's upstream did not
answer: here the server itself gave up, as it does when the database or Redis is too slow, and a
client treats every such answer alike). Cancelling unwinds the request like any other error: its
database session is rolled back, its concurrency slot is given back, and it is logged.

The deadline never separates what a request did from its answer. Where a request commits to an
outcome (its usage handed to the usage writer, its session's commit, its response's first byte)
it calls :func:`lift_deadline`: if the deadline has passed, the request is cancelled there, before
anything is committed (nothing billed, 503); otherwise it runs to its answer (each of those steps
has a timeout of its own). So a timed-out request is never billed, and a billed one is answered.

A prediction that runs in a worker thread (scikit-learn) finishes in that thread after its
request was answered 503: Python cannot interrupt a thread, and its result is thrown away.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = structlog.get_logger(__name__)

# The key in the ASGI scope's state under which the request's deadline (an asyncio.Timeout) is.
DEADLINE = "deadline"
_TYPE = "service-unavailable"
# api.http.middleware.PROBLEM_TYPE, where the request-context middleware reads the problem type it
# counts (not imported: api.http.middleware imports api.inference.metering, which imports this
# module).
PROBLEM_TYPE = "problem_type"


async def lift_deadline(scope: Scope) -> None:
    """Let the request run to its answer whatever its deadline; if the deadline has already
    passed, cancel the request here, before it commits to anything."""
    deadline: asyncio.Timeout | None = scope.get("state", {}).get(DEADLINE)
    if deadline is None:
        return
    if deadline.expired():
        # The cancellation is requested but not delivered yet: deliver it now.
        await asyncio.sleep(0)
        return
    if deadline.when() is not None:
        deadline.reschedule(None)


class RequestTimeoutMiddleware:
    """Answer 503 to a request still running after ``timeout_seconds`` and cancel it."""

    def __init__(self, app: ASGIApp, timeout_seconds: float) -> None:
        self.app = app
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        started = False

        async def send_lifting_deadline(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                # A response that has started is finished, not cut off (an export streams).
                await lift_deadline(scope)
                started = True
            await send(message)

        deadline = asyncio.timeout(self.timeout_seconds)
        try:
            async with deadline:
                state[DEADLINE] = deadline
                await self.app(scope, receive, send_lifting_deadline)
        except TimeoutError:
            # Another timeout that escaped the app is an error like any other, not this one.
            if started or not deadline.expired():
                raise
            logger.warning("request timed out", timeout_seconds=self.timeout_seconds)
            state[PROBLEM_TYPE] = _TYPE
            await _send_timed_out(send, state.get("request_id"))


async def _send_timed_out(send: Send, request_id: str | None) -> None:
    body = json.dumps(
        {
            "type": _TYPE,
            "title": "Service unavailable",
            "status": 503,
            "detail": "the request took longer than the server allows",
            "request_id": request_id,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                # The request's body may be unread: this connection cannot carry another request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
