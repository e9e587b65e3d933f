"""``Idempotency-Key`` on the billable POST routes (``/predict``, ``/predict/batch``, the V2
infer routes): the dependency that checks a key before the route runs, and the replay.

A request with a key is, in order: parsed (one RFC 8941 sf-string, else 400), scoped (tenant,
API key, method, route) and fingerprinted (SHA-256 of the body as received); looked up (one
primary-key read): an answer stored under the key is replayed byte for byte with
``Idempotency-Replayed: true`` (another body: 422), without inference, usage record or quota;
else the key is claimed (a claim held by another request: 409) and the request is served as
usual, its answer handed to the usage writer with its usage event, so that it is stored in the
same transaction as the record (``auth.idempotency``, ``api.inference.pipeline``). A refused
request (4xx, 429, 503) stores nothing: its claim is given back and the key may be retried.

A replay counts against the key's rate limit like any request: the key is checked by the
``Authenticator`` before the lookup, so a client retrying in a loop is slowed like any other, and
the lookup it costs the database is bounded by the same limit.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request, Response

from api.http.context import request_context
from api.http.deps import PredictScope, app_state
from auth.errors import DependencyUnavailable, IdempotencyKeyInUse, IdempotencyKeyReused
from auth.idempotency import (
    KeyedRequest,
    StoredResponse,
    fingerprint,
    key_scope,
    lookup,
    parse_key,
)

IDEMPOTENCY_KEY = "Idempotency-Key"
# The key as the OpenAPI document states it: an sf-string of 1 to 255 characters, each a
# printable ASCII character other than '"' and '\\', or one of them escaped.
KEY_PATTERN = r'^"(?:[ !#-\[\]-~]|\\["\\]){1,255}"$'
REPLAYED = "Idempotency-Replayed"
# The answer's headers that are part of it (the rest are the request's own: X-Request-ID, the
# rate limit's).
KEPT_HEADERS = ("content-type", "inference-header-content-length")


class Replay(Exception):
    """The request's key has an answer stored: it is sent instead of serving the request."""

    def __init__(self, stored: StoredResponse) -> None:
        super().__init__("replay")
        self.stored = stored


def replay_response(request: Request, stored: StoredResponse) -> Response:
    """The stored answer, byte for byte, marked as a replay. Its request was billed when it was
    first served; this one is not (the billing guarantee is met by that record)."""
    request_context(request.scope).billed = True
    headers = {**stored.headers, REPLAYED: "true"}
    headers.pop("content-length", None)
    return Response(stored.body, status_code=stored.status_code, headers=headers)


async def replay_handler(request: Request, exc: Exception) -> Response:
    """The exception handler that answers a :class:`Replay`."""
    assert isinstance(exc, Replay)  # noqa: S101 (registered for Replay only)
    return replay_response(request, exc.stored)


def checked(stored: StoredResponse, body_fingerprint: bytes) -> StoredResponse:
    """``stored`` if it answers this body; 422 if the key was used with another."""
    if stored.fingerprint != body_fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a request with another body; use a new key"
        )
    return stored


async def stored_answer(request: Request, scope: bytes) -> StoredResponse | None:
    """The unexpired answer stored under ``scope``."""
    return await lookup(app_state(request).engine, scope)


async def idempotency_key(
    request: Request,
    subject: PredictScope,
    key: Annotated[  # noqa: ARG001 (declared for the OpenAPI document; read with getlist)
        str | None,
        Header(
            alias=IDEMPOTENCY_KEY,
            description='A Structured Field string (`"..."`, 1 to 255 printable characters) '
            "naming this request: a retry with the same key and body is answered with the first "
            "answer (Idempotency-Replayed: true) and not billed again; kept 24 hours by default",
            # Stated for the document only: a value off the pattern is parse_key's 400.
            json_schema_extra={"pattern": KEY_PATTERN},
        ),
    ] = None,
) -> None:
    """Check the request's ``Idempotency-Key``, if it has one: replay its stored answer (raises
    :class:`Replay`), refuse it (400, 409, 422), or claim it for this request."""
    values = request.headers.getlist(IDEMPOTENCY_KEY)
    if not values:
        return
    parsed = parse_key(values)
    tenant = subject.require_tenant()
    key_id = subject.require_key_id()
    route = getattr(request.scope.get("route"), "path", request.url.path)
    scope = key_scope(tenant.id, key_id, request.method, route, parsed)
    body_fingerprint = fingerprint(await request.body())
    stored = await stored_answer(request, scope)
    if stored is not None:
        raise Replay(checked(stored, body_fingerprint))
    state = app_state(request)
    try:
        token = await state.idempotency_claims.claim(scope)
    except Exception:
        raise DependencyUnavailable("idempotency keys cannot be checked now") from None
    if token is None:
        raise IdempotencyKeyInUse(
            "a request with this Idempotency-Key is being served; retry once it is answered"
        )
    request_context(request.scope).idempotency.request = KeyedRequest(
        scope, body_fingerprint, tenant.id, key_id, state.idempotency_claims, token
    )


IdempotencyKey = Annotated[None, Depends(idempotency_key)]


def stored_form(
    request: Request, response: Response
) -> tuple[KeyedRequest, dict[str, str], bytes] | None:
    """The request's claim, and the answer's headers and body to store with its usage record;
    None for a request without a key."""
    keyed = request_context(request.scope).idempotency.request
    if keyed is None:
        return None
    headers = {
        name: value for name, value in response.headers.items() if name.lower() in KEPT_HEADERS
    }
    return keyed, headers, bytes(response.body)
