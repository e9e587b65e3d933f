"""``Idempotency-Key`` on the billable POST routes (``/predict``, ``/predict/batch``, the V2
infer routes): the check made before the rate limit, and the replay.

A request with a key is, in order: authenticated and its scopes checked; parsed (one RFC 8941
sf-string, else 400), scoped (tenant, API key, method, route) and fingerprinted (SHA-256 of the
body as received); looked up (one primary-key read): an answer stored under the key is replayed
byte for byte with ``Idempotency-Replayed: true`` (another body: 422), without inference, usage
record, quota or rate-limit unit; else the key is claimed (a claim held by another request: 409),
the rate limit is checked and the request is served as usual, its answer handed to the usage
writer with its usage event, so that it is stored in the same transaction as the record
(``auth.idempotency``, ``api.inference.pipeline``). A refused request (4xx, 429, 503) stores
nothing: its claim is given back and the key may be retried.

Why a replay costs no rate-limit unit: retrying with the same key is what a client is asked to do
after a timeout, and after an outage every client does it at once; counting the retries would
answer them 429 and hide the answers they are owed. What a replay costs is the lookup, one
primary-key read, which every keyed request pays whatever its limit (a key's new requests are
still limited): the same order of work as the limit check itself.
"""

from __future__ import annotations

from fastapi import Request, Response

from api.http.context import request_context
from api.services import AppState
from auth.errors import DependencyUnavailable, IdempotencyKeyInUse, IdempotencyKeyReused
from auth.idempotency import (
    KeyedRequest,
    StoredResponse,
    fingerprint,
    key_scope,
    parse_key,
)
from auth.identity.authn import AuthSubject

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


async def stored_answer(state: AppState, scope: bytes) -> StoredResponse | None:
    """The unexpired answer stored under ``scope``."""
    return await state.idempotent_answers.get(scope)


# The header as the OpenAPI document states it (declared through each route's ``openapi_extra``
# rather than a dependency: on the hot path every dependency costs FastAPI's solver a visit).
KEY_PARAMETER = {
    "name": IDEMPOTENCY_KEY,
    "in": "header",
    "required": False,
    "description": 'A Structured Field string (`"..."`, 1 to 255 printable characters) naming '
    "this request: a retry with the same key and body is answered with the first answer "
    "(Idempotency-Replayed: true) and not billed again; kept 24 hours by default",
    "schema": {"type": "string", "pattern": KEY_PATTERN, "title": IDEMPOTENCY_KEY},
}


async def check_key(request: Request, state: AppState, subject: AuthSubject) -> None:
    """Check the request's ``Idempotency-Key``, if it has one: replay its stored answer (raises
    :class:`Replay`), refuse it (400, 409, 422), or claim it for this request.

    The ``Authenticator`` of the billable routes calls it once the credential and its scopes
    are checked and before the rate limit: a replay costs no rate-limit unit."""
    values = request.headers.getlist(IDEMPOTENCY_KEY)
    if not values:
        return
    parsed = parse_key(values)
    tenant = subject.require_tenant()
    key_id = subject.require_key_id()
    route = getattr(request.scope.get("route"), "path", request.url.path)
    scope = key_scope(tenant.id, key_id, request.method, route, parsed)
    body_fingerprint = fingerprint(await request.body())
    stored = await stored_answer(state, scope)
    if stored is not None:
        raise Replay(checked(stored, body_fingerprint))
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
