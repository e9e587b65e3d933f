"""The per-request deadline (``MODELGATE_REQUEST_TIMEOUT_SECONDS``), opened by
``api.http.middleware.RequestContextMiddleware`` around the app.

A request that runs longer is cancelled and answered 503 ``service-unavailable`` with
``Retry-After`` (problem JSON; 503 rather than 504, which says that a gateway's upstream did not
answer: here the server itself gave up, as it does when the database or Redis is too slow, and a
client treats every such answer alike). Cancelling unwinds the request like any other error: its
database session is rolled back, its concurrency slot is given back, and it is logged.

The deadline never separates what a request did from its answer. Every step by which a request
commits to an outcome (its usage handed to the usage writer, its session's commit, its
response's first byte) lifts the deadline through :func:`lift_deadline`, the one place that
does (:func:`commit_point` around a step; the middleware's ``send`` for the first byte): if the
deadline has passed, the request is cancelled there, before the step starts (nothing billed,
503); otherwise the step and the rest of the request run to the answer (each of those steps
has a timeout of its own). So a timed-out request is never billed, and a billed one is
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
from starlette.responses import Response
from starlette.types import Scope

from api.http.context import RequestContext
from api.http.problems import problem_response

logger = structlog.get_logger(__name__)

T = TypeVar("T")


def lift_deadline(context: RequestContext) -> bool:
    """Lift the request's deadline: the request runs to its answer from here. False if the
    deadline has passed already: the request's cancellation is requested but not delivered yet,
    and the caller must take it (``await asyncio.sleep(0)``) instead of going on."""
    deadline = context.deadline
    if deadline is not None:
        if deadline.expired():
            return False
        if deadline.when() is not None:
            deadline.reschedule(None)
    return True


async def commit_point(context: RequestContext, step: Awaitable[T]) -> T:
    """Run ``step``, by which the request commits to its outcome, and the rest of the request to
    its answer whatever its deadline; if the deadline has already passed, cancel the request
    here instead, before ``step`` starts."""
    if not lift_deadline(context):
        try:
            await asyncio.sleep(0)  # delivers the cancellation
        except BaseException:
            if inspect.iscoroutine(step):
                step.close()  # never started: nothing of it happened
            raise
    return await step


def timed_out_response(scope: Scope, timeout_seconds: float) -> Response:
    """The 503 of a request cut off by its deadline (logged here)."""
    logger.warning("request timed out", timeout_seconds=timeout_seconds)
    return problem_response(
        scope,
        503,
        "service-unavailable",
        "Service unavailable",
        "the request took longer than the server allows",
        # The request's body may be unread: this connection cannot carry another request.
        {"Connection": "close"},
    )
