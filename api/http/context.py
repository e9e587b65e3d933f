"""The request's context: the per-request values that cross modules, in one typed object.

``RequestContextMiddleware`` (``api.http.middleware``) makes one :class:`RequestContext` per HTTP
request, before anything else runs, and keeps it in the ASGI scope's state; every module reads and
writes it through :func:`request_context`, never through ``request.state`` attributes. Who writes
each field is said beside it; the middleware reads most of them once the app has answered (the
access line, the rate-limit headers, the count of refusals, the billing guarantee).

The request's concurrency slot is held by :class:`InFlightSlot`, the one context manager that
reserves it (``reserve``, from the ``Authenticator``, for the rate limiter's check to take) and
gives it back (on leaving it, in the middleware, whatever ended the request).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from starlette.types import Scope

from auth.idempotency import ClaimHold
from auth.limits.concurrency import ConcurrencyLimiter, Slot, release_detached

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from auth.identity.authn import AuthSubject
    from auth.limits.limiter import RateLimitStatus

# The key of the context in the ASGI scope's state (also ``request.state.ctx``).
CONTEXT_KEY = "ctx"


class InFlightSlot:
    """The request's place among its key's requests in flight (``AuthSubject.max_in_flight``).

    The request-context middleware holds it around the whole request (``async with``); the
    ``Authenticator`` reserves the slot inside (:meth:`reserve`) once it knows the key and its
    limit, and the rate limiter's check takes it;
    leaving gives the slot back, once the response is sent or the request failed, timed out or
    lost its client. A request that never took a slot leaves without a round trip.
    """

    __slots__ = ("slot",)

    def __init__(self) -> None:
        self.slot: Slot | None = None

    def reserve(self, limiter: ConcurrencyLimiter, key_id: str, limit: int) -> Slot:
        """The slot for ``key_id`` that the rate limiter's check takes, in its own round trip
        (``RateLimiter.hit(..., slot=...)``: ``ConcurrencyLimitExceeded`` beyond ``limit``).
        Held from here, before the check, so that a check cancelled midway is given back too;
        a request has one at most, however many of its dependencies ask."""
        if self.slot is None:
            self.slot = limiter.slot(key_id, limit)
        return self.slot

    async def __aenter__(self) -> InFlightSlot:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            # Detached: a request cancelled meanwhile (its client gone) still gives it back.
            await release_detached(slot)


@dataclass(slots=True, eq=False)
class RequestContext:
    """What one request's modules tell each other; one per request, see the module docstring."""

    # X-Request-ID, the problem JSON's request_id, the usage record's and the prediction's id.
    request_id: str
    # Who made the request, once its credential was verified (api.http.deps, api.routes.token).
    subject: AuthSubject | None = None
    # The rate limiter's answer, for the X-RateLimit-* headers (api.http.deps.Authenticator).
    rate_limit: RateLimitStatus | None = None
    # The key's concurrency slot, held for the whole request (the middleware and Authenticator).
    in_flight: InFlightSlot = field(default_factory=InFlightSlot)
    # The claim on its Idempotency-Key, given back on leaving (api.http.idempotency).
    idempotency: ClaimHold = field(default_factory=ClaimHold)
    # The request's deadline (api.http.timeout); lifted where the request commits (commit_point).
    deadline: asyncio.Timeout | None = None
    # Authenticated for a billable scope: a 2xx needs its usage record (api.inference.metering).
    billable: bool = False
    # Its usage record is committed (api.inference.metering.charge).
    billed: bool = False
    # The problem type of its error answer, for the count of refusals (api.http.problems).
    problem_type: str | None = None
    # The request's database session, committed before the answer (api.http.deps.DatabaseRoute).
    session: AsyncSession | None = None


def request_context(scope: Scope) -> RequestContext:
    """The context of the request whose ASGI scope is ``scope`` (``request.scope`` in a route)."""
    context: RequestContext = scope["state"][CONTEXT_KEY]
    return context
