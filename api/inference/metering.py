"""The billing guarantee, wired once: a request that authenticated for a billable scope can only
be answered with a 2xx after its usage record is committed.

``Authenticator(..., billable=True)`` marks the request (``RequestContext.billable``);
:func:`charge` is the one way to bill it; ``RequestContextMiddleware`` refuses to start a 2xx
response for a marked request that was not billed (it answers 503 instead), so a new prediction
route that forgets to bill cannot serve for free.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request

from api.http.context import RequestContext, request_context
from api.http.disconnect import client_has_gone
from api.http.timeout import commit_point
from api.services import AppState
from auth.idempotency import StoredResponse
from auth.identity.authn import AuthSubject
from auth.models import utcnow
from auth.usage.ledger import UsageEvent


async def charge(
    request: Request,
    state: AppState,
    subject: AuthSubject,
    *,
    model: str,
    model_version: str,
    units: int,
    latency_ms: float,
) -> None:
    """Record the request's usage and wait until it is durable.

    Raises ``QuotaExceeded`` (nothing is recorded), ``DependencyUnavailable``, or
    ``ClientDisconnect`` if the client has already gone (nothing is recorded: answered 499).
    """
    await charge_call(
        request_context(request.scope),
        lambda: client_has_gone(request.receive),
        state,
        subject,
        model=model,
        model_version=model_version,
        units=units,
        latency_ms=latency_ms,
    )


async def charge_call(
    context: RequestContext,
    client_gone: Callable[[], bool],
    state: AppState,
    subject: AuthSubject,
    *,
    model: str,
    model_version: str,
    units: int,
    latency_ms: float,
    response: StoredResponse | None = None,
) -> None:
    """:func:`charge` for any protocol: the call's context, and ``client_gone`` to ask whether
    its client has already gone (the gRPC adapter's call is not an HTTP request). ``response``:
    the answer to store with the record, for a request sent with an ``Idempotency-Key``
    (raises ``AlreadyAnswered``, nothing recorded, if its key was answered already)."""
    if client_gone():
        # Nobody will read the answer: it is not billed (api.http.disconnect).
        raise ClientDisconnect
    tenant = subject.require_tenant()
    event = UsageEvent(
        request_id=uuid.UUID(context.request_id),
        tenant_id=tenant.id,
        api_key_id=subject.require_key_id(),
        model=model,
        model_version=model_version,
        plan_id=tenant.plan_id,
        units=units,
        status_code=200,
        latency_ms=latency_ms,
        created_at=utcnow(),
        response=response,
    )
    # From here the request runs to its answer: a deadline that cut it off while its record is
    # being committed would bill a request answered 503 (api.http.timeout).
    charged = state.usage_writer.charge(event, tenant.monthly_quota, tenant.usage_alert_thresholds)
    await commit_point(context, charged)
    context.billed = True
