"""FastAPI dependencies: the app state, the request's database session, and identity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from api.metering import BILLABLE
from api.state import AppState
from auth.audit import Actor
from auth.errors import DatabaseTimedOut, Forbidden
from auth.identity.authn import AuthSubject, authorize, bearer_credential
from auth.limits.limiter import KeyRateLimitExceeded
from auth.settings import Settings


def app_state(request: Request) -> AppState:
    """The process's components (engine, limiter, registry...). The prediction routes call it
    directly: on the hot path every declared dependency costs FastAPI's solver a visit."""
    state: AppState = request.app.state.modelgate
    return state


async def get_app_state(request: Request) -> AppState:
    """``app_state`` as a dependency; async, so FastAPI does not send it to the threadpool on
    every request."""
    return app_state(request)


StateDep = Annotated[AppState, Depends(get_app_state)]


async def get_settings_dep(state: StateDep) -> Settings:
    """The settings the app was built with."""
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_session(request: Request, state: StateDep) -> AsyncIterator[AsyncSession]:
    """One session per request. ``DatabaseRoute`` commits it before the response is sent;
    this teardown only closes it (rolling back whatever was not committed)."""
    async with state.sessionmaker() as session:
        request.state.session = session
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def client_address(request: Request) -> str | None:
    """The peer's address as the socket reports it (a client's forwarding header is never
    believed here)."""
    return request.client.host if request.client else None


def request_actor(request: Request, subject: AuthSubject) -> Actor:
    """The audit trail's view of who is making this request's change, and from where."""
    return Actor(
        name=subject.actor,
        key_id=subject.key_id,
        client_addr=client_address(request),
        user_agent=request.headers.get("user-agent"),
        request_id=getattr(request.state, "request_id", None),
    )


async def forbid_caching(response: Response) -> None:
    """For a route whose answer carries a secret (a new key, a token): no cache on the way may
    keep it (``Cache-Control: no-store``, and ``Pragma: no-cache`` for HTTP/1.0 caches)."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"


# A route's ``dependencies=[NoStore]``.
NoStore = Depends(forbid_caching)


class DatabaseRoute(APIRoute):
    """A route that works on the database: the whole request (its credential check included)
    gets ``database_timeout_seconds`` for its database work, answered 503 past it, and the
    request's session is committed after the endpoint returns and before the response is sent,
    so that a 2xx response always means its writes are durable."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded_handler_then_commit(request: Request) -> Response:
            # One deadline for the request rather than one per statement: a database that
            # stalls would otherwise cost the connection check, the reconnect and each
            # statement a timeout of its own.
            timeout = app_state(request).settings.database_timeout_seconds
            try:
                async with asyncio.timeout(timeout):
                    response = await handler(request)
                    session: AsyncSession | None = getattr(request.state, "session", None)
                    if (
                        session is not None
                        and session.in_transaction()
                        and response.status_code < 400
                    ):
                        await session.commit()
            except TimeoutError:
                raise DatabaseTimedOut from None
            return response

        return bounded_handler_then_commit


class Authenticator(HTTPBearer):
    """The one way in for identity: verifies the bearer credential, checks the scopes, and
    counts the request against the key's rate limit.

    It is an ``HTTPBearer`` so that OpenAPI shows the scheme (the "Authorize" button) without a
    second dependency to solve on every request; parsing and errors are ours.
    """

    def __init__(
        self,
        required_scopes: set[str],
        *,
        tenant_only: bool = False,
        admin_only: bool = False,
        billable: bool = False,
    ) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="HTTPBearer",
            description="An API key (mg_...) or a JWT",
        )
        self.required_scopes = frozenset(required_scopes)
        self.tenant_only = tenant_only
        self.admin_only = admin_only
        # A billable route may answer 2xx only after api.metering.charge (the middleware
        # enforces it).
        self.billable = billable

    async def __call__(self, request: Request) -> AuthSubject:  # type: ignore[override]
        # Read directly rather than through StateDep: one dependency less on the hot path.
        state = app_state(request)
        credential = bearer_credential(request.headers.get("authorization"))
        subject = await state.authenticator.authenticate(credential)
        if subject.key_id is not None:  # an admin user's JWT has no key (auth.identity.authn)
            state.key_activity.touch(subject.key_id)
        structlog.contextvars.bind_contextvars(
            key_id=str(subject.key_id),
            tenant_id=str(subject.tenant.id) if subject.tenant else None,
        )
        request.state.subject = subject
        if self.tenant_only and subject.tenant is None:
            raise Forbidden("this route is for tenant credentials")
        if self.admin_only and not subject.is_admin:
            # The scope alone is not enough: a key whose row somehow carried "admin" but
            # belongs to a tenant must never reach an operator route.
            raise Forbidden("this route is for operator credentials")
        authorize(subject, self.required_scopes)
        if self.billable:
            setattr(request.state, BILLABLE, True)
        if subject.max_in_flight is not None:
            # Before the rate limit, so that a request refused here costs none of it. The slot
            # is the middleware's to release, once, when the response is finished (or failed).
            request.state.inflight = await state.concurrency.acquire(
                subject.limit_id, subject.max_in_flight
            )
        try:
            request.state.rate_limit = await state.rate_limiter.hit(
                subject.limit_id, subject.rate_limits, admin=subject.tenant is None
            )
        except KeyRateLimitExceeded as exc:
            # The 429 carries the rate-limit headers too.
            request.state.rate_limit = exc.status
            raise
        return subject


require_admin = Authenticator({"admin"}, admin_only=True)

PredictScope = Annotated[
    AuthSubject, Depends(Authenticator({"predict"}, tenant_only=True, billable=True))
]
UsageScope = Annotated[AuthSubject, Depends(Authenticator({"usage:read"}, tenant_only=True))]
KeysScope = Annotated[AuthSubject, Depends(Authenticator({"keys:manage"}, tenant_only=True))]
TenantCredential = Annotated[AuthSubject, Depends(Authenticator(set(), tenant_only=True))]
AnyCredential = Annotated[AuthSubject, Depends(Authenticator(set()))]
# The same instance as the /admin router's dependency, so FastAPI runs it once per request.
AdminScope = Annotated[AuthSubject, Depends(require_admin)]
