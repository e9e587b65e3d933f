"""Operator routes for JWT access-token records: list and revoke (never a token itself)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from api.http.deps import AdminScope, DatabaseRoute, SessionDep, request_actor
from api.http.errors import problem_responses
from api.schemas.fields import PageLimit, PageOffset
from auth.identity.tokens import TokenFilter, list_tokens, revoke_token
from auth.models import AccessToken

router = APIRouter(route_class=DatabaseRoute, tags=["admin"])


class TokenView(BaseModel):
    """A minted token's record: who holds it, from which key or admin user, until when."""

    jti: uuid.UUID
    subject: str
    grant_type: str
    api_key_id: uuid.UUID | None
    admin_principal_id: uuid.UUID | None
    tenant_id: uuid.UUID | None
    scopes: list[str]
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    client_addr: str | None

    @classmethod
    def of(cls, record: AccessToken) -> TokenView:
        """The view of a token record."""
        return cls(
            jti=record.jti,
            subject=record.subject,
            grant_type=record.grant_type,
            api_key_id=record.api_key_id,
            admin_principal_id=record.admin_principal_id,
            tenant_id=record.tenant_id,
            scopes=sorted(record.scopes.split()),
            issued_at=record.issued_at,
            expires_at=record.expires_at,
            revoked_at=record.revoked_at,
            client_addr=record.client_addr,
        )


class TokenList(BaseModel):
    """A page of token records, newest first."""

    tokens: list[TokenView]


@router.get("/tokens", response_model=TokenList, responses=problem_responses(401, 403, 422, 429))
async def list_tokens_route(
    session: SessionDep,
    tenant_id: Annotated[uuid.UUID | None, Query()] = None,
    key_id: Annotated[uuid.UUID | None, Query(description="the key they were minted from")] = None,
    admin: Annotated[uuid.UUID | None, Query(description="the admin user's principal id")] = None,
    active_only: Annotated[bool, Query(description="only unexpired, unrevoked tokens")] = False,
    limit: Annotated[PageLimit, Query()] = 100,
    offset: Annotated[PageOffset, Query()] = 0,
) -> TokenList:
    """List minted tokens' records, newest first (never a token)."""
    where = TokenFilter(
        tenant_id=tenant_id, api_key_id=key_id, admin_principal_id=admin, active_only=active_only
    )
    records = await list_tokens(session, where, limit=limit, offset=offset)
    return TokenList(tokens=[TokenView.of(record) for record in records])


@router.post(
    "/tokens/{jti}/revoke", response_model=TokenView, responses=problem_responses(404, 429)
)
async def revoke_token_route(
    jti: uuid.UUID, admin: AdminScope, session: SessionDep, request: Request
) -> TokenView:
    """Revoke a token now (it fails on every worker within a second); idempotent."""
    return TokenView.of(await revoke_token(session, request_actor(request, admin), jti))
