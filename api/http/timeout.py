"""The per-request deadline (``MODELGATE_REQUEST_TIMEOUT_SECONDS``).

A request that runs longer is cancelled and answered 503 ``service-unavailable`` with
``Retry-After`` (problem JSON; 503 rather than 504, which says that a gateway's upstream did not
answer: here the server itself gave up, as it does when the database or Redis is too slow, and a
client treats every such answer alike). Cancelling unwinds the request like any other error: its
database session is rolled back, its concurrency slot is given back, and it is logged.

The deadline never separates what a request did from its answer. Every step by which a request
commits to an outcome (its usage handed to the usage writer, its session's commit, its
response's first byte) runs through :func:`commit_point`, the one place that lifts the deadline:
if the deadline has passed, the request is cancelled there, before the step starts (nothing
billed, 503); otherwise the step and the rest of the request run to the answer (each of those
steps has a timeout of its own). So a timed-out request is never billed, and a billed one is
answered.

A prediction that runs in a worker thread (scikit-learn) finishes in that thread after its
request was answered 503: Python cannot interrupt a thread, and its result is thrown away.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.context import RequestContext, request_context
from api.http.problems import problem_response

logger = structlog.get_logger(__name__)

T = TypeVar("T")


async def commit_point(context: RequestContext, step: Awaitable[T]) -> T:
    """Run ``step``, by which the request commits to its outcome, and the rest of the request to
    its answer whatever its deadline; if the deadline has already passed, cancel the request
    here instead, before ``step`` starts."""
    deadline = context.deadline
    if deadline is not None:
        if deadline.expired():
            # The cancellation is requested but not delivered yet: deliver it now.
            try:
                await asyncio.sleep(0)
            except BaseException:
                if inspect.iscoroutine(step):
                    step.close()  # never started: nothing of it happened
                raise
        elif deadline.when() is not None:
            deadline.reschedule(None)
    return await step


class RequestTimeoutMiddleware:
    """Answer 503 to a request still running after ``timeout_seconds`` and cancel it."""

    def __init__(self, app: ASGIApp, timeout_seconds: float) -> None:
        self.app = app
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = request_context(scope)
        started = False

        async def send_lifting_deadline(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                # A response that has started is finished, not cut off (an export streams).
                await commit_point(context, send(message))
                started = True
                return
            await send(message)

        deadline = asyncio.timeout(self.timeout_seconds)
        try:
            async with deadline:
                context.deadline = deadline
                await self.app(scope, receive, send_lifting_deadline)
        except TimeoutError:
            # Another timeout that escaped the app is an error like any other, not this one.
            if started or not deadline.expired():
                raise
            logger.warning("request timed out", timeout_seconds=self.timeout_seconds)
            response = problem_response(
                scope,
                503,
                "service-unavailable",
                "Service unavailable",
                "the request took longer than the server allows",
                # The request's body may be unread: this connection cannot carry another request.
                {"Connection": "close"},
            )
            await response(scope, receive, send)
