"""Receiving one signed webhook delivery, the same way for MLflow and Standard Webhooks.

In order, each step refusing with a problem before the next:

1. the route is off (404) while its secret is unset: nothing unsigned is ever accepted;
2. the client address's failure budget (``MODELGATE_AUTH_FAILURES_PER_ADDRESS``, shared with
   failed API keys and JWTs): past it, 429 before anything else, so an anonymous client cannot
   make the server verify, or write audit events, without limit;
3. the signature headers, present and well-formed, and the timestamp within five minutes of our
   clock either way (401), before the body is read;
4. the body, read up to ``MAX_WEBHOOK_BODY_BYTES`` (413), and its signature (401);
5. the payload parsed and mapped to a served model (422), or found to deploy nothing (202,
   ignored);
6. a place in the deploy queue (503 when full: the sender retries);
7. the delivery id, accepted once across replicas, and the audit event, in one transaction
   (409 for an id already accepted);
8. 202, and the :class:`~api.webhooks.deploy.DeployRequest` queued for the background.

Every refusal from step 3 on is audited (``webhook.refuse``, with the source, the reason and the
delivery id when there is one: never the secret, a signature or the body) and logged; every
accepted delivery is audited (``webhook.accept``), and its deployment's outcome later
(``webhook.deploy``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from fastapi import Request
from pydantic import BaseModel, ValidationError

from api.http.body_limit import BodyTooLarge
from api.http.context import request_context
from api.http.deps import app_state, client_address
from api.schemas.webhooks import WebhookAccepted
from api.services import AppState
from api.webhooks.deploy import DeployRequest
from auth.audit import Actor, record_event
from auth.errors import Conflict, DependencyUnavailable, InvalidRequest, ModelgateError, NotFound
from auth.models import utcnow
from auth.webhooks.deliveries import claim_delivery, prune_deliveries
from auth.webhooks.signatures import (
    SignedHeaders,
    WebhookRefused,
    WebhookSource,
    check_timestamp,
    signed_headers,
)

logger = structlog.get_logger(__name__)

# A model-registry event is a few hundred bytes; this leaves room for long names and tags.
MAX_WEBHOOK_BODY_BYTES = 64 * 1024
# Accepted delivery ids older than the replay window are deleted at most this often per process.
_PRUNE_EVERY_SECONDS = 60.0


class WebhookPayloadInvalid(InvalidRequest):
    """A signed delivery whose payload cannot be used (not the expected JSON, or a model name
    that cannot be served)."""

    type = "webhook-payload-invalid"
    title = "Webhook payload invalid"

    def __init__(self, detail: str, reason: str = "unparseable") -> None:
        super().__init__(detail, loc=("body",))
        self.reason = reason


class WebhookReplayed(Conflict):
    """A delivery id that was already accepted (by this replica or another)."""

    type = "webhook-replayed"
    title = "Webhook delivery already received"
    reason = "replayed"


class DeployQueueFull(DependencyUnavailable):
    """Too many deployments waiting in this process: the sender should retry later."""

    reason = "queue-full"

    def __init__(self) -> None:
        super().__init__("too many model deployments are waiting; retry later", retry_after=30)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a verified payload asks for: a deployment, or nothing (``detail`` says why)."""

    deploy: DeployRequest | None
    detail: str
    name: str | None = None
    version: str | None = None


Payload = TypeVar("Payload", bound=BaseModel)

# Verifies the signature of the body under the secret (raises WebhookRefused).
Verifier = Callable[[str, SignedHeaders, bytes], None]
# Turns a verified body into a decision (raises WebhookPayloadInvalid).
Interpreter = Callable[[bytes, str], Decision]


async def receive(
    request: Request,
    source: WebhookSource,
    secret: str | None,
    verify: Verifier,
    interpret: Interpreter,
) -> WebhookAccepted:
    """Run one delivery through the steps of the module's docstring."""
    if secret is None:
        raise NotFound(f"the {source} model webhook is not configured")
    state = app_state(request)
    actor = Actor(
        name=f"webhook:{source}",
        client_addr=client_address(request),
        user_agent=request.headers.get("user-agent"),
        request_id=request_context(request.scope).request_id,
    )
    signed, body = await _verified(request, state, actor, source, secret, verify)
    try:
        decision = interpret(body, signed.delivery_id)
    except WebhookPayloadInvalid as exc:
        await _refused(state, actor, source, exc, signed)
        raise
    deploy = decision.deploy
    if deploy is not None and not state.deploys.reserve():
        full = DeployQueueFull()
        await _refused(state, actor, source, full, signed)
        raise full
    try:
        await _accept(state, actor, source, signed, decision)
    except BaseException:
        if deploy is not None:
            state.deploys.release()
        raise
    if deploy is not None:
        state.deploys.submit(deploy)
    return WebhookAccepted(
        delivery_id=signed.delivery_id,
        status="queued" if deploy is not None else "ignored",
        name=decision.name,
        version=decision.version,
        activate=deploy.activate if deploy is not None else False,
        detail=decision.detail,
    )


async def _verified(
    request: Request,
    state: AppState,
    actor: Actor,
    source: WebhookSource,
    secret: str,
    verify: Verifier,
) -> tuple[SignedHeaders, bytes]:
    """Steps 2 to 4: the delivery's headers and its body, once its signature is verified."""
    signed: SignedHeaders | None = None
    # Any object unique to this request: each delivery is checked on its own.
    async with state.webhook_throttle.checking(actor.client_addr, object()) as check:
        try:
            signed = signed_headers(request.headers, source)
            check_timestamp(signed, time.time())
            body = await _bounded_body(request)
            verify(secret, signed, body)
        except (WebhookRefused, BodyTooLarge) as exc:
            check.fail()
            await _refused(state, actor, source, exc, signed)
            raise
    return signed, body


async def _bounded_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it is longer than ``MAX_WEBHOOK_BODY_BYTES`` (the
    app's body limit applies too, and may be lower)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_WEBHOOK_BODY_BYTES:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_WEBHOOK_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _accept(
    state: AppState,
    actor: Actor,
    source: WebhookSource,
    signed: SignedHeaders,
    decision: Decision,
) -> None:
    """Claim the delivery id and audit the delivery in one transaction (409 if claimed)."""
    now = utcnow()
    replayed = False
    try:
        async with (
            asyncio.timeout(state.settings.database_timeout_seconds),
            state.sessionmaker() as session,
        ):
            if await claim_delivery(session, source, signed.delivery_id, now):
                clock = time.monotonic()
                if clock - state.webhooks_pruned_at >= _PRUNE_EVERY_SECONDS:
                    state.webhooks_pruned_at = clock
                    await prune_deliveries(session, now)
                deploy = decision.deploy
                await record_event(
                    session,
                    actor,
                    action="webhook.accept",
                    target_type="model" if decision.name else "webhook",
                    target_id=decision.name or source,
                    detail={
                        "source": source,
                        "delivery_id": signed.delivery_id,
                        "version": decision.version,
                        "queued": deploy is not None,
                        "activate": deploy.activate if deploy is not None else False,
                        "source_uri": deploy.source_uri[:300] if deploy is not None else None,
                        "detail": decision.detail,
                    },
                )
                await session.commit()
            else:
                replayed = True
    except TimeoutError:
        raise DependencyUnavailable("the database did not answer in time", retry_after=2) from None
    if replayed:
        replay = WebhookReplayed(f"delivery {signed.delivery_id} was already received")
        await _refused(state, actor, source, replay, signed)
        raise replay
    logger.info(
        "model webhook accepted",
        source=source,
        delivery_id=signed.delivery_id,
        model=decision.name,
        version=decision.version,
        queued=decision.deploy is not None,
        detail=decision.detail,
    )


async def _refused(
    state: AppState,
    actor: Actor,
    source: WebhookSource,
    error: Exception,
    signed: SignedHeaders | None,
) -> None:
    """Log and audit a refusal (in a transaction of its own); a database that cannot take the
    audit event does not change the answer, which is the refusal."""
    reason = str(getattr(error, "reason", "body-too-large"))
    detail: dict[str, Any] = {"source": source, "reason": reason}
    if signed is not None:
        detail["delivery_id"] = signed.delivery_id
    if isinstance(error, ModelgateError):
        detail["detail"] = error.detail
    logger.warning("model webhook refused", **detail)
    try:
        async with (
            asyncio.timeout(state.settings.database_timeout_seconds),
            state.sessionmaker() as session,
        ):
            await record_event(
                session,
                actor,
                action="webhook.refuse",
                target_type="webhook",
                target_id=source,
                detail=detail,
            )
            await session.commit()
    except Exception as exc:
        logger.error("model webhook refusal not audited", error=type(exc).__name__, **detail)


def parse_payload(model: type[Payload], body: bytes) -> Payload:
    """``body`` validated as ``model`` (422 naming no value of it, which may be anything)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors()})
        raise WebhookPayloadInvalid(
            "the payload is not what this webhook expects (fields: " + ", ".join(fields[:5]) + ")"
        ) from None
