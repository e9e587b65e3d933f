"""FastAPI dependencies: the app state, the request's database session, and identity."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import fastapi.routing
import structlog
from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_body_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from api.http.context import RequestContext, request_context
from api.http.forwarded import TrustedProxies
from api.http.idempotency import check_key
from api.http.timeout import commit_point
from api.services import AppState
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
        request_context(request.scope).session = session
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

# The header of a report read from the read replica: how many seconds behind the primary the
# replica was when the report began (auth.read_replica). Absent: the report read the primary.
REPLICA_LAG_HEADER = "Replica-Lag"
REPLICA_LAG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            REPLICA_LAG_HEADER: {
                "description": "Present when the report was read from the read replica: how "
                "many seconds behind the primary it was (0: caught up); absent when it was read "
                "from the primary",
                "schema": {"type": "number", "minimum": 0},
            }
        }
    }
}


@dataclass(frozen=True)
class ReportSession:
    """A report's session: on the read replica (``lag_seconds`` its lag), or on the primary
    (``lag_seconds`` None)."""

    session: AsyncSession
    lag_seconds: float | None

    @property
    def headers(self) -> dict[str, str]:
        """The ``Replica-Lag`` header when the report reads the replica."""
        if self.lag_seconds is None:
            return {}
        return {REPLICA_LAG_HEADER: f"{self.lag_seconds:.3f}"}


@asynccontextmanager
async def _report_session(
    request: Request, state: AppState, response: Response, *, may_use_replica: bool
) -> AsyncIterator[ReportSession]:
    replica = state.read_replica if may_use_replica else None
    opened = await replica.open() if replica is not None else None
    if opened is None:
        async with state.sessionmaker() as session:
            request_context(request.scope).session = session
            yield ReportSession(session, None)
        return
    # Not the request's context session: DatabaseRoute has nothing to commit on a standby.
    session, lag = opened
    report = ReportSession(session, lag)
    response.headers.update(report.headers)
    try:
        yield report
    finally:
        await session.close()


async def get_report_session(
    request: Request, state: StateDep, response: Response
) -> AsyncIterator[ReportSession]:
    """The session of a report that may be stale by the replica's lag (usage, the audit
    listing): on the read replica when there is one, caught up within
    ``MODELGATE_DATABASE_READ_MAX_LAG_SECONDS``; on the primary otherwise."""
    async with _report_session(request, state, response, may_use_replica=True) as report:
        yield report


ReportSessionDep = Annotated[ReportSession, Depends(get_report_session)]


async def get_closed_month_session(
    request: Request, state: StateDep, response: Response
) -> AsyncIterator[ReportSession]:
    """The billing export's session: the replica for a month that is over (its rows no longer
    change), the primary for the current month (its rows still grow)."""
    month = request.query_params.get("month")
    closed = month is not None and month < datetime.now(UTC).strftime("%Y-%m")
    async with _report_session(request, state, response, may_use_replica=closed) as report:
        yield report


ClosedMonthSessionDep = Annotated[ReportSession, Depends(get_closed_month_session)]


def client_address(request: Request) -> str | None:
    """Where the request comes from: the socket's peer, unless that peer is one of the trusted
    proxies (``MODELGATE_TRUSTED_PROXIES``), in which case the rightmost address of
    ``X-Forwarded-For`` that is not a trusted proxy (``api.http.forwarded``). The one place that
    reads ``X-Forwarded-For``: the audit trail, the login throttle and the failed-credential
    throttle all ask here."""
    peer = request.client.host if request.client else None
    proxies: TrustedProxies | None = getattr(request.app.state, "trusted_proxies", None)
    if not proxies:
        return peer
    return proxies.client_address(peer, request.headers.getlist("x-forwarded-for"))


def request_actor(request: Request, subject: AuthSubject) -> Actor:
    """The audit trail's view of who is making this request's change, and from where."""
    return Actor(
        name=subject.actor,
        key_id=subject.key_id,
        client_addr=client_address(request),
        user_agent=request.headers.get("user-agent"),
        request_id=request_context(request.scope).request_id,
    )


async def forbid_caching(response: Response) -> None:
    """For a route whose answer carries a secret (a new key, a token): no cache on the way may
    keep it (``Cache-Control: no-store``, and ``Pragma: no-cache`` for HTTP/1.0 caches)."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"


# A route's ``dependencies=[NoStore]``.
NoStore = Depends(forbid_caching)


class CredentialFirstRoute(APIRoute):
    """A route that checks the request's credential before FastAPI reads its body.

    FastAPI reads and parses a body before it solves the dependencies, so with the
    ``Authenticator`` dependency alone an anonymous client could make the server read and parse
    up to ``MODELGATE_MAX_BODY_BYTES``. A route of this class that requires a credential (an
    ``Authenticator`` among its dependencies, its router's included) first authenticates the
    request from its headers (``authenticate_request``: 401, or 429 for a throttled address);
    the dependency then finds the subject in the request's context and does the rest (scopes, the
    rate-limit hit) once, as before. The body limit (``api.http.body_limit``) lets that 401 through
    unread, with ``Connection: close``. A route without an ``Authenticator`` is unchanged.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        dependant = _in_force(self)
        if not any(isinstance(d.call, Authenticator) for d in _dependants(dependant)):
            return handler
        # A private attribute of FastAPI's route (as _INCLUDED_ROUTE below): without it, as in
        # a FastAPI that renamed it, the route keeps FastAPI's own handler.
        embed_body_fields = getattr(self, "_embed_body_fields", None)
        direct = None if embed_body_fields is None else _direct_call(dependant, embed_body_fields)
        if direct is not None:
            return direct.handler(handler)

        async def authenticate_then_handle(request: Request) -> Response:
            await authenticate_request(request)
            return await handler(request)

        return authenticate_then_handle


@dataclass(frozen=True)
class _DirectCall:
    """The shortest path for a route of one shape: a JSON body model, one ``Authenticator``
    and the request (the prediction routes). FastAPI's handler would read and parse the body,
    then solve the dependencies (three calls of ``solve_dependencies`` a request, about a fifth
    of ``/predict``'s CPU: docs/performance.md); this does the same steps in the same order with
    FastAPI's own validation of the body (``request_body_to_args``), so the answers and their
    errors are FastAPI's. Anything else (no body, another content type, JSON that does not
    parse) goes to FastAPI's handler, which answers it as before."""

    authenticator: Authenticator
    subject_name: str
    request_name: str
    body_fields: list[Any]
    embed_body_fields: bool
    endpoint: Callable[..., Awaitable[Response]]

    def handler(
        self, fallback: Callable[[Request], Coroutine[Any, Any, Response]]
    ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        async def authenticate_then_call(request: Request) -> Response:
            await authenticate_request(request)
            content_type = request.headers.get("content-type")
            if content_type is None or not _is_plain_json(content_type):
                return await fallback(request)
            raw = await request.body()
            if not raw:
                return await fallback(request)
            try:
                body = json.loads(raw)  # as Starlette's request.json() parses it
            except ValueError:
                return await fallback(request)  # FastAPI's json_invalid error
            # As solve_dependencies orders them: the dependency, then the body's validation.
            subject = await self.authenticator(request)
            values, errors = await request_body_to_args(
                self.body_fields, body, self.embed_body_fields
            )
            if errors:
                raise RequestValidationError(errors, body=body)
            values[self.subject_name] = subject
            values[self.request_name] = request
            return await self.endpoint(**values)

        return authenticate_then_call


def _is_plain_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


def _direct_call(dependant: Dependant, embed_body_fields: bool) -> _DirectCall | None:
    """The direct call of a route of the one shape it serves, or None."""
    if (
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or len(dependant.body_params) != 1
        or len(dependant.dependencies) != 1
        or dependant.request_param_name is None
        or dependant.response_param_name is not None
        or dependant.background_tasks_param_name is not None
        or dependant.http_connection_param_name is not None
        or dependant.security_scopes_param_name is not None
        or not inspect.iscoroutinefunction(dependant.call)
    ):
        return None
    [dependency] = dependant.dependencies
    if (
        not isinstance(dependency.call, Authenticator)
        or dependency.name is None
        or dependency.dependencies
        or dependency.body_params
        or dependency.query_params
        or dependency.header_params
        or dependency.cookie_params
        or dependency.path_params
        or dependency.request_param_name is None
    ):
        return None
    return _DirectCall(
        authenticator=dependency.call,
        subject_name=dependency.name,
        request_name=dependant.request_param_name,
        body_fields=dependant.body_params,
        embed_body_fields=embed_body_fields,
        endpoint=dependant.call,
    )


# FastAPI builds an included route's handler with the route as its inclusion sees it (its
# router's dependencies added) in this context variable; without it, the route's own.
_INCLUDED_ROUTE = getattr(fastapi.routing, "_effective_route_context_var", None)


def _in_force(route: APIRoute) -> Dependant:
    included = _INCLUDED_ROUTE.get() if _INCLUDED_ROUTE is not None else None
    if included is not None and getattr(included, "original_route", None) is route:
        dependant: Dependant = included.dependant
        return dependant
    return route.dependant


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for child in dependant.dependencies:
        yield from _dependants(child)


class DatabaseRoute(CredentialFirstRoute):
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
                    context = request_context(request.scope)
                    session = context.session
                    if (
                        session is not None
                        and session.in_transaction()
                        and response.status_code < 400
                    ):
                        # Committed, then answered, whatever the request's deadline.
                        await commit_point(context, session.commit())
            except TimeoutError:
                raise DatabaseTimedOut from None
            return response

        return bounded_handler_then_commit


async def authenticate_request(request: Request) -> AuthSubject:
    """Verify the request's bearer credential and keep the subject in the request's context (401
    for a missing or bad credential; 429 once the client's address has failed too often, see
    ``auth.identity.failure_throttle``). The client's address is worked out only if the
    credential is not in the authenticator's cache."""
    credential = bearer_credential(request.headers.get("authorization"))
    subject = await app_state(request).authenticator.authenticate(
        credential, lambda: client_address(request)
    )
    request_context(request.scope).subject = subject
    return subject


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
        # A billable route may answer 2xx only after api.inference.metering.charge (the middleware
        # enforces it).
        self.billable = billable

    async def __call__(self, request: Request) -> AuthSubject:  # type: ignore[override]
        # Read directly rather than through StateDep: one dependency less on the hot path.
        state = app_state(request)
        context = request_context(request.scope)
        # CredentialFirstRoute authenticated the request from its headers before its body was
        # read; a route it does not guard authenticates here.
        subject = context.subject
        if subject is None:
            subject = await authenticate_request(request)
        await admit(
            state,
            context,
            subject,
            self.required_scopes,
            tenant_only=self.tenant_only,
            admin_only=self.admin_only,
            billable=self.billable,
            # A billable request's Idempotency-Key is checked before the rate limit: a replay
            # costs no rate-limit unit (api.http.idempotency says why).
            before_limit=(lambda: check_key(request, state, subject)) if self.billable else None,
        )
        return subject


async def admit(
    state: AppState,
    context: RequestContext,
    subject: AuthSubject,
    required_scopes: frozenset[str],
    *,
    tenant_only: bool = False,
    admin_only: bool = False,
    billable: bool = False,
    before_limit: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Everything after the credential: the key's activity, the log's ids, the kind of
    principal, the scopes, the billing mark, ``before_limit`` (the HTTP routes' Idempotency-Key
    check), and the key's rate limit and concurrency slot. ``Authenticator`` calls it for HTTP
    routes, the gRPC adapter (``api.grpc.service``) for its calls: one check for every
    protocol."""
    if subject.key_id is not None:  # an admin user's JWT has no key (auth.identity.authn)
        state.key_activity.touch(subject.key_id)
    structlog.contextvars.bind_contextvars(
        key_id=str(subject.key_id) if subject.key_id is not None else None,
        tenant_id=str(subject.tenant.id) if subject.tenant else None,
    )
    if tenant_only and subject.tenant is None:
        raise Forbidden("this route is for tenant credentials")
    if admin_only and not subject.is_admin:
        # The scope alone is not enough: a key whose row somehow carried "admin" but
        # belongs to a tenant must never reach an operator route.
        raise Forbidden("this route is for operator credentials")
    authorize(subject, required_scopes)
    if billable:
        context.billable = True
    if before_limit is not None:
        await before_limit()
    slot = None
    if subject.max_in_flight is not None:
        # Taken by the rate limiter with the rate-limit check, in its one round trip (a
        # request refused for it costs none of the rate limit). Held until the response is
        # finished (or failed): api.http.context.InFlightSlot.
        slot = context.in_flight.reserve(state.concurrency, subject.limit_id, subject.max_in_flight)
    try:
        context.rate_limit = await state.rate_limiter.hit(
            subject.limit_id, subject.rate_limits, admin=subject.tenant is None, slot=slot
        )
    except KeyRateLimitExceeded as exc:
        # The 429 carries the rate-limit headers too.
        context.rate_limit = exc.status
        raise


require_admin = Authenticator({"admin"}, admin_only=True)

PredictScope = Annotated[
    AuthSubject, Depends(Authenticator({"predict"}, tenant_only=True, billable=True))
]
UsageScope = Annotated[AuthSubject, Depends(Authenticator({"usage:read"}, tenant_only=True))]
KeysScope = Annotated[AuthSubject, Depends(Authenticator({"keys:manage"}, tenant_only=True))]
WebhooksScope = Annotated[
    AuthSubject, Depends(Authenticator({"webhooks:manage"}, tenant_only=True))
]
TenantCredential = Annotated[AuthSubject, Depends(Authenticator(set(), tenant_only=True))]
AnyCredential = Annotated[AuthSubject, Depends(Authenticator(set()))]
# The same instance as the /admin router's dependency, so FastAPI runs it once per request.
AdminScope = Annotated[AuthSubject, Depends(require_admin)]
