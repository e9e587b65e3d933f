"""``POST /auth/token``: an API key or an admin user's password for a short-lived JWT;
``POST /auth/revoke``: a JWT revoking itself (signing out)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from api.http.context import request_context
from api.http.deps import (
    AnyCredential,
    DatabaseRoute,
    NoStore,
    SessionDep,
    StateDep,
    client_address,
    request_actor,
)
from api.http.errors import problem_responses
from api.services import AppState
from auth.audit import Actor, record_event
from auth.errors import Forbidden, Unauthenticated
from auth.identity.admins import MAX_EMAIL_LENGTH, MAX_PASSWORD_LENGTH, authenticate_password
from auth.identity.authn import authorize, bearer_credential
from auth.identity.keys import DISPLAY_PREFIX_LENGTH, looks_like_key
from auth.identity.tokens import MintedToken, granted_scopes, mint_token, revoke_token

router = APIRouter(route_class=DatabaseRoute, tags=["auth"])

Secret = Annotated[str, Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)]


class TokenForm(BaseModel):
    """The OAuth 2.0 token request (form-encoded): ``client_credentials`` with an API key as
    ``client_secret``, or ``password`` with an admin user's e-mail and password."""

    model_config = ConfigDict(extra="forbid")

    grant_type: Literal["client_credentials", "password"]
    client_id: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="the key's id; when given it must match the key"
    )
    client_secret: Secret | None = Field(default=None, description="an API key (mg_...)")
    username: Annotated[str, Field(min_length=1, max_length=MAX_EMAIL_LENGTH)] | None = Field(
        default=None, description="an admin user's e-mail address"
    )
    password: Secret | None = None
    scope: Annotated[str, Field(max_length=200, pattern=r"^[a-z:_ ]*$")] | None = Field(
        default=None,
        description="space-separated scopes to narrow the token to; only scopes the "
        "credential holds (asking for more is 403)",
    )


class TokenResponse(BaseModel):
    """A bearer token for the ``Authorization`` header, valid for ``expires_in`` seconds."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the OAuth token type)
    expires_in: int
    scope: str


@router.post(
    "/auth/token",
    response_model=TokenResponse,
    dependencies=[NoStore],
    responses=problem_responses(401, 403, 422, 429, 503),
)
async def issue_token(
    form: Annotated[TokenForm, Form()],
    request: Request,
    state: StateDep,
    session: SessionDep,
) -> TokenResponse:
    """Exchange an API key or an admin user's password for a JWT (failed logins throttled)."""
    # Behind MODELGATE_TRUSTED_PROXIES, the client their X-Forwarded-For names.
    address = client_address(request) or "unknown"
    if form.grant_type == "client_credentials":
        secret = form.client_secret or ""
        account = "key:" + (secret[:DISPLAY_PREFIX_LENGTH] if looks_like_key(secret) else "?")
    else:
        account = "user:" + (form.username or "").strip().lower()
    # Before any lookup or password check: a throttled attacker costs a counter read.
    await state.login_throttle.check(address, account)
    try:
        minted = await _mint(form, state, session, request, address)
    except Unauthenticated:
        exhausted = await state.login_throttle.failed(address, account)
        if exhausted:
            await _record_throttled(state, request, address, account, exhausted)
        raise
    return TokenResponse(
        access_token=minted.access_token,
        expires_in=minted.expires_in,
        scope=" ".join(sorted(minted.scopes)),
    )


class RevokedToken(BaseModel):
    """The access token that called ``/auth/revoke``, now revoked."""

    jti: uuid.UUID
    revoked_at: datetime


@router.post(
    "/auth/revoke",
    response_model=RevokedToken,
    dependencies=[NoStore],
    responses=problem_responses(401, 403, 429, 503),
)
async def revoke_own_token(
    subject: AnyCredential, request: Request, state: StateDep, session: SessionDep
) -> RevokedToken:
    """Revoke the access token (JWT) that calls this route: signing out (RFC 7009 in spirit)."""
    # An API key is not revoked by presenting it (a leaked key must not let anyone end it
    # silently, and a client that meant to sign out must not lose its key): 403.
    if subject.jti is None:
        raise Forbidden(
            "this route revokes the access token that calls it; an API key is revoked with "
            "POST /me/keys/{id}/revoke or by an operator"
        )
    # The same revocation as an operator's (POST /admin/tokens/{jti}/revoke): audited as
    # token.revoke, refused on every worker within the credential cache's second.
    record = await revoke_token(session, request_actor(request, subject), subject.jti)
    assert record.revoked_at is not None  # noqa: S101 (revoke_token just set it)
    # This worker need not wait out its cache's second: the client that signed out, and any
    # copy of its token, is refused here at once (a request racing this one, before the commit,
    # may cache it again, for at most the same second as on the other workers).
    state.authenticator.forget_token(bearer_credential(request.headers.get("authorization")))
    return RevokedToken(jti=record.jti, revoked_at=record.revoked_at)


async def _mint(
    form: TokenForm, state: AppState, session: AsyncSession, request: Request, address: str
) -> MintedToken:
    if form.grant_type == "client_credentials":
        secret = form.client_secret or ""
        if not looks_like_key(secret):
            raise Unauthenticated("client_secret must be an API key")
        # A key that fails here counts against the address's failed-credential budget too,
        # as it would on any other route.
        subject = await state.authenticator.authenticate(secret, lambda: address)
        # The access line names the key exchanged (by its ids), as on every other route.
        request_context(request.scope).subject = subject
        if form.client_id is not None and form.client_id != str(subject.key_id):
            raise Unauthenticated("client_id does not match the key")
        authorize(subject, frozenset())  # a suspended tenant's key gets no token either
        actor = request_actor(request, subject)
        return await mint_token(
            session,
            state.tokens,
            actor,
            grant_type="client_credentials",
            scopes=granted_scopes(subject.scopes, form.scope),
            api_key_id=subject.key_id,
            tenant_id=subject.tenant.id if subject.tenant else None,
            client_addr=actor.client_addr,
            not_after=subject.expires_at,
        )
    admin = await authenticate_password(session, form.username or "", form.password or "")
    if admin is None:
        raise Unauthenticated("invalid e-mail address or password")
    actor = Actor(
        name=f"admin:{admin.name}",
        client_addr=client_address(request),
        user_agent=request.headers.get("user-agent"),
        request_id=request_context(request.scope).request_id,
    )
    return await mint_token(
        session,
        state.tokens,
        actor,
        grant_type="password",
        scopes=granted_scopes(frozenset({"admin"}), form.scope),
        admin_principal_id=admin.id,
        client_addr=actor.client_addr,
    )


async def _record_throttled(
    state: AppState, request: Request, address: str, account: str, budgets: list[str]
) -> None:
    """The start of a burst of failed logins, in the audit trail: in a session of its own, as
    the request's own is not committed on a 401."""
    actor = Actor(
        name="anonymous",
        client_addr=address,
        user_agent=request.headers.get("user-agent"),
        request_id=request_context(request.scope).request_id,
    )
    async with state.sessionmaker() as session:
        await record_event(
            session,
            actor,
            action="auth.login_throttled",
            target_type="login",
            target_id=account[:64],
            detail={"address": address, "account": account, "budgets": budgets},
        )
        await session.commit()
