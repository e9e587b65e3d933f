"""Authentication: from a bearer credential to an ``AuthSubject``, and scope checks."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.errors import DatabaseTimedOut, Forbidden, TenantSuspended, Unauthenticated
from auth.keys import ADMIN_SCOPE, has_valid_checksum, key_digest, looks_like_key
from auth.models import AdminPrincipal, ApiKey, Tenant, utcnow

# Longer Authorization headers are refused before any parsing (SECURITY.md line 1).
MAX_AUTHORIZATION_LENGTH = 8 * 1024


@dataclass(frozen=True)
class TenantInfo:
    """What a request needs to know about the caller's tenant."""

    id: uuid.UUID
    name: str
    plan: str
    rate_limit: str | None
    monthly_quota: int | None
    status: str


@dataclass(frozen=True)
class AuthSubject:
    """The authenticated caller: a tenant's key or an admin's key, with its scopes."""

    key_id: uuid.UUID
    key_name: str
    scopes: frozenset[str]
    expires_at: datetime | None
    tenant: TenantInfo | None = None
    admin_principal_id: uuid.UUID | None = None
    admin_name: str | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this is an operator's credential."""
        return (
            ADMIN_SCOPE in self.scopes
            and self.admin_principal_id is not None
            and self.tenant is None
        )

    def require_tenant(self) -> TenantInfo:
        """The caller's tenant; a 403 for an admin credential on a tenant route."""
        if self.tenant is None:
            raise Forbidden("this route is for tenant credentials")
        return self.tenant

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        if self.is_admin:
            return f"admin:{self.admin_name}"
        return f"tenant:{self.tenant.id if self.tenant else '?'}"


def bearer_credential(authorization: str | None) -> str:
    """Extract the credential from an ``Authorization: Bearer`` header, or refuse with 401."""
    if not authorization:
        raise Unauthenticated("missing bearer credential")
    if len(authorization) > MAX_AUTHORIZATION_LENGTH:
        raise Unauthenticated("authorization header too long")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or " " in credential:
        raise Unauthenticated("expected 'Authorization: Bearer <credential>'")
    return credential


class KeyAuthenticator:
    """Verifies API keys against the database, through a short-lived per-process cache.

    A verified key is remembered by its digest for at most ``cache_ttl`` seconds (never past
    its expiry or a scheduled revocation), so that the steady state costs no database round
    trip while revocation, expiry, suspension and limit changes still reach every worker within
    that time. Failures are never cached: an unknown key costs a lookup each time it is tried
    (its checksum must be valid first). Concurrent misses of one digest share one lookup.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        pepper: bytes,
        *,
        cache_ttl: float = 1.0,
        cache_size: int = 10_000,
        lookup_timeout: float | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._lookup_timeout = lookup_timeout
        self._pepper = pepper
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        # digest -> (monotonic deadline, subject); insertion order is age order.
        self._cache: dict[str, tuple[float, AuthSubject]] = {}
        self._lookups: dict[str, asyncio.Future[AuthSubject]] = {}

    async def authenticate(self, credential: str) -> AuthSubject:
        """The subject for a credential; 401 for anything that is not a live key."""
        if not looks_like_key(credential) or not has_valid_checksum(credential):
            # Checked before any database access: garbage never costs a query.
            raise Unauthenticated("invalid credential")
        digest = key_digest(self._pepper, credential)
        cached = self._cache.get(digest)
        if cached is not None:
            if cached[0] > time.monotonic():
                return cached[1]
            del self._cache[digest]
        pending = self._lookups.get(digest)
        if pending is not None:
            # shield: one waiter being cancelled must not cancel the lookup the others share.
            return await self._bounded(asyncio.shield(pending))
        lookup = asyncio.ensure_future(self._verify(digest))
        self._lookups[digest] = lookup
        try:
            return await self._bounded(asyncio.shield(lookup))
        finally:
            if lookup.done():
                self._lookups.pop(digest, None)
            else:
                lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))

    async def _bounded(self, lookup: asyncio.Future[AuthSubject]) -> AuthSubject:
        """Wait for a lookup at most ``lookup_timeout`` seconds; past it the database is
        unavailable (503), whatever the connection check and reconnect would still cost."""
        if self._lookup_timeout is None:
            return await lookup
        try:
            async with asyncio.timeout(self._lookup_timeout):
                return await lookup
        except TimeoutError:
            raise DatabaseTimedOut from None

    def forget(self) -> None:
        """Drop every cached key (the benchmark uses it to time a cache miss)."""
        self._cache.clear()

    async def _verify(self, digest: str) -> AuthSubject:
        started = time.monotonic()
        subject, valid_until = await self._lookup(digest)
        deadline = started + self._cache_ttl
        if valid_until is not None:
            # Never serve a key from the cache past its expiry or scheduled revocation.
            deadline = min(deadline, started + (valid_until - utcnow()).total_seconds())
        if len(self._cache) >= self._cache_size:
            # Full: drop the oldest entry (dicts keep insertion order).
            del self._cache[next(iter(self._cache))]
        self._cache[digest] = (deadline, subject)
        return subject

    async def _lookup(self, digest: str) -> tuple[AuthSubject, datetime | None]:
        """The live key with this digest and the moment it stops being valid, or 401."""
        statement = (
            select(ApiKey, Tenant, AdminPrincipal)
            .outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
            .outerjoin(AdminPrincipal, ApiKey.admin_principal_id == AdminPrincipal.id)
            .where(ApiKey.digest == digest)
        )
        # A short session of its own: the connection goes back to the pool before inference.
        async with self._sessionmaker() as session:
            row = (await session.execute(statement)).first()
        if row is None:
            raise Unauthenticated("invalid credential")
        key, tenant, admin = row
        # The lookup was by digest; compare again in constant time so that no code path
        # ever decides on a non-constant-time comparison of secret-derived material.
        if not hmac.compare_digest(key.digest, digest):
            raise Unauthenticated("invalid credential")
        now = utcnow()
        if key.revoked_at is not None and key.revoked_at <= now:
            raise Unauthenticated("credential revoked")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated("credential expired")
        ends = [moment for moment in (key.revoked_at, key.expires_at) if moment is not None]
        tenant_info = None
        if tenant is not None:
            tenant_info = TenantInfo(
                id=tenant.id,
                name=tenant.name,
                plan=tenant.plan,
                rate_limit=tenant.rate_limit,
                monthly_quota=tenant.monthly_quota,
                status=tenant.status,
            )
        subject = AuthSubject(
            key_id=key.id,
            key_name=key.name,
            scopes=key.scope_set,
            expires_at=key.expires_at,
            tenant=tenant_info,
            admin_principal_id=admin.id if admin is not None else None,
            admin_name=admin.name if admin is not None else None,
        )
        return subject, min(ends, default=None)


def authorize(subject: AuthSubject, required_scopes: frozenset[str]) -> None:
    """Refuse with 403 unless the subject holds every required scope (and its tenant is active)."""
    if subject.tenant is not None and subject.tenant.status != "active":
        raise TenantSuspended("this tenant is suspended")
    if not required_scopes <= subject.scopes:
        missing = ", ".join(sorted(required_scopes - subject.scopes))
        raise Forbidden(f"this credential lacks the scope: {missing}")
