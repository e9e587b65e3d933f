"""Authentication: from a bearer credential to an ``AuthSubject``, and scope checks."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.errors import (
    DatabaseTimedOut,
    DependencyUnavailable,
    Forbidden,
    TenantSuspended,
    Unauthenticated,
)
from auth.events.outbox import DEFAULT_THRESHOLDS
from auth.identity.failure_throttle import CredentialThrottle
from auth.identity.keys import ADMIN_SCOPE, has_valid_checksum, key_digest, looks_like_key
from auth.identity.tokens import TokenClaims, TokenConfig, verify_token
from auth.limits.plans import EffectiveLimits, effective_limits
from auth.models import AccessToken, AdminPrincipal, ApiKey, Plan, Tenant, utcnow

# Longer Authorization headers are refused before any parsing (SECURITY.md line 1).
MAX_AUTHORIZATION_LENGTH = 8 * 1024
# Distinct credentials being looked up at once in one worker (the single-flight map's bound):
# far more than the database pool serves at once, so only a flood of distinct guesses from
# many addresses reaches it, and is refused with 503 rather than queued without end.
MAX_LOOKUPS_IN_FLIGHT = 1024


@dataclass(frozen=True)
class TenantInfo:
    """What a request needs to know about the caller's tenant."""

    id: uuid.UUID
    name: str
    plan: str
    plan_id: uuid.UUID
    # The plan's, or the tenant's override (None: unlimited).
    monthly_quota: int | None
    status: str
    # The models the plan opens (None: every model).
    models: frozenset[str] | None = None
    # Percentages of monthly_quota that raise usage.threshold events.
    usage_alert_thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS

    def may_use(self, model: str) -> bool:
        """Whether the tenant's plan opens this model."""
        return self.models is None or model in self.models


@dataclass(frozen=True)
class AuthSubject:
    """The authenticated caller: a tenant's key, an admin's key, or a JWT minted from either or
    for an admin user, with its scopes.

    ``key_id`` is the key the credential derives from (a key, or the key a token was minted
    from): usage records name it. An admin user's token derives from no key (``key_id`` is
    None); ``limit_id`` is what the rate limiter counts requests against either way.
    """

    key_id: uuid.UUID | None
    key_name: str
    scopes: frozenset[str]
    expires_at: datetime | None
    tenant: TenantInfo | None = None
    admin_principal_id: uuid.UUID | None = None
    admin_name: str | None = None
    # The token's id when the credential is a JWT.
    jti: uuid.UUID | None = None
    # The limits this credential is held to, in ``limits``' notation, several separated by
    # ";" (e.g. "10/second;1000/hour"): the tenant's plan or override with the key's own,
    # tighter ones. None: the server's default for its kind (tenant or admin).
    rate_limits: str | None = None
    # Requests of this key allowed in flight at once across every worker (None: no bound).
    max_in_flight: int | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this is an operator's credential."""
        return (
            ADMIN_SCOPE in self.scopes
            and self.admin_principal_id is not None
            and self.tenant is None
        )

    @cached_property
    def limit_id(self) -> str:
        """What the rate limiter counts against: the key's id, else the admin user's."""
        if self.key_id is not None:
            return str(self.key_id)
        return f"admin:{self.admin_principal_id}"

    def require_tenant(self) -> TenantInfo:
        """The caller's tenant; a 403 for an admin credential on a tenant route."""
        if self.tenant is None:
            raise Forbidden("this route is for tenant credentials")
        return self.tenant

    def require_key_id(self) -> uuid.UUID:
        """The key the credential derives from; a 403 for an admin user's token."""
        if self.key_id is None:
            raise Forbidden("this route is for credentials derived from an API key")
        return self.key_id

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
    """Verifies API keys and JWTs against the database, through one short-lived per-process
    cache.

    A verified key is remembered by its digest, a verified token by its text (its ``jti`` and
    every other claim, signed), for at most
    ``cache_ttl`` seconds (never past the key's expiry or scheduled revocation, nor the token's
    expiry), so that the steady state costs no database round trip while revocation (of a key,
    of a token, or of the key a token was minted from), expiry, suspension and limit changes
    still reach every worker within that time. Failures are never cached: an unknown key costs a
    lookup each time it is tried (its checksum must be valid first, and a token's signature).
    Concurrent misses of one entry share one lookup, and at most ``max_lookups`` distinct
    entries are looked up at once.

    With a ``throttle``, every credential the cache does not hold passes the client address's
    failure budget first (``auth.identity.failure_throttle``), and every failure is counted
    against it: once an address has failed too often, its uncached credentials are refused
    with 429 before any lookup, while keys and tokens already verified in this worker keep
    working from it (a tenant sharing a NAT with an attacker keeps its live key). A cache hit
    never consults the throttle.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        pepper: bytes,
        *,
        tokens: TokenConfig | None = None,
        cache_ttl: float = 1.0,
        cache_size: int = 10_000,
        lookup_timeout: float | None = None,
        default_rate_limit: str = "100/minute",
        throttle: CredentialThrottle | None = None,
        max_lookups: int = MAX_LOOKUPS_IN_FLIGHT,
    ) -> None:
        self._default_rate_limit = default_rate_limit
        self._sessionmaker = sessionmaker
        self._throttle = throttle
        self._max_lookups = max_lookups
        self._lookup_timeout = lookup_timeout
        self._pepper = pepper
        self._tokens = tokens
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        # key digest or token text -> (monotonic deadline, subject); insertion order is age
        # order.
        self._cache: dict[str, tuple[float, AuthSubject]] = {}
        self._lookups: dict[str, asyncio.Future[AuthSubject]] = {}

    async def authenticate(
        self, credential: str, address: Callable[[], str | None] | None = None
    ) -> AuthSubject:
        """The subject for a credential; 401 for anything that is not a live key or token.

        ``address`` gives the client's address; it is asked for only when the credential is
        not in the cache, for the failure throttle (429 once the address has failed too often,
        before anything is looked up)."""
        if looks_like_key(credential):
            if has_valid_checksum(credential):
                digest = key_digest(self._pepper, credential)
                cached = self._cache.get(digest)
                if cached is not None:
                    if cached[0] > time.monotonic():
                        return cached[1]
                    del self._cache[digest]
                return await self._on_miss(
                    address,
                    digest,
                    lambda: self._single_flight(digest, lambda: self._lookup_key(digest)),
                )
            # Checked before any database access: garbage never costs a query (but counts as
            # a failure, and is refused like any other once the address is throttled).
            return await self._on_miss(address, object(), _refuse)
        if self._tokens is None:
            return await self._on_miss(address, object(), _refuse)
        # A token is remembered by its exact text: the same bytes under the same (immutable)
        # secrets verify the same way, and the entry never outlives its exp, so a hit may skip
        # verify_token (a quarter of a millisecond in PyJWT). A token that differs in any
        # claim, or in its signature, is another entry and is verified in full.
        cached = self._cache.get(credential)
        if cached is not None:
            if cached[0] > time.monotonic():
                return cached[1]
            del self._cache[credential]
        tokens = self._tokens

        async def verify() -> AuthSubject:
            # Signature, algorithm, kid and claims, without I/O: a forged token never costs a
            # query.
            claims = verify_token(tokens, credential)
            return await self._single_flight(credential, lambda: self._lookup_token(claims))

        return await self._on_miss(address, credential, verify)

    async def _on_miss(
        self,
        address: Callable[[], str | None] | None,
        entry: object,
        verify: Callable[[], Awaitable[AuthSubject]],
    ) -> AuthSubject:
        """Verify a credential the cache does not hold (``entry``: its cache entry), under the
        failure throttle: refused with 429 before any work once the client's address has no
        failure left, and counted against it when it fails. The cache's hits never come
        here."""
        throttle = self._throttle
        if throttle is None:
            return await verify()
        async with throttle.checking(address() if address is not None else None, entry) as check:
            try:
                return await verify()
            except Unauthenticated:
                check.fail()
                raise

    async def _single_flight(
        self,
        entry: str,
        lookup: Callable[[], Awaitable[tuple[AuthSubject, datetime | None]]],
    ) -> AuthSubject:
        pending = self._lookups.get(entry)
        if pending is not None:
            # shield: one waiter being cancelled must not cancel the lookup the others share.
            return await self._bounded(asyncio.shield(pending))
        if len(self._lookups) >= self._max_lookups:
            # Lookups of distinct credentials already fill the map (and the database's pool
            # many times over): refuse rather than let garbage grow it without bound.
            raise DependencyUnavailable("too many credential checks in flight")
        future = asyncio.ensure_future(self._verify(entry, lookup))
        self._lookups[entry] = future
        try:
            return await self._bounded(asyncio.shield(future))
        finally:
            if future.done():
                self._lookups.pop(entry, None)
            else:
                future.add_done_callback(lambda _: self._lookups.pop(entry, None))

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
        """Drop every cached credential (the benchmark uses it to time a cache miss)."""
        self._cache.clear()

    def forget_token(self, token: str) -> None:
        """Drop one access token from this worker's cache (it signed itself out): its next
        request here is looked up, and refused, at once; other workers' entries lapse within
        their second."""
        self._cache.pop(token, None)

    async def _verify(
        self,
        entry: str,
        lookup: Callable[[], Awaitable[tuple[AuthSubject, datetime | None]]],
    ) -> AuthSubject:
        started = time.monotonic()
        subject, valid_until = await lookup()
        deadline = started + self._cache_ttl
        if valid_until is not None:
            # Never serve a credential from the cache past its expiry or scheduled revocation.
            deadline = min(deadline, started + (valid_until - utcnow()).total_seconds())
        if len(self._cache) >= self._cache_size:
            # Full: drop the oldest entry (dicts keep insertion order).
            del self._cache[next(iter(self._cache))]
        self._cache[entry] = (deadline, subject)
        return subject

    async def _lookup_key(self, digest: str) -> tuple[AuthSubject, datetime | None]:
        """The live key with this digest and the moment it stops being valid, or 401."""
        statement = (
            select(ApiKey, Tenant, Plan, AdminPrincipal)
            .outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
            .outerjoin(Plan, Tenant.plan_id == Plan.id)
            .outerjoin(AdminPrincipal, ApiKey.admin_principal_id == AdminPrincipal.id)
            .where(ApiKey.digest == digest)
        )
        # A short session of its own: the connection goes back to the pool before inference.
        async with self._sessionmaker() as session:
            row = (await session.execute(statement)).first()
        if row is None:
            raise Unauthenticated("invalid credential")
        key, tenant, plan, admin = row
        # The lookup was by digest; compare again in constant time so that no code path
        # ever decides on a non-constant-time comparison of secret-derived material.
        if not hmac.compare_digest(key.digest, digest):
            raise Unauthenticated("invalid credential")
        ends = _live_key_ends(key, utcnow())
        limits = self._limits(tenant, plan, key)
        subject = AuthSubject(
            key_id=key.id,
            key_name=key.name,
            scopes=key.scope_set,
            expires_at=key.expires_at,
            tenant=_tenant_info(tenant, plan, limits),
            admin_principal_id=admin.id if admin is not None else None,
            admin_name=admin.name if admin is not None else None,
            rate_limits=limits.rate_limits if limits else None,
            max_in_flight=limits.max_in_flight if limits else None,
        )
        return subject, min(ends, default=None)

    def _limits(
        self, tenant: Tenant | None, plan: Plan | None, key: ApiKey
    ) -> EffectiveLimits | None:
        """A tenant key's limits from its plan, its tenant and itself (None for an admin key)."""
        if tenant is None or plan is None:
            return None
        return effective_limits(plan, tenant, key, self._default_rate_limit)

    async def _lookup_token(self, claims: TokenClaims) -> tuple[AuthSubject, datetime | None]:
        """The live record of a verified token, with the key (and tenant) or admin user it
        comes from, in one query; 401 unless all of them are live."""
        statement = (
            select(AccessToken, ApiKey, Tenant, Plan, AdminPrincipal)
            .outerjoin(ApiKey, AccessToken.api_key_id == ApiKey.id)
            .outerjoin(Tenant, AccessToken.tenant_id == Tenant.id)
            .outerjoin(Plan, Tenant.plan_id == Plan.id)
            .outerjoin(
                AdminPrincipal,
                AdminPrincipal.id
                == func.coalesce(AccessToken.admin_principal_id, ApiKey.admin_principal_id),
            )
            .where(AccessToken.jti == claims.jti)
        )
        async with self._sessionmaker() as session:
            row = (await session.execute(statement)).first()
        if row is None:
            raise Unauthenticated("invalid credential")
        record, key, tenant, plan, admin = row
        now = utcnow()
        if record.subject != claims.subject or record.tenant_id != claims.tenant_id:
            raise Unauthenticated("invalid credential")
        if record.revoked_at is not None and record.revoked_at <= now:
            raise Unauthenticated("credential revoked")
        if record.expires_at <= now:
            raise Unauthenticated("credential expired")
        ends = [record.expires_at]
        if record.revoked_at is not None:
            ends.append(record.revoked_at)
        # Never more than the token says, what it was minted with, and what its source holds now.
        scopes = claims.scopes & frozenset(record.scopes.split())
        if key is not None:
            if claims.kind != "key" or key.id != claims.subject_id:
                raise Unauthenticated("invalid credential")
            ends.extend(_live_key_ends(key, now))
            limits = self._limits(tenant, plan, key)
            subject = AuthSubject(
                key_id=key.id,
                key_name=key.name,
                scopes=scopes & key.scope_set,
                expires_at=key.expires_at,
                tenant=_tenant_info(tenant, plan, limits),
                admin_principal_id=admin.id if admin is not None else None,
                admin_name=admin.name if admin is not None else None,
                jti=record.jti,
                # A token is held to the limits of the key it was minted from.
                rate_limits=limits.rate_limits if limits else None,
                max_in_flight=limits.max_in_flight if limits else None,
            )
        else:
            if (
                claims.kind != "admin"
                or admin is None
                or admin.id != claims.subject_id
                or admin.password_hash is None
            ):
                raise Unauthenticated("invalid credential")
            subject = AuthSubject(
                key_id=None,
                key_name=admin.name,
                scopes=scopes & {ADMIN_SCOPE},
                expires_at=record.expires_at,
                admin_principal_id=admin.id,
                admin_name=admin.name,
                jti=record.jti,
            )
        return subject, min(ends)


async def _refuse() -> AuthSubject:
    """A credential refused without any lookup (a key whose checksum is wrong)."""
    raise Unauthenticated("invalid credential")


def _live_key_ends(key: ApiKey, now: datetime) -> list[datetime]:
    """401 unless the key is live; the moments it stops being valid."""
    if key.revoked_at is not None and key.revoked_at <= now:
        raise Unauthenticated("credential revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise Unauthenticated("credential expired")
    return [moment for moment in (key.revoked_at, key.expires_at) if moment is not None]


def _tenant_info(
    tenant: Tenant | None, plan: Plan | None, limits: EffectiveLimits | None
) -> TenantInfo | None:
    if tenant is None or plan is None or limits is None:
        return None
    return TenantInfo(
        id=tenant.id,
        name=tenant.name,
        plan=plan.name,
        plan_id=plan.id,
        monthly_quota=limits.monthly_quota,
        status=tenant.status,
        models=limits.models,
        usage_alert_thresholds=limits.usage_alert_thresholds,
    )


def authorize(subject: AuthSubject, required_scopes: frozenset[str]) -> None:
    """Refuse with 403 unless the subject holds every required scope (and its tenant is active)."""
    if subject.tenant is not None and subject.tenant.status != "active":
        raise TenantSuspended("this tenant is suspended")
    if not required_scopes <= subject.scopes:
        missing = ", ".join(sorted(required_scopes - subject.scopes))
        raise Forbidden(f"this credential lacks the scope: {missing}")
